"""The embedded nats-server and node connections to it: free port, JetStream, stop, failures."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import nats
import psutil
import pytest
from nats.js.api import StreamConfig
from structlog.testing import capture_logs

from node.bus import BusError, connect
from node.config import NodeConfig
from node.nats_server import (
    LOCK_FILE,
    PID_FILE,
    EmbeddedNats,
    NatsServerError,
    find_nats_server,
    servers_on_store,
)
from tests.helpers import LineReader, stop_child, until


def test_binary_from_the_wheel_is_found_and_executable():
    """find_nats_server returns an executable file."""
    binary = find_nats_server()
    assert binary.is_file() and os.access(binary, os.X_OK)


async def test_server_reports_its_own_free_port_and_accepts_clients(nats_server):
    """The URL carries the port the server chose, and a client can round-trip on it."""
    assert nats_server.running and nats_server.port and nats_server.port > 0
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"pong"
    finally:
        await nc.drain()


async def test_jetstream_stream_acks_a_published_message(nc):
    """JetStream is on: a stream can be created and a publish is acknowledged."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
    ack = await js.publish("t.one", b"hello")
    assert ack.stream == "T" and ack.seq == 1
    stored = await js.get_msg("T", 1)
    assert stored.data == b"hello"


async def test_two_servers_started_together_get_different_ports(tmp_path):
    """Servers launched concurrently never collide on a port."""
    a, b = EmbeddedNats(tmp_path / "a"), EmbeddedNats(tmp_path / "b")
    try:
        await asyncio.gather(a.start(), b.start())
        assert a.port != b.port
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_jetstream_data_survives_a_restart_in_the_same_directory(tmp_path):
    """A stream and its messages are still there after the server restarts on its data dir."""
    async with EmbeddedNats(tmp_path / "nats") as first:
        nc = await nats.connect(first.url)
        await nc.jetstream().add_stream(StreamConfig(name="KEEP", subjects=["keep.>"]))
        await nc.jetstream().publish("keep.it", b"still here")
        await nc.drain()
    assert (tmp_path / "nats" / "jetstream").is_dir()
    async with EmbeddedNats(tmp_path / "nats") as second:
        nc = await nats.connect(second.url)
        stored = await nc.jetstream().get_msg("KEEP", 1)
        await nc.drain()
    assert stored.data == b"still here"


async def test_stop_is_clean_and_idempotent(tmp_path):
    """stop() ends the process with status 0 and can be called again harmlessly."""
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    pid = server.pid
    await server.stop()
    await server.stop()
    assert not server.running and server.pid is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert any("Server Exiting" in line for line in server.output)


async def test_stop_before_start_does_nothing(tmp_path):
    """A server that never started can be stopped."""
    await EmbeddedNats(tmp_path / "nats").stop()


async def test_url_before_start_raises_a_clear_error(tmp_path):
    """Asking for the URL of a server that is not running says to start it."""
    with pytest.raises(NatsServerError, match="start"):
        _ = EmbeddedNats(tmp_path / "nats").url


async def test_bad_config_file_raises_with_the_server_output(tmp_path):
    """A config file nats-server cannot parse gives NatsServerError quoting the server."""
    bad = tmp_path / "bad.conf"
    bad.write_text("port: [oops\n")
    server = EmbeddedNats(tmp_path / "nats", config_file=bad)
    with pytest.raises(NatsServerError) as info:
        await server.start()
    message = str(info.value)
    assert "exited with status" in message and "before it was ready" in message
    assert "Parse error" in message or "error" in message.lower()
    assert info.value.output
    assert not server.running


async def test_missing_binary_raises_a_clear_error(tmp_path):
    """A binary path that does not exist is refused with the path in the message."""
    server = EmbeddedNats(tmp_path / "nats", binary=tmp_path / "no-such-nats-server")
    with pytest.raises(NatsServerError, match="no-such-nats-server"):
        await server.start()


