"""bench/agents.py's reading of the proxy log, without the clients: usage and TTFT from each
API's stream (a real SmolLM2 chat stream captured from opencode, Responses and Messages
streams in their documented shapes), usage from the node's log when a stream has none, the
hit % against the previous request, and the table."""

from __future__ import annotations

import json
from pathlib import Path

from bench import agents

FIXTURES = Path(__file__).parent / "fixtures" / "agents"


def _record(path: str, sse: str, *, status: int = 200, wall: float = 100.0) -> dict:
    chunks = [[round(0.05 * (i + 1), 4), part + "\n\n"] for i, part in enumerate(sse.split("\n\n"))
              if part.strip()]
    return {"path": path, "status": status, "wall": wall, "seconds": 1.0, "chunks": chunks}


def _sse(*events: dict) -> str:
    return "\n\n".join(f"event: {e.get('type', 'x')}\ndata: {json.dumps(e)}" for e in events)


RESPONSES = _sse(
    {"type": "response.created", "response": {"id": "resp_1"}},
    {"type": "response.output_text.delta", "delta": "hi"},
    {"type": "response.completed", "response": {"usage": {
        "input_tokens": 1000, "output_tokens": 2,
        "input_tokens_details": {"cached_tokens": 960}}}})
MESSAGES = _sse(
    {"type": "message_start", "message": {"usage": {
        "input_tokens": 40, "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 0}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
    {"type": "message_stop"})


def test_usage_and_ttft_are_read_from_each_apis_stream():
    """A captured chat stream, a Responses stream and a Messages stream each give their
    prompt and cached tokens, and TTFT at the first chunk with generated output."""
    title = json.loads((FIXTURES / "opencode" / "title.json").read_text())
    cut = _record("/v1/chat/completions", title["response_sse"])  # opencode hung up early
    assert agents.usage_of(cut) is None and agents.ttft_of(cut) is not None
    whole = _record("/v1/chat/completions", title["response_sse"] + "\n\n" + 'data: {"choices"'
                    ': [], "usage": {"prompt_tokens": 90, "prompt_tokens_details": '
                    '{"cached_tokens": 64}}}\n\ndata: [DONE]')
    assert agents.usage_of(whole) == (90, 64)
    assert agents.usage_of(_record("/v1/responses", RESPONSES)) == (1000, 960)
    assert agents.usage_of(_record("/v1/messages", MESSAGES)) == (1040, 1000)
    assert agents.ttft_of(_record("/v1/responses", RESPONSES)) == 0.1
    assert agents.ttft_of(_record("/v1/messages", MESSAGES)) == 0.15


def test_rows_give_hit_against_the_previous_prompt_and_skip_refusals(tmp_path):
    """Rows count only answered model requests; hit % is cached ÷ the previous prompt; a
    stream without usage takes it from the node's committed turn that ended meanwhile."""
    no_usage = _record("/v1/chat/completions", 'data: {"choices":[{"delta":{"content":"a"}}]}',
                       wall=200.0)
    log = tmp_path / "node.log"
    log.write_text(json.dumps({"event": "chat_done", "outcome": "committed",
                               "timestamp": "1970-01-01T00:03:20.500000Z",
                               "prompt_tokens": 1100, "cached_tokens": 1040}) + "\n")
    records = [{"path": "/v1/models", "status": 200, "chunks": []},
               _record("/v1/responses", RESPONSES),
               _record("/v1/messages", "", status=400),
               _record("/v1/messages", MESSAGES), no_usage]
    rows = agents.rows(records, agents.node_turns(log))
    assert [(r.turn, r.prompt, r.cached) for r in rows] == [
        (1, 1000, 960), (2, 1040, 1000), (3, 1100, 1040)]
    assert rows[0].hit is None and rows[1].hit == 1.0 and rows[2].hit == 1040 / 1040
    assert agents.refusals(records) == "1 × 400"
    text = agents.table("codex", rows)
    assert "| 2 | /v1/messages | 1040 | 1000 | 100 | 0.15 |" in text
    assert "turn-2 TTFT ÷ turn-1 TTFT: 1.500" in text


def test_a_client_not_installed_is_found_missing(tmp_path, monkeypatch):
    """find_client looks under the private prefix, then PATH; nothing there is None."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert agents.find_client("codex", tmp_path) is None
    (tmp_path / "node_modules" / ".bin").mkdir(parents=True)
    (tmp_path / "node_modules" / ".bin" / "opencode").write_text("")
    assert agents.find_client("opencode", tmp_path) == tmp_path / "node_modules/.bin/opencode"
