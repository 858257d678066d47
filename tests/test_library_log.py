"""The llama.cpp log capture: overlapping captures (two engines loading at once) each end
cleanly and keep their own lines."""

from __future__ import annotations

from actors.engine.library_log import LibraryLog


def test_two_overlapping_captures_with_equal_lines_each_close_without_error():
    """Given two captures open at once (two engines loading in one process) that hold equal
    lines, when the first opened closes before the second, then both close cleanly, and the
    second still collects what is logged after the first closed."""
    log = LibraryLog()
    with log.capture() as second_lines:
        first = log.capture()
        first_lines = first.__enter__()
        log.write("loading\n")
        assert first_lines == second_lines == ["loading"]
        first.__exit__(None, None, None)
        log.write("error loading model: more\n")
    assert first_lines == ["loading"]
    assert second_lines == ["loading", "error loading model: more"]
