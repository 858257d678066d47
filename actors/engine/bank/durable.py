"""The bank's durable tier: committed snapshots in a directory and/or a JetStream object store.

Writes and deletes run in order on one long-lived writer thread, never on the event loop and
never on a slot thread (a turn must not wait for a disk). Reads run on the slot thread that
restores. The index (metadata and token ids of every snapshot, no bytes) lives in memory and
is rebuilt from the backends when the node starts, so a restarted node restores old sessions.
A snapshot is written whole or not at all (temporary name, then rename), so a node killed
mid-write leaves nothing half-written to restore. Each carries a checksum (set on the writer
thread from the bytes in RAM), checked before it is restored; one that fails is discarded.
Snapshot files hold whole conversations as token ids: they are the user's only (0600, in
0700 directories).

The tier holds at most ``max_bytes``: past it, the least recently used snapshots are deleted
(a restore counts as a use; after a restart the write time stands in for the last use).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import structlog

from actors.engine.bank.domains import ISOLATED, ShareGroups
from actors.engine.bank.meta import SnapshotMeta, meta_from_json, meta_to_json, sealed
from actors.engine.bank.prefix import PrefixIndex
from schemas.subjects import is_session_id

log = structlog.get_logger("bank_durable")

MAGIC = b"INFKV001"
"""First bytes of a snapshot file: format and version."""
_HEADER = struct.Struct("<8sI")
_Job = tuple[Callable[[], None], "concurrent.futures.Future[None]"]
_STOP = None
_HEX = re.compile(r"[0-9a-f]{64}")


class DurableBackend(Protocol):
    """Where durable snapshots live.

    ``fetch`` runs on the event loop; every other method blocks and runs on the bank's writer
    thread (or, for a ``local`` backend's ``read``, on a slot thread), never on the loop.
    """

    name: str
    local: bool
    """True when ``read`` touches only this machine (a slot thread may call it)."""

    def write(self, meta: SnapshotMeta, data: bytes) -> None:
        """Store one snapshot whole."""

    def read(self, meta: SnapshotMeta) -> bytes:
        """The bytes of one snapshot (blocking; only called on a ``local`` backend)."""

    async def fetch(self, meta: SnapshotMeta) -> bytes:
        """The bytes of one snapshot, on the event loop."""

    def delete(self, meta: SnapshotMeta) -> None:
        """Remove one snapshot (absent is fine)."""

    def scan(self, sessions: frozenset[str] | None = None) -> list[SnapshotMeta]:
        """Metadata of every stored snapshot (of ``sessions`` only, when given)."""


class DirectoryBackend:
    """One file per snapshot: ``<dir>/<session>/<token hash>.kv`` (header, metadata, bytes)."""

    name = "dir"
    local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, meta: SnapshotMeta) -> Path:
        if not is_session_id(meta.session) or not _HEX.fullmatch(meta.token_hash):
            raise ValueError(f"refusing a snapshot path for {meta.session[:64]!r}")
        return self.root / meta.session / f"{meta.token_hash}.kv"

    def write(self, meta: SnapshotMeta, data: bytes) -> None:
        """Write to a temporary name, fsync, then rename into place."""
        path = self._path(meta)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.parent.chmod(0o700)  # also one an older version made readable to all
        head = meta_to_json(meta)
        tmp = path.with_suffix(".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(MAGIC, len(head)))
            f.write(head)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def read(self, meta: SnapshotMeta) -> bytes:
        """The state bytes after the header; checks the size."""
        with self._path(meta).open("rb") as f:
            _, head_len = _HEADER.unpack(f.read(_HEADER.size))
            f.seek(head_len, os.SEEK_CUR)
            data = f.read()
        if len(data) != meta.nbytes:
            raise ValueError(f"snapshot file holds {len(data)} bytes, expected {meta.nbytes}")
        return data

    async def fetch(self, meta: SnapshotMeta) -> bytes:
        """``read`` on a worker thread, for the event loop."""
        return await asyncio.to_thread(self.read, meta)

    def delete(self, meta: SnapshotMeta) -> None:
        """Remove the file and, when empty, the session's directory."""
        path = self._path(meta)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other snapshots of the session remain
            path.parent.rmdir()

    def scan(self, sessions: frozenset[str] | None = None) -> list[SnapshotMeta]:
        """Read the header of every snapshot file; skip (and log) what is not one."""
        found: list[SnapshotMeta] = []
        for path in sorted(self.root.glob("*/*.kv")):
            if sessions is not None and path.parent.name not in sessions:
                continue
            try:
                with path.open("rb") as f:
                    magic, head_len = _HEADER.unpack(f.read(_HEADER.size))
                    if magic != MAGIC:
                        raise ValueError("unknown format")
                    found.append(meta_from_json(f.read(head_len)))
            except (OSError, ValueError, struct.error) as e:
                log.warning("bank_file_skipped", path=str(path), error=str(e))
        for stale in self.root.glob("*/*.part"):  # left by a node killed mid-write
            stale.unlink(missing_ok=True)
        return found


class DurableTier:
    """The index over one or more backends, and the thread that writes to them."""

    def __init__(
        self, backends: list[DurableBackend], max_bytes: int = 0, groups: ShareGroups = ISOLATED
    ) -> None:
        if not backends:
            raise ValueError("a durable tier needs at least one backend")
        self.backends = backends
        self.max_bytes = max_bytes
        """Byte cap over every snapshot; 0 means none."""
        self.evictions = 0
        self._index: dict[str, dict[str, SnapshotMeta]] = {}
        self.prefixes = PrefixIndex(groups)
        """The same snapshots by the token blocks they begin with (shared across the sessions
        of one trust domain)."""
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bank-writer", daemon=True)
        self._closed = False
        self.written = 0
        self.write_failures = 0
        self.bytes_written = 0
        self.loads = 0
        self._thread.start()

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the backends, e.g. ('dir', 'object_store')."""
        return tuple(b.name for b in self.backends)

    # -- index ----------------------------------------------------------------------------
    def open(self, sessions: frozenset[str] | None = None) -> int:
        """Rebuild the index from every backend (blocking); returns the snapshots known.

        With ``sessions``, add only theirs: sessions that moved here from another node,
        whose snapshots that node banked after this one opened the tier.
        """
        # Scanned before the lock is taken: an object store's scan waits on the event loop,
        # where turns and metrics take this lock, so holding it here would freeze the loop.
        found = [meta for backend in self.backends for meta in backend.scan(sessions)]
        with self._lock:
            for meta in found:  # a snapshot indexed meanwhile (written here) is kept as is
                mine = self._index.setdefault(meta.session, {})
                if meta.token_hash not in mine:
                    mine[meta.token_hash] = meta
                    self.prefixes.add(meta)
        for meta in self._over_cap():  # a node restarted with a smaller cap
            self._delete(meta)
        with self._lock:
            n = sum(len(v) for v in self._index.values())
        log.info("bank_durable_opened", backends=self.names, snapshots=n)
        return n

    @property
    def readable_here(self) -> bool:
        """True when a slot thread may ``load`` snapshots (some backend is local)."""
        return any(b.local for b in self.backends)

    def entries(self, session: str) -> list[SnapshotMeta]:
        """Metadata of the session's durable snapshots."""
        with self._lock:
            return list(self._index.get(session, {}).values())

    # -- reads ----------------------------------------------------------------------------
    def load(self, meta: SnapshotMeta) -> bytes:
        """The bytes of a snapshot from the first local backend that has them (blocking).

        Only local backends are read here: this runs on a slot thread, which must never wait
        on the event loop (a remote snapshot is ``fetch``ed before the slot is taken).
        """
        local = [b for b in self.backends if b.local]
        if not local:
            raise OSError(f"snapshot {meta.token_hash[:12]} is remote and was not fetched")
        errors: list[str] = []
        for backend in local:
            with _noted(backend, errors):
                return self._loaded(backend.read(meta))
        raise self._unreadable(meta, errors)

    async def fetch(self, meta: SnapshotMeta) -> bytes:
        """The bytes of a snapshot from the first backend that has them, on the event loop."""
        errors: list[str] = []
        for backend in self.backends:
            with _noted(backend, errors):
                return self._loaded(await backend.fetch(meta))
        raise self._unreadable(meta, errors)

    def _loaded(self, data: bytes) -> bytes:
        self.loads += 1
        return data

    def _unreadable(self, meta: SnapshotMeta, errors: list[str]) -> OSError:
        with self._lock:  # unreadable everywhere: forget it rather than fail again
            self._index.get(meta.session, {}).pop(meta.token_hash, None)
            self.prefixes.remove(meta)
        return OSError(f"snapshot {meta.token_hash[:12]} unreadable: {'; '.join(errors)}")

    def discard(self, meta: SnapshotMeta) -> concurrent.futures.Future[None]:
        """Forget one snapshot and delete it from every backend (it failed its checksum)."""
        with self._lock:
            mine = self._index.get(meta.session, {})
            if mine.get(meta.token_hash) is meta:
                del mine[meta.token_hash]
                if not mine:
                    self._index.pop(meta.session, None)
                self.prefixes.remove(meta)
        return self._submit(lambda: self._delete(meta))

    # -- writes (on the writer thread) ----------------------------------------------------
    def persist(self, meta: SnapshotMeta, data: bytes) -> concurrent.futures.Future[None]:
        """Queue a write; it joins the index once every backend has it.

        A snapshot larger than the whole cap is never written (it would evict everything and
        then itself).
        """
        if self.max_bytes and len(data) > self.max_bytes:
            log.warning("bank_durable_too_large", session=meta.session, nbytes=len(data),
                        max_bytes=self.max_bytes)
            fut: concurrent.futures.Future[None] = concurrent.futures.Future()
            fut.set_result(None)
            return fut
        return self._submit(lambda: self._write(sealed(meta, data), data))

    def forget(self, session: str) -> concurrent.futures.Future[None]:
        """Drop a session's snapshots (after any write already queued for it)."""
        with self._lock:
            known = list(self._index.pop(session, {}).values())
            for meta in known:
                self.prefixes.remove(meta)
        return self._submit(lambda: self._forget(session, known))

    def flush(self) -> concurrent.futures.Future[None]:
        """Resolves once every job queued so far is done."""
        return self._submit(lambda: None)

    def close(self, timeout: float = 60.0) -> None:
        """Finish queued writes, then end the writer thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counters of the tier."""
        with self._lock:
            metas = [m for v in self._index.values() for m in v.values()]
        return {
            "entries": len(metas), "bytes": sum(m.nbytes for m in metas),
            "written": self.written, "write_failures": self.write_failures,
            "loads": self.loads, "evictions": self.evictions, "max_bytes": self.max_bytes,
        }

    def _submit(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._closed:
            fut.set_exception(RuntimeError("the durable bank tier is closed"))
        else:
            self._jobs.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, fut = job
            try:
                fn()
            except Exception as e:  # handed to whoever waits; the writer keeps going
                fut.set_exception(e)
            else:
                fut.set_result(None)

    def _write(self, meta: SnapshotMeta, data: bytes) -> None:
        # The same tokens' state made durable by another session is written again, under
        # this session: deleting that session (a purge of all it owns) must never take this
        # one's state. Only identical whole histories repeat; shared prefixes do not (each
        # state is its session's own sequence).
        with self._lock:
            if meta.token_hash in self._index.get(meta.session, {}):
                return
        try:
            for backend in self.backends:
                backend.write(meta, data)
        except Exception as e:
            self.write_failures += 1
            log.warning("bank_durable_write_failed", session=meta.session, error=str(e))
            raise
        with self._lock:
            mine = self._index.setdefault(meta.session, {})
            superseded = [
                m for m in mine.values()
                if len(m.tokens) < len(meta.tokens) and meta.tokens[: len(m.tokens)] == m.tokens
            ]
            for m in superseded:
                mine.pop(m.token_hash, None)
                self.prefixes.remove(m)
            mine[meta.token_hash] = meta
            self.prefixes.add(meta)
        self.written += 1
        self.bytes_written += len(data)
        for m in superseded:
            self._delete(m)
        for m in self._over_cap(keep=meta):
            self._delete(m)
        log.debug("bank_durable_written", session=meta.session, tokens=len(meta.tokens),
                  nbytes=len(data), dropped=len(superseded))

    def _over_cap(self, keep: SnapshotMeta | None = None) -> list[SnapshotMeta]:
        """Take the least recently used snapshots out of the index until the rest fit."""
        if not self.max_bytes:
            return []
        with self._lock:
            metas = [m for v in self._index.values() for m in v.values()]
            total = sum(m.nbytes for m in metas)
            victims = []
            for m in sorted(metas, key=lambda m: m.last_access):
                if total <= self.max_bytes:
                    break
                if m is keep:
                    continue
                mine = self._index.get(m.session, {})
                mine.pop(m.token_hash, None)
                self.prefixes.remove(m)
                if not mine:
                    self._index.pop(m.session, None)
                total -= m.nbytes
                victims.append(m)
            self.evictions += len(victims)
        return victims

    def _forget(self, session: str, known: list[SnapshotMeta]) -> None:
        with self._lock:  # written by jobs queued before the forget
            later = list(self._index.pop(session, {}).values())
            for meta in later:
                self.prefixes.remove(meta)
        for meta in {m.token_hash: m for m in [*known, *later]}.values():
            self._delete(meta)

    def _delete(self, meta: SnapshotMeta) -> None:
        for backend in self.backends:
            try:
                backend.delete(meta)
            except Exception as e:
                log.warning("bank_durable_delete_failed", backend=backend.name, error=str(e))


@contextlib.contextmanager
def _noted(backend: DurableBackend, errors: list[str]) -> Iterator[None]:
    """Note a backend's failure to read and go on to the next one."""
    try:
        yield
    except Exception as e:
        errors.append(f"{backend.name}: {e}")
