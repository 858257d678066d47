"""Documented command lines run verbatim with bash, ``nats`` being tests/nats_cli.py."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def run_bash(line: str, url: str, tmp_path: Path) -> tuple[int, str, str]:
    """Run one README line with bash, verbatim; ``nats`` is tests/nats_cli.py on NATS_URL."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "nats"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.nats_cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NATS_URL": url,
           "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", line, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()