async def test_max_payload_is_applied_and_the_user_config_is_included(tmp_path):
    """max_payload reaches clients, and the user's config file is still honoured."""
    user_conf = tmp_path / "conf" / "user.conf"
    user_conf.parent.mkdir()
    user_conf.write_text("server_name: from_user_config\n")
    payload = 3 * 1024 * 1024
    async with EmbeddedNats(
        tmp_path / "nats", config_file=user_conf, max_payload=payload
    ) as server:
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == payload
        finally:
            await nc.drain()
    assert any("from_user_config" in line for line in server.output)


async def test_unexpected_exit_is_logged(tmp_path):
    """A server killed from outside is noticed and logged as nats_server_exited."""
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    with capture_logs() as logs:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        code = await asyncio.wait_for(server.wait(), 10)
    await server.stop()
    assert code == -signal.SIGKILL
    assert any(e["event"] == "nats_server_exited" for e in logs)


async def test_data_dir_is_created(tmp_path: Path):
    """A data directory that does not exist yet is created."""
    target = tmp_path / "deep" / "er" / "nats"
    async with EmbeddedNats(target):
        assert target.is_dir()


async def test_server_not_ready_before_the_deadline_is_stopped_and_reported(tmp_path):
    """A ready deadline that passes stops the process and says how long it waited."""
    server = EmbeddedNats(tmp_path / "nats", ready_timeout=0.001)
    with pytest.raises(NatsServerError, match="did not report ready within"):
        await server.start()
    assert not server.running


async def test_bus_connect_uses_the_node_options(nats_server):
    """node.bus.connect reaches the server with the configured client name."""
    nc = await connect(NodeConfig(), nats_server.url, "infernode-test")
    try:
        assert nc.is_connected and nc.options["name"] == "infernode-test"
        assert nc.options["max_reconnect_attempts"] == -1
    finally:
        await nc.drain()


async def test_bus_connect_to_a_stopped_server_raises_bus_error_with_a_fix(tmp_path):
    """An unreachable URL gives BusError naming the URL and how to get a server."""
    async with EmbeddedNats(tmp_path / "nats") as server:
        url = server.url
    with pytest.raises(BusError) as info:
        await connect(NodeConfig(), url, "infernode-test", timeout=1.0)
    message = str(info.value)
    assert f"cannot reach NATS at {url}" in message
    assert "infernode up" in message and "--nats-url" in message


async def test_server_error_lines_are_logged_at_error_level(nats_server: EmbeddedNats):
    """Given a client that sends a malformed CONNECT, the server's [ERR] line is logged as error."""
    from tests.helpers import until

    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
        await reader.readline()  # INFO
        writer.write(b"CONNECT {bad\r\n")
        await writer.drain()
        await reader.read()  # the server closes the connection after logging why
        writer.close()
        await until(lambda: any(e["event"] == "nats_server_log" for e in logs), 10,
                    "the [ERR] line")
    (line,) = [e for e in logs if e["event"] == "nats_server_log"]
    assert line["log_level"] == "error" and "[ERR]" in line["line"]


