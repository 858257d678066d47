"""Watch what session runners ask the engine: every ``GenerateRequest`` on the bus."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

from schemas.internal import GenerateRequest


async def engine_requests(nc: Client, node: Any) -> list[GenerateRequest]:
    """A list that fills with each generate request ``node``'s runners send from now on."""
    sent: list[GenerateRequest] = []

    async def seen(msg) -> None:  # type: ignore[no-untyped-def]
        sent.append(GenerateRequest.model_validate_json(msg.data))

    await nc.subscribe(node.subjects.engine_generate(), cb=seen)
    await nc.flush()
    return sent
