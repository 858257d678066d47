"""Wire models are strict: a value of the wrong JSON type is refused, never coerced.

A prompt with ``max_tokens: "10"``, ``max_tokens: true``, ``reply: "yes"`` or
``expect_generation: "0"`` gets one ``bad_request`` (400) error event whose sentence names
the field, and nothing is recorded.
"""

from __future__ import annotations

import json

import pytest

from schemas.subjects import Subjects
from tests.fake_engine import FakeNode
from tests.helpers import EventCollector

S = Subjects()
WRONG_TYPES = {
    "max_tokens_string": ("max_tokens", "10"),
    "max_tokens_bool": ("max_tokens", True),
    "reply_string": ("reply", "yes"),
    "expect_generation_string": ("expect_generation", "0"),
    "temperature_string": ("sampling", {"temperature": "0.5"}),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
async def test_wire_models_refuse_coerced_types_with_400_naming_the_field(nats_server, nc, case):
    """A field of the wrong JSON type gets 400 naming it; nothing is recorded."""
    field, value = WRONG_TYPES[case]
    session = f"strict-{case.replace('_', '-')}"
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        errors = await EventCollector.start(nc, S.events(session, "error"))
        await nc.jetstream().publish(S.prompt(session), json.dumps(body).encode())
        (msg,) = await errors.wait_until(lambda ms: len(ms) >= 1)
        event = json.loads(msg.data)
        assert (event["code"], event["status"]) == ("bad_request", 400)
        assert field in event["message"], event["message"]
        assert session not in node.host.runners, "a coerced prompt created a session"
