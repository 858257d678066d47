"""JetStream streams the node needs: prompt intake and the record log."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from schemas.subjects import Subjects

DUPLICATE_WINDOW_S = 120.0
"""How long JetStream remembers a record's ``Nats-Msg-Id`` to drop a retried append."""
INTAKE_DUPLICATE_WINDOW_S = 0.1
"""JetStream's de-duplication is stream-wide, so on the intake it would drop agent B's prompt
for carrying the ``Nats-Msg-Id`` agent A used. It is kept to the server's minimum there;
each session runner de-duplicates by idempotency key within its own session instead."""


INTAKE_MAX_PROMPTS = 100_000
"""Prompts the intake stream holds before it refuses new publishes (nothing is dropped)."""
INTAKE_MAX_BYTES = 1 << 30


async def ensure_streams(
    js: JetStreamContext,
    subjects: Subjects,
    max_msg_bytes: int,
    intake_max_prompts: int = INTAKE_MAX_PROMPTS,
    intake_max_bytes: int = INTAKE_MAX_BYTES,
    records_max_age: float = 0.0,
    records_max_bytes: int = 0,
) -> None:
    """Create (or update) the intake and record streams and admission's consumer.

    The intake is bounded: when admission falls that far behind, JetStream refuses the
    publish (the agent sees the error and may retry) instead of growing without end. The
    record log keeps everything unless the operator sets an age or size (0 = no limit);
    past a limit JetStream drops the oldest records.
    """
    intake = StreamConfig(
        name=subjects.prompt_stream,
        subjects=[subjects.prompt_all()],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=INTAKE_DUPLICATE_WINDOW_S,
        max_msg_size=max_msg_bytes,
        max_msgs=intake_max_prompts,
        max_bytes=intake_max_bytes,
        discard=DiscardPolicy.NEW,
    )
    records = StreamConfig(
        name=subjects.record_stream,
        subjects=[subjects.records_all()],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=max_msg_bytes,
        max_age=records_max_age,
        max_bytes=records_max_bytes or -1,
        discard=DiscardPolicy.OLD,
    )
    for config in (intake, records):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
    await js.add_consumer(
        subjects.prompt_stream,
        ConsumerConfig(
            durable_name=subjects.admission_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=1024,
            filter_subject=subjects.prompt_all(),
        ),
    )
