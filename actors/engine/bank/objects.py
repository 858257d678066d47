"""A durable bank backend in a JetStream object store (bucket ``Subjects.bank_bucket``).

Each snapshot is two objects: ``<session>/<token hash>.kv`` (the state bytes) and, written
after it, ``<session>/<token hash>.meta`` (metadata and token ids). The index is rebuilt from
the ``.meta`` objects only, and a ``.meta`` exists only once its bytes are stored.

Reads are ``fetch``ed on the event loop before a turn takes its slot, so a slot thread never
waits on the loop. Writes, deletes and the index scan block: they run the client's
coroutines on the loop from the bank's writer thread (or at open), never from the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from actors.engine.bank.meta import SnapshotMeta, meta_from_json, meta_to_json
from actors.replicas import keep_replicas, placing
from schemas.subjects import Subjects

T = TypeVar("T")
CALL_TIMEOUT_S = 120.0
"""Longest one object-store call may take before the bank gives up on it."""


async def open_object_store(
    js: JetStreamContext, bucket: str, replicas: int = 1
) -> ObjectStore:
    """The bank's bucket with ``replicas`` copies, created (file storage) when it does not
    exist yet, updated when it has another count."""
    what = f"the object store {bucket}"
    try:
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        config = ObjectStoreConfig(
            bucket=bucket, description="infernode KV snapshots", storage=StorageType.FILE,
            replicas=replicas,
        )
        async with placing(what, replicas):
            return await js.create_object_store(bucket, config=config)
    await keep_replicas(js, Subjects.object_stream(bucket), what, replicas)
    return store


class ObjectStoreBackend:
    """Snapshots as objects; blocking wrappers over the async client."""

    name = "object_store"
    local = False

    def __init__(
        self, store: ObjectStore, loop: asyncio.AbstractEventLoop, js: JetStreamContext,
        subjects: Subjects,
    ) -> None:
        self.store = store
        self.loop = loop
        self.js = js
        self.subjects = subjects

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError("object-store bank calls block; run them off the event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)

    @staticmethod
    def _names(meta: SnapshotMeta) -> tuple[str, str]:
        base = f"{meta.session}/{meta.token_hash}"
        return f"{base}.kv", f"{base}.meta"

    def write(self, meta: SnapshotMeta, data: bytes) -> None:
        """Bytes first, then the metadata that makes them visible."""
        kv, head = self._names(meta)
        self._call(self.store.put(kv, data))
        self._call(self.store.put(head, meta_to_json(meta)))

    def read(self, meta: SnapshotMeta) -> bytes:
        """Never called: the object store is not local (``fetch`` reads it on the loop)."""
        raise OSError("object-store snapshots are fetched on the event loop, not read")

    async def fetch(self, meta: SnapshotMeta) -> bytes:
        """The state bytes (the client checks the object's digest)."""
        kv, _ = self._names(meta)
        result = await asyncio.wait_for(self.store.get(kv), CALL_TIMEOUT_S)
        data = result.data or b""
        if len(data) != meta.nbytes:
            raise ValueError(f"snapshot object holds {len(data)} bytes, expected {meta.nbytes}")
        return data

    def delete(self, meta: SnapshotMeta) -> None:
        """Metadata first (the snapshot disappears from a rebuilt index), then the bytes.

        The store marks a deleted object with a message naming it (and so its session);
        that marker is purged too, so a deleted snapshot leaves nothing in the stream.
        """
        for name in reversed(self._names(meta)):
            with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                self._call(self.store.delete(name))
            self._call(self.js.purge_stream(
                self.subjects.bank_object_stream, subject=self.subjects.bank_object_meta(name)
            ))

    def scan(self, sessions: frozenset[str] | None = None) -> list[SnapshotMeta]:
        """Metadata of every live snapshot in the bucket (of ``sessions`` only, if given)."""
        try:
            infos = self._call(self.store.list(ignore_deletes=True))
        except NotFoundError:  # an empty bucket
            return []
        found = []
        for info in infos:
            if not info.name.endswith(".meta") or info.deleted:
                continue
            if sessions is not None and info.name.partition("/")[0] not in sessions:
                continue
            raw = self._call(self.store.get(info.name)).data or b""
            try:
                found.append(meta_from_json(raw))
            except ValueError:
                continue
        return found
