"""A small relay mesh: a ring of agents, each with its own session, passing a thought on.

Agent ``i`` owns session ``<name>-i``. A hop is one prompt to agent ``i``'s session with
``relay_to`` naming agent ``i+1``'s: agent ``i`` answers, and the node itself delivers that
answer as a prompt to agent ``i+1`` (which granted relays from agent ``i`` first), which
answers in turn. The next agent then takes the next hop. Every answer is printed with who
said it. A hop whose turn fails (an ``error`` event on either session) ends the run at once,
naming the hop and the node's reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from node.client import InfernodeClient
from schemas.chat import ChatMessage
from schemas.errors import InferError
from schemas.messages import DoneEvent, ErrorEvent, PromptRequest
from schemas.subjects import EventKind

Say = Callable[[str], None]


@dataclass
class MeshReport:
    """What the ring did."""

    hops: int = 0
    answers: list[tuple[str, str]] = field(default_factory=list)
    """(session, text) of every answer, in the order they finished."""


async def run_mesh(
    client: InfernodeClient,
    agents: int = 3,
    rounds: int = 1,
    name: str = "mesh",
    max_tokens: int = 24,
    say: Say = print,
    timeout: float = 300.0,
) -> MeshReport:
    """Run ``rounds`` trips around a ring of ``agents``; returns every answer seen."""
    if agents < 2:
        raise ValueError("a mesh needs at least 2 agents")
    sessions = [f"{name}-{i}" for i in range(agents)]
    report = MeshReport()
    # A queue per session: nats-py runs each subscription's callbacks on its own task, so
    # answers of different sessions may arrive in any order; each hop reads only its own.
    answered: dict[str, asyncio.Queue[DoneEvent | ErrorEvent]] = {
        s: asyncio.Queue() for s in sessions
    }
    hop = {"name": ""}

    async def on_event(msg: Msg) -> None:
        session, kind = client.subjects.event_of(msg.subject)
        if kind == EventKind.DONE.value:
            answered[session].put_nowait(DoneEvent.model_validate_json(msg.data))
        elif kind == EventKind.ERROR.value:
            answered[session].put_nowait(ErrorEvent.model_validate_json(msg.data))

    # Each agent lets its ring predecessor's answers in: nothing else can relay to it.
    for i, session in enumerate(sessions):
        await client.accept_relays(session, [sessions[i - 1]])
    # One subscription per session, so its done and error events keep their order.
    subs = [
        await client.nc.subscribe(client.subjects.events_all(s), cb=on_event) for s in sessions
    ]

    async def next_answer(session: str) -> str:
        done = await asyncio.wait_for(answered[session].get(), timeout)
        if isinstance(done, ErrorEvent):
            raise InferError(
                done.code, f"{hop['name']} failed: {session} answered {done.code.value} "
                f"({done.status}): {done.message}", done.details,
            )
        report.answers.append((session, done.text))
        say(f"{session}: {done.text.strip()!r}")
        return done.text

    try:
        text = "Start a story about a lighthouse, one sentence."
        for r in range(rounds):
            for i, session in enumerate(sessions):
                target = sessions[(i + 1) % agents]
                hop["name"] = f"hop {report.hops + 1} (round {r + 1}, {session} -> {target})"
                say(f"--- round {r + 1}, {session} -> {target}")
                await _send(client, session, text, target, max_tokens)
                await next_answer(session)
                text = await next_answer(target)
                report.hops += 1
                text = f"Continue the story: {text.strip()[:200]}"
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return report


async def _send(
    client: InfernodeClient, session: str, text: str, relay_to: str, max_tokens: int
) -> None:
    await client.send(
        session,
        PromptRequest(
            messages=(ChatMessage(role="user", content=text),),
            relay_to=relay_to,
            max_tokens=max_tokens,
        ),
    )
