"""JetStream assets the node needs: prompt intake (and the empty stream it sources), the record
log, and the deployment's secret that seals asks."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from actors.intake_marks import MARK_AGE_S
from actors.replicas import changed, keep_replicas, placing
from schemas.subjects import ANSWER_SEAL_KEY, Subjects

DUPLICATE_WINDOW_S = 120.0
"""How long JetStream remembers a record's ``Nats-Msg-Id`` to drop a retried append."""
INTAKE_DUPLICATE_WINDOW_S = 0.0
"""None: JetStream's de-duplication is stream-wide, so on the intake it would drop agent B's
prompt for carrying the ``Nats-Msg-Id`` agent A used (even within its 100 ms minimum). Each
session runner de-duplicates by idempotency key within its own session instead. JetStream
keeps a zero window only on a stream with a source, so the intake sources an empty stream
(``Subjects.intake_origin_stream``)."""


INTAKE_MAX_PROMPTS = 100_000
"""Prompts the intake stream holds before it refuses new publishes (nothing is dropped)."""
INTAKE_MAX_BYTES = 1 << 30
PARTITIONS = 16
"""Partitions sessions are spread over (each owned by one node at a time)."""
LEGACY_CONSUMER = "admission"
"""The one intake consumer of versions before partitions (it pulled every prompt)."""


class PartitionCountError(ValueError):
    """The intake stream was made for another number of partitions."""


async def ensure_streams(
    js: JetStreamContext,
    subjects: Subjects,
    max_msg_bytes: int,
    intake_max_prompts: int = INTAKE_MAX_PROMPTS,
    intake_max_bytes: int = INTAKE_MAX_BYTES,
    records_max_age: float = 0.0,
    records_max_bytes: int = 0,
    partitions: int = PARTITIONS,
    replicas: int = 1,
) -> None:
    """Create (or update) the intake and record streams and the marks of the prompts in
    admission's hands (``actors.intake_marks``), each with ``replicas`` copies.

    The intake stores each prompt under its session's partition (a subject transform the
    server applies), so each partition's prompts have their own consumer, pulled by the
    partition's owner only; admission makes those consumers. Every node of a cluster must
    use the same number of partitions: a different one is refused, not applied. The intake
    drops no ``Nats-Msg-Id`` as a duplicate (see ``INTAKE_DUPLICATE_WINDOW_S``).

    The intake is bounded: when admission falls that far behind, JetStream refuses the
    publish (the agent sees the error and may retry) instead of growing without end. The
    record log keeps everything unless the operator sets an age or size (0 = no limit);
    past a limit JetStream drops the oldest records. A stream made with another replica
    count is updated to this one (a ReplicasError where the servers cannot place it).
    """
    source, dest = subjects.intake_transform(partitions)
    origin = StreamConfig(
        name=subjects.intake_origin_stream,
        subjects=[subjects.intake_origin()],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs=1,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
    )
    intake = StreamConfig(
        name=subjects.prompt_stream,
        subjects=[subjects.prompt_all()],
        sources=[StreamSource(name=subjects.intake_origin_stream)],
        subject_transform=SubjectTransform(src=source, dest=dest),
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=INTAKE_DUPLICATE_WINDOW_S,
        max_msg_size=max_msg_bytes,
        max_msgs=intake_max_prompts,
        max_bytes=intake_max_bytes,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
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
        num_replicas=replicas,
    )
    marks = StreamConfig(
        name=subjects.intake_marks_stream,
        subjects=[subjects.intake_mark_all()],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs_per_subject=1,
        max_age=MARK_AGE_S,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )
    for config in (origin, intake, records, marks):
        async with placing(f"the stream {config.name}", replicas):
            try:
                info = await js.stream_info(config.name)  # type: ignore[arg-type]
            except NotFoundError:
                await js.add_stream(config)
                continue
            if config is intake:
                await _check_partitions(js, info.config, config)
            await js.update_stream(config)
        if (info.config.num_replicas or 1) != replicas:
            changed(f"the stream {config.name}", config.name or "", info.config.num_replicas or 1,
                    replicas)


async def _check_partitions(js: JetStreamContext, have: StreamConfig, want: StreamConfig) -> None:
    """Refuse another partition count; drop the consumer of a version before partitions."""
    transform = have.subject_transform
    if transform is not None and want.subject_transform is not None and (
        transform.dest != want.subject_transform.dest
    ):
        raise PartitionCountError(
            f"the intake stream {have.name} stores prompts as {transform.dest!r}, not "
            f"{want.subject_transform.dest!r}: every node on this NATS must use the same "
            "--partitions"
        )
    if transform is None:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(have.name or "", LEGACY_CONSUMER)


SEAL_SECRET_BYTES = 32
"""Size of the secret that seals asks (``actors.seal``): an HMAC-SHA256 key."""
SEAL_SECRET_WAIT_S = 30.0
SEAL_SECRET_RETRY_S = 0.5
"""The secret is asked for again every 0.5 s, for up to 30 s, while JetStream cannot answer
(its bucket just changed replica count, or a server of the cluster is electing leaders)."""


async def answer_seal_secret(js: JetStreamContext, subjects: Subjects, replicas: int) -> bytes:
    """The deployment's secret that seals asks, made once by the first node (a create that
    only succeeds where the key is absent, so nodes starting together agree on one) and read
    by every other. It lives in a KV bucket only the node's user may read: agents reach no
    JetStream API under the example permissions and the embedded server's client user."""
    kv = await _secret_bucket(js, subjects, replicas)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SEAL_SECRET_WAIT_S
    while True:
        try:
            return await _read_or_make(kv)
        except (TimeoutError, NoRespondersError, ServiceUnavailableError):
            if loop.time() > deadline:
                raise
        await asyncio.sleep(SEAL_SECRET_RETRY_S)


async def _read_or_make(kv: KeyValue) -> bytes:
    try:
        entry = await kv.get(ANSWER_SEAL_KEY)
    except KeyNotFoundError:
        try:
            made = secrets.token_bytes(SEAL_SECRET_BYTES)
            await kv.create(ANSWER_SEAL_KEY, made)
            return made
        except KeyWrongLastSequenceError:  # another node made it first
            entry = await kv.get(ANSWER_SEAL_KEY)
    assert entry.value, "the seal secret is never stored empty"
    return entry.value


async def _secret_bucket(js: JetStreamContext, subjects: Subjects, replicas: int) -> KeyValue:
    bucket = subjects.secret_bucket
    what = f"the KV bucket {bucket}"
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        async with placing(what, replicas):
            return await js.create_key_value(KeyValueConfig(
                bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas,
            ))
    await keep_replicas(js, subjects.kv_stream(bucket), what, replicas)
    return kv
