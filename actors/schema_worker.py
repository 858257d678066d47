"""The schema compiler's own process: a native crash or a runaway compile of an agent's
schema never takes the node down.

llguidance compiles a JSON schema in native code. Admission checks every schema a prompt
carries before anything is recorded, so a schema that crashed the compiler in the node's
own process would crash the node, and again at every restart (the prompt stays in the
intake until it is settled). Here the static bounds (``schema_bounds_problem``) are checked
first, then a long-lived child process compiles the schema (one question, one answer line,
at a time) under a deadline. A child that dies or overruns is killed, the prompt is refused
saying so, and the next question starts a fresh child. The child reads its questions from a
pipe: when the node dies, the pipe closes and the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import OrderedDict

import structlog

from actors.engine.constraints import (
    compile_problem,
    schema_bounds_problem,
    schema_questions,
    schema_source,
)
from schemas.messages import PromptRequest

COMPILE_TIMEOUT_S = 10.0
"""Longest a schema may take to compile (a large valid one takes well under a second)."""
REMEMBERED = 256
"""Verdicts kept, by schema text: agents send the same schema again and again."""
REMEMBERED_BYTES = 16 * 1024 * 1024
"""Most schema text the kept verdicts hold (a schema may be megabytes)."""
_LINE_LIMIT = 64 * 1024 * 1024
"""Longest answer line read (an answer is one sentence; the default 64 KiB is not a bound
worth failing on)."""

log = structlog.get_logger("schema_worker")


class SchemaWorker:
    """Answers whether the grammar can enforce a prompt's schemas, compiling them in a child
    process. One question at a time; ``close()`` ends the child."""

    def __init__(self, timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._verdicts: OrderedDict[str, str] = OrderedDict()
        self._remembered_bytes = 0
        self.restarts = 0
        """Children killed after a crash or an overrun."""

    async def check(self, prompt: PromptRequest) -> None:
        """Raise ``bad_request`` naming the first schema of ``prompt`` the grammar cannot
        enforce: past a bound (named), a feature llguidance lacks, or one that crashed or
        overran the compiler."""
        for question in schema_questions(prompt):
            problem = schema_bounds_problem(question.schema)
            problem = problem or await self.problem(schema_source(question.schema))
            if problem:
                raise question.refusal(problem)

    async def problem(self, source: str) -> str:
        """llguidance's verdict on ``source`` (see ``compile_problem``), from the child."""
        if (verdict := self._verdicts.get(source)) is not None:
            self._verdicts.move_to_end(source)
            return verdict
        async with self._lock:
            verdict = await self._ask(source)
        if source not in self._verdicts:
            self._verdicts[source] = verdict
            self._remembered_bytes += len(source)
        while len(self._verdicts) > REMEMBERED or self._remembered_bytes > REMEMBERED_BYTES:
            self._remembered_bytes -= len(self._verdicts.popitem(last=False)[0])
        return verdict

    async def _ask(self, source: str) -> str:
        proc = await self._child()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(source).encode() + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
        except TimeoutError:
            await self._kill("timeout")
            return f"it took longer than {self.timeout_s:g} s to compile (the limit)"
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:  # the child died on this schema
            code = await self._kill("crash")
            return f"the grammar compiler crashed on it (exit {code})"
        return str(json.loads(line))

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT,
            )
        return self._proc

    async def _kill(self, why: str) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = await proc.wait()
        self.restarts += 1
        log.warning("schema_compiler_killed", why=why, exit_code=code)
        return code

    async def close(self) -> None:
        """End the child: closing its pipe is its signal to exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def main() -> None:
    """The child: one JSON-encoded schema source a line in, its verdict a line out."""
    for line in sys.stdin:
        sys.stdout.write(json.dumps(compile_problem(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
