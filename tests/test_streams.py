"""The JetStream streams: a bounded intake refuses publishes when full, and drops nothing."""

from __future__ import annotations

import pytest
from nats.js.errors import APIError

from node.streams import ensure_streams
from schemas.subjects import Subjects

S = Subjects()


async def test_a_full_intake_refuses_the_next_publish_and_keeps_what_it_holds(nc):
    """Given an intake bounded to 3 prompts and no admission pulling, the 4th publish is
    refused with an error the agent sees, and the first three stay in the stream."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20, intake_max_prompts=3)
    for i in range(3):
        await js.publish(S.prompt(f"s{i}"), b"{}")
    with pytest.raises(APIError) as refused:
        await js.publish(S.prompt("s3"), b"{}")
    assert "maximum messages" in str(refused.value).lower()
    info = await js.stream_info(S.prompt_stream)
    assert info.state.messages == 3


async def test_ensure_streams_is_idempotent_and_updates_the_bound(nc):
    """Given streams made once, making them again with a larger bound updates them in place."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20, intake_max_prompts=2)
    await js.publish(S.prompt("a"), b"{}")
    await ensure_streams(js, S, 1 << 20, intake_max_prompts=10)
    info = await js.stream_info(S.prompt_stream)
    assert info.config.max_msgs == 10 and info.state.messages == 1