async def test_a_port_in_use_makes_the_server_pick_another_and_say_so(tmp_path: Path):
    """Given the wanted port held by another listener, the server takes a free one and logs why;
    without the fallback the start fails with the server's own reason."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        wanted = holder.getsockname()[1]
        with pytest.raises(NatsServerError, match="exited"):
            await EmbeddedNats(tmp_path / "strict", port=wanted).start()
        with capture_logs() as logs:
            async with EmbeddedNats(tmp_path / "any", port=wanted, any_port_if_taken=True) as s:
                assert s.port not in (None, wanted) and s.port_taken == wanted
                client = await nats.connect(s.url)
                await client.close()
    (said,) = [e for e in logs if e["event"] == "nats_port_taken"]
    assert said["log_level"] == "warning" and said["url"] == s.url and str(wanted) in said["hint"]


async def test_a_node_built_in_code_leaves_port_4222_to_infernode_up(tmp_path, tiny_model):
    """Only `infernode up` asks for NATS's default port. A node a program or a test builds
    takes a free port, so a second node's actors never join a bus at 4222 that another
    process (an `infernode up`, a reconnecting client) expects to be alone on."""
    from node.app import Node
    from node.config import NodeConfig
    from node.nats_server import DEFAULT_PORT

    async with Node(NodeConfig(data_dir=tmp_path, model=tiny_model, engine="ctransformers",
                               threads=1)) as node:
        assert node.url != f"nats://127.0.0.1:{DEFAULT_PORT}"
    async with Node(NodeConfig(data_dir=tmp_path / "asked", model=tiny_model,
                               engine="ctransformers", threads=1, nats_port=0)) as node:
        assert node.url != f"nats://127.0.0.1:{DEFAULT_PORT}"


async def test_a_second_server_on_a_store_in_use_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
):
    """Two servers never share a store: the second start on a running node's store is
    refused, naming the node, and the first still serves."""
    async with EmbeddedNats(tmp_path / "nats") as first:
        second = EmbeddedNats(tmp_path / "nats")
        with pytest.raises(NatsServerError, match=f"running node \\(pid {os.getpid()}\\)"):
            await second.start()
        assert [p.pid for p in servers_on_store(tmp_path / "nats")] == [first.pid]
        nc = await nats.connect(first.url)
        await nc.close()


def _up(data_dir: Path) -> tuple[subprocess.Popen[str], LineReader]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    env.update(INFERNODE_DATA_DIR=str(data_dir), INFERNODE_THREADS="1", INFERNODE_MODEL="demo")
    up = subprocess.Popen([sys.executable, "-m", "node.cli", "up"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = LineReader(up.stdout)
    out.wait_for(re.compile(r'"event": "up_ready"'), timeout=90)
    return up, out


async def _exited(pid: int, timeout: float) -> None:
    await until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status()
                == psutil.STATUS_ZOMBIE, timeout=timeout, what=f"process {pid} to exit")


@pytest.mark.timeout(180)
async def test_the_embedded_server_dies_with_a_sigkilled_node_and_the_restart_runs_alone(
    tmp_path: Path,
):
    """SIGKILL of `infernode up` ends its nats-server too; the restarted node's server is
    then the only one on the store."""
    store = tmp_path / "data" / "nats"
    up, _ = _up(tmp_path / "data")
    try:
        (server,) = servers_on_store(store)
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=30)
        await _exited(server.pid, timeout=15)
        again, _ = _up(tmp_path / "data")
        try:
            assert len(servers_on_store(store)) == 1
        finally:
            stop_child(again)
    finally:
        stop_child(up)


@pytest.mark.timeout(180)
async def test_a_node_stops_a_server_left_running_on_its_store_before_starting_its_own(
    tmp_path: Path,
):
    """A nats-server started by hand on the node's store is stopped (and said so) by
    `infernode up`, whose own server is then the only one on it."""
    store = tmp_path / "data" / "nats"
    store.mkdir(parents=True)
    left = subprocess.Popen([str(find_nats_server()), "-p", "-1", "-js", "-sd", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await until(lambda: len(servers_on_store(store)) == 1, what="the left server")
        up, out = _up(tmp_path / "data")
        try:
            assert any("nats_server_left_stopped" in line for line in out.seen)
            assert left.wait(timeout=15) is not None
            assert [p.pid for p in servers_on_store(store)] != [left.pid]
            assert len(servers_on_store(store)) == 1
        finally:
            stop_child(up)
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


async def test_a_server_whose_node_died_still_holding_the_store_lock_is_stopped_at_start(
    tmp_path: Path,
):
    """A server left by a dead node (it holds the store's lock; the pid file names it and
    its node) is stopped by the next start, whose server then runs alone on the store."""
    store = tmp_path / "nats"
    store.mkdir()
    lock = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    left = subprocess.Popen([str(find_nats_server()), "-p", "-1", "-js", "-sd", str(store)],
                            pass_fds=(lock,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(lock)  # only the left server holds it now, as a dead node's server would
    gone_node = subprocess.Popen(["true"])
    gone_node.wait()
    (store / PID_FILE).write_text(f"{left.pid} {gone_node.pid}\n")
    try:
        await until(lambda: len(servers_on_store(store)) == 1, what="the left server")
        with capture_logs() as logs:
            async with EmbeddedNats(store) as server:
                assert left.wait(timeout=15) is not None
                assert [p.pid for p in servers_on_store(store)] == [server.pid]
        assert any(e["event"] == "nats_server_left_stopped" for e in logs)
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
