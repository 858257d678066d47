"""Record retention limits, and a deleted session leaving nothing behind in any stream or tier."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from actors.bank_committer import BankCommitter
from node.client import InfernodeClient
from schemas.chat import SamplingParams
from schemas.subjects import Subjects

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


async def _subjects_in(nc: Client, stream: str) -> list[str]:
    """The subject of every message a stream holds now, read back from the server."""
    js = nc.jetstream()
    total = (await js.stream_info(stream)).state.messages
    if total == 0:
        return []
    sub = await js.subscribe(">", stream=stream, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        return [(await sub.next_msg(timeout=5)).subject for _ in range(total)]
    finally:
        await sub.unsubscribe()


def _names_in_object_subjects(subjects: list[str]) -> list[str]:
    """Object names behind the store's meta subjects ($O.<bucket>.M.<base64 name>)."""
    names = []
    for subject in subjects:
        parts = subject.split(".")
        if parts[0] == "$O" and parts[2] == "M":
            names.append(base64.urlsafe_b64decode(parts[3]).decode())
    return names


async def test_deleting_a_session_purges_its_records_and_every_bank_tier(make_node, nc, tmp_path):
    """Given two sessions banked in RAM, a directory and the object store, deleting one leaves
    only its delete record in the record stream and none of its snapshots in any tier; the
    other session keeps all of its own."""
    bank_dir = tmp_path / "bank"
    node = await make_node(bank_dir=bank_dir, bank_object_store=True)
    async with InfernodeClient(node.url) as c:
        for session in ("gone", "kept"):
            for text in ("hello", "and again"):
                await c.complete(session, text, sampling=GREEDY, max_tokens=4)
        committer = next(a for a in node.actors if isinstance(a, BankCommitter))
        await committer.wait_handled(4)
        assert node.engine is not None and node.engine.bank is not None
        durable = node.engine.bank.durable
        assert durable is not None
        await asyncio.wrap_future(durable.flush())
        objects_before = _names_in_object_subjects(
            await _subjects_in(nc, S.bank_object_stream))
        assert any(n.startswith("gone/") for n in objects_before)

        await c.delete("gone")
        await asyncio.wrap_future(durable.flush())

    records = await _subjects_in(nc, S.record_stream)
    assert records.count(S.records("gone")) == 1  # the delete record: the durable tombstone
    assert records.count(S.records("kept")) > 1
    objects = _names_in_object_subjects(await _subjects_in(nc, S.bank_object_stream))
    assert not [n for n in objects if n.startswith("gone/")], objects
    assert [n for n in objects if n.startswith("kept/")]
    assert not list(Path(bank_dir).glob("gone*/**/*")) and list(Path(bank_dir).glob("kept*/*"))
    assert node.engine.bank.session_entries("gone") == []
    assert node.engine.bank.session_entries("kept")


async def test_records_stream_has_no_limit_by_default_and_takes_the_configured_ones(
    make_node, nc
):
    """Given no retention flags the record stream is unlimited; --records-max-age/-bytes set
    its age and size limits, and an over-full stream drops its oldest records first."""
    await make_node(fresh_server=False)
    info = await nc.jetstream().stream_info(S.record_stream)
    assert (info.config.max_age or 0) == 0 and info.config.max_bytes in (None, -1)

    node = await make_node(fresh_server=True, records_max_age=3600.0, records_max_bytes=4096)
    async with InfernodeClient(node.url) as c:
        limited = await c.nc.jetstream().stream_info(S.record_stream)
        assert limited.config.max_age == 3600.0 and limited.config.max_bytes == 4096
        for n in range(6):
            await c.complete("long", f"message number {n} " * 8, sampling=GREEDY, max_tokens=4)
        state = (await c.nc.jetstream().stream_info(S.record_stream)).state
    assert state.bytes <= 4096 and state.first_seq > 1
