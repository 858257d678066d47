"""`infernode up` as a child process, and the command line that runs the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

from tests.helpers import EventCollector

def cli_argv(*args: str) -> list[str]:
    """The command line that runs ``infernode <args>`` on this Python."""
    return [sys.executable, "-m", "node.cli", *args]


# Without a terminal `up` logs JSON: its ready line is the `up_ready` event.
READY = re.compile(r'"event": "up_ready"')


class NodeProcess:
    """`infernode up` as a child process; its output is read continuously (never blocks it)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._seen = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def up(cls, url: str, data_dir: Path, model: Path, *flags: str) -> NodeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
        env["INFERNODE_THREADS"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node.cli", "up", "--nats-url", url, "--data-dir",
            str(data_dir), "--model", str(model), *flags, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        node = cls(proc)
        await node.wait_for_line(READY, timeout=120)
        return node

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            async with self._seen:
                self.lines.append(line.decode(errors="replace"))
                self._seen.notify_all()

    async def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> None:
        async with self._seen:
            try:
                await asyncio.wait_for(self._seen.wait_for(
                    lambda: any(pattern.search(x) for x in self.lines)), timeout)
            except TimeoutError:
                raise AssertionError(f"no {pattern.pattern!r} line: {self.lines[-20:]}") from None

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._reader

    async def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._reader


def kinds(events: EventCollector, kind: str) -> list[dict]:
    return [json.loads(m.data) for m in events.messages if m.subject.endswith("." + kind)]
