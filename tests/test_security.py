"""Who may talk to the node, and what an untrusted model file may do.

- NATS authentication (user/password, token, nkey, mutual TLS) passes from the node's
  configuration to every connection, against a real nats-server configured for it; wrong
  credentials end the start at once with a sentence naming the settings to fix.
- ``node/examples/nats-agents.conf``: agent A cannot read or write agent B's sessions, nor the
  node's internal subjects, admin subjects or reply inboxes, and the node still serves A.
- A GGUF whose chat template tries to leave the jinja sandbox, loops or explodes is refused
  at start (``--chat-template gguf``) or replaced by chatml with a logged reason (``auto``);
  a template that fails on one conversation gives that prompt a typed error event.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from actors.engine.templates.chat import ChatTemplate, TemplateError
from actors.engine.templates.sandbox import MAX_ITEMS
from node.app import Node, StartError
from node.client import InfernodeClient
from node.config import ConfigError, NodeConfig
from node.demo_model import write_llama_gguf
from node.nats_server import EmbeddedNats
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.subjects import Subjects
from tests.helpers import EventCollector
from tests.support import agents
from tests.support.agents import NODE_USER, PASSWORDS, QUIET, Agent

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)
# The example-configuration server and the servers a test starts, stopped after it.
servers = agents.servers
agents_server = agents.agents_server
# A well-known test user seed from the NATS documentation; never use it for real.
NKEY_SEED = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"


async def ask(url: str, config: NodeConfig, session: str, text: str = "hello") -> int:
    """One greedy turn through the client library; the committed generation."""
    async with InfernodeClient(url, config=config) as client:
        result = await client.complete(session, text, sampling=GREEDY, max_tokens=3, timeout=60)
    assert result.commit is not None
    return result.commit.generation


async def started_server(tmp_path: Path, conf: str, name: str = "auth") -> EmbeddedNats:
    path = tmp_path / f"{name}.conf"
    path.write_text(conf)
    server = EmbeddedNats(tmp_path / f"nats-{name}", config_file=path)
    await server.start()
    return server


@pytest.fixture
async def node_on_model(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Start a node on a given model file (make_node always uses the tiny model)."""
    nodes: list[Node] = []

    async def start(model: Path, **settings: Any) -> Node:
        config = NodeConfig(
            nats_url=nats_server.url, data_dir=tmp_path / f"node-{len(nodes)}", model=model,
            threads=1, **QUIET, **settings,
        )
        node = Node(config)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in reversed(nodes):
        await node.stop()


# -- authentication passes through the configuration ----------------------------------------
def _nkey_case() -> tuple[str, dict[str, str], dict[str, str]]:
    nkeys = pytest.importorskip("nkeys", reason="nkey authentication needs the nkeys package")
    public = nkeys.from_seed(NKEY_SEED.encode()).public_key.decode()
    other = "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY"
    return (
        f"authorization {{ users = [ {{ nkey: {public} }} ] }}",
        {"nats_nkey_seed": NKEY_SEED},
        {"nats_nkey_seed": other},
    )


AUTH_CASES: dict[str, Callable[[], tuple[str, dict[str, str], dict[str, str]]]] = {
    "user_password": lambda: (
        "authorization { user: node, password: s3cret }",
        {"nats_user": "node", "nats_password": "s3cret"},
        {"nats_user": "node", "nats_password": "wrong"},
    ),
    "token": lambda: (
        "authorization { token: t0ken-4-infernode }",
        {"nats_token": "t0ken-4-infernode"},
        {"nats_token": "not-the-token"},
    ),
    "nkey": _nkey_case,
}


@pytest.mark.parametrize("method", list(AUTH_CASES))
async def test_node_and_client_authenticate_with_configured_credentials(
    make_node, servers, tmp_path, method
):
    """A server that requires credentials serves a node and a client given them."""
    conf, good, _ = AUTH_CASES[method]()
    server = await started_server(tmp_path, conf)
    servers.append(server)
    node = await make_node(url=server.url, **good, **QUIET)
    assert await ask(node.url, NodeConfig(**good), f"auth-{method}") == 1


@pytest.mark.parametrize("method", list(AUTH_CASES))
async def test_wrong_or_missing_credentials_stop_the_start_at_once_with_a_fix(
    make_node, servers, tmp_path, method
):
    """Refused credentials end the start within a second, naming the settings to check."""
    conf, _, wrong = AUTH_CASES[method]()
    server = await started_server(tmp_path, conf)
    servers.append(server)
    for settings in (wrong, {}):
        began = time.monotonic()
        with pytest.raises(StartError) as info:
            await make_node(url=server.url, **settings, **QUIET)
        message = str(info.value)
        assert "Authorization Violation" in message, message
        assert "INFERNODE_NATS_USER" in message and "INFERNODE_NATS_TOKEN" in message
        # The model loads first; the refusal itself must not wait out the 5 s connect deadline.
        assert time.monotonic() - began < 4.5


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("making test certificates needs the openssl command")
    d = tmp_path / "tls"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=infernode test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=infernode test {name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=d)
    return d


async def test_mutual_tls_passes_through_and_a_missing_ca_is_named(make_node, servers, tmp_path):
    """With the CA and a client certificate the node serves over mutual TLS; else it says why."""
    d = _certificates(tmp_path)
    conf = (
        f'tls {{ cert_file: "{d / "server.pem"}", key_file: "{d / "server.key"}", '
        f'ca_file: "{d / "ca.pem"}", verify: true }}'
    )
    server = await started_server(tmp_path, conf)
    servers.append(server)
    url = server.url.replace("nats://", "tls://")
    tls = {
        "nats_tls_ca": str(d / "ca.pem"),
        "nats_tls_cert": str(d / "client.pem"),
        "nats_tls_key": str(d / "client.key"),
    }
    node = await make_node(url=url, **tls, **QUIET)
    assert await ask(node.url, NodeConfig(**tls), "tls") == 1
    began = time.monotonic()
    with pytest.raises(StartError) as info:
        await make_node(url=url, **QUIET)  # the server's CA is unknown to the system store
    message = str(info.value)
    assert "INFERNODE_NATS_TLS_CA" in message, message
    assert time.monotonic() - began < 4.5


def test_inbox_prefix_reaches_the_connection_and_a_wildcard_one_is_refused():
    """nats_inbox_prefix becomes nats-py's inbox_prefix; '*' or '>' in it is refused."""
    config = NodeConfig(nats_url="nats://x:4222", nats_inbox_prefix="_INBOX.agent-a")
    assert config.nats_connect_options()["inbox_prefix"] == "_INBOX.agent-a"
    assert "inbox_prefix" not in NodeConfig(nats_url="nats://x:4222").nats_connect_options()
    for bad in ("_INBOX.*", "_INBOX.>", "", "a..b"):
        with pytest.raises(ConfigError, match="INFERNODE_NATS_INBOX_PREFIX"):
            NodeConfig(nats_inbox_prefix=bad)


# -- per-agent permissions (node/examples/nats-agents.conf) ---------------------------------


async def test_example_config_keeps_agent_a_out_of_session_b_and_still_serves_a(
    make_node, agents_server
):
    """Agent A's publish to B's session and subscription to B's events are refused; A is served."""
    node = await make_node(url=agents_server.url, **NODE_USER, **QUIET)
    a = await Agent.connect(node.url, "agent-a", PASSWORDS["AGENT_A_PASSWORD"])
    b = await Agent.connect(node.url, "agent-b", PASSWORDS["AGENT_B_PASSWORD"])
    try:
        snooped = await EventCollector.start(a.nc, S.events_all("b-1"))
        await a.refused("subscription", S.events_all("b-1"))
        prompt = PromptRequest(messages=(ChatMessage(role="user", content="from a"),))
        await a.nc.publish(S.prompt("b-1"), prompt.model_dump_json().encode())
        await a.refused("publish", S.prompt("b-1"))

        assert await ask(node.url, b.config(), "b-1", "b's own question") == 1
        assert await ask(node.url, a.config(), "a-1", "a's own question") == 1
        # The node publishes B's events before A's later ones, so any leak would be here now.
        assert snooped.messages == []
        async with InfernodeClient(node.url, config=NodeConfig(**NODE_USER)) as operator:
            history = await operator.history("b-1")
        texts = [r.content for r in history.records if r.kind == "user"]
        assert texts == ["b's own question"], "agent A's publish reached session b-1"
    finally:
        await a.nc.close()
        await b.nc.close()


async def test_example_config_lets_an_agent_ask_its_own_session_over_its_own_inbox(
    make_node, agents_server
):
    """Agent A's ask on a-1 is answered on A's inbox; its ask on b-1 is refused by the server."""
    node = await make_node(url=agents_server.url, **NODE_USER, **QUIET)
    agent_a = NodeConfig(nats_user="agent-a", nats_password=PASSWORDS["AGENT_A_PASSWORD"],
                         nats_inbox_prefix="_INBOX.agent-a")
    async with InfernodeClient(node.url, config=agent_a) as client:
        answer = await client.ask("a-1", "hello", sampling=GREEDY, max_tokens=3, timeout=60)
        assert answer.session == "a-1" and answer.generation == 1
    a = await Agent.connect(agents_server.url, "agent-a", PASSWORDS["AGENT_A_PASSWORD"])
    try:
        await a.nc.publish(S.ask("b-1"), b"hello")
        await a.refused("publish", S.ask("b-1"))
    finally:
        await a.nc.close()


@pytest.mark.parametrize(("what", "subject"), [
    ("subscription", "infer.>"),
    ("subscription", "_INBOX.>"),
    ("subscription", "_INBOX.infernode.>"),
    ("subscription", "infer.internal.>"),
    ("subscription", "infer.records.b-1"),
    ("publish", "infer.internal.admit.b-1"),
    ("publish", "infer.admin.delete"),
    ("publish", "infer.abort.b-1"),
    ("publish", "infer.ask.b-1"),
    ("publish", "$JS.API.STREAM.PURGE.INFER_PROMPTS"),
])
async def test_example_config_refuses_agents_the_node_operator_and_other_agents_subjects(
    agents_server, what, subject
):
    """Internal, admin, record, inbox and other agents' subjects are refused to an agent."""
    a = await Agent.connect(agents_server.url, "agent-a", PASSWORDS["AGENT_A_PASSWORD"])
    try:
        await a.attempt(what, subject)
    finally:
        await a.nc.close()


async def test_example_config_lets_the_operator_use_admin_subjects_only(make_node, agents_server):
    """The admin user reads node health over its own inbox, and may not publish a prompt."""
    node = await make_node(url=agents_server.url, **NODE_USER, **QUIET)
    admin = NodeConfig(
        nats_user="admin", nats_password=PASSWORDS["INFERNODE_ADMIN_PASSWORD"],
        nats_inbox_prefix="_INBOX.admin",
    )
    async with InfernodeClient(node.url, config=admin) as operator:
        health = await operator.health()
        assert health.slots == node.config.n_slots and health.sessions == 0
    a = await Agent.connect(agents_server.url, "admin", PASSWORDS["INFERNODE_ADMIN_PASSWORD"])
    try:
        await a.nc.publish(S.prompt("a-1"), b"{}")
        await a.refused("publish", S.prompt("a-1"))
    finally:
        await a.nc.close()


# -- untrusted chat templates in the model file ---------------------------------------------
ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner().__call__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set f = '{0.__init__.__globals__}'.format %}{{ f(cycler) }}",
    "{{ ('{0.__class__}' | attr('format'))(1) }}",
]
RUNAWAYS = [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ 'x' * 10**10 }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
]


def _gguf(tmp_path: Path, template: str) -> Path:
    return write_llama_gguf(tmp_path / "untrusted.gguf", chat_template=template)


@pytest.mark.parametrize("template", ESCAPES + RUNAWAYS)
async def test_gguf_template_that_escapes_loops_or_explodes_stops_the_start(
    node_on_model, tmp_path, template
):
    """--chat-template gguf with a hostile template: StartError says the template is refused."""
    began = time.monotonic()
    with pytest.raises(StartError) as info:
        await node_on_model(_gguf(tmp_path, template), chat_template="gguf")
    message = str(info.value)
    assert "chat template is refused" in message and "--chat-template" in message, message
    assert time.monotonic() - began < 10


@pytest.mark.parametrize("template", [ESCAPES[0], ESCAPES[3], RUNAWAYS[0]])
async def test_auto_replaces_a_hostile_gguf_template_with_chatml_and_logs_why(
    node_on_model, tmp_path, template
):
    """--chat-template auto: the node starts on chatml, logs the reason, and serves a prompt."""
    with capture_logs() as logs:
        node = await node_on_model(_gguf(tmp_path, template), chat_template="auto")
    fallback = [e for e in logs if e["event"] == "chat_template_fallback"]
    assert fallback and fallback[0]["log_level"] == "warning"
    assert "fails on a probe conversation" in fallback[0]["reason"]
    assert node.engine is not None and node.engine.info.template == "chatml"
    assert await ask(node.url, NodeConfig(), "fallback") == 1


TRIGGERED = (
    "{% for m in messages %}"
    "{% if m.content == 'please loop' %}"
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif m.content == 'please escape' %}{{ m.__class__.__mro__ }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(("trigger", "needle"), [
    ("please loop", "runaway loop"),
    ("please escape", "sandbox"),
])
async def test_a_template_failing_on_one_conversation_gives_a_typed_error_and_keeps_serving(
    node_on_model, nc, tmp_path, trigger, needle
):
    """A per-render failure is a bad_request error event for that turn; other sessions go on."""
    node = await node_on_model(_gguf(tmp_path, TRIGGERED), chat_template="gguf")
    assert node.engine is not None and node.engine.info.template == "gguf"
    events = await EventCollector.start(nc, S.events_all("poisoned"))
    prompt = PromptRequest(messages=(ChatMessage(role="user", content=trigger),), max_tokens=3)
    await nc.jetstream().publish(S.prompt("poisoned"), prompt.model_dump_json().encode())
    await events.wait_until(
        lambda ms: any(m.subject.endswith(".aborted") for m in ms), timeout=30
    )
    error = next(json.loads(m.data) for m in events.messages if m.subject.endswith(".error"))
    assert error["code"] == "bad_request" and error["status"] == 400
    assert "chat template" in error["message"] and needle in error["message"]
    assert error["turn_id"]
    status = [json.loads(m.data)["state"] for m in events.messages if m.subject.endswith(".status")]
    assert status[-1] == "idle"
    assert await ask(node.url, NodeConfig(), "healthy", "a normal question") == 1


# -- sandbox limits on single calls the deadline cannot interrupt ---------------------------
@pytest.mark.parametrize("source", [
    "{{ ('x' * 1000000)|wordwrap(1)|length }}",
    "{{ ('x' * 3900000)|sort|length }}",
    "{{ ('x' * 3900000)|unique|list|length }}",
    "{{ ('x' * 2000000)|map('upper')|list|length }}",
])
def test_one_slow_filter_call_is_refused_before_it_runs(source):
    """Quadratic wrapping and walks over millions of items are refused up front, fast."""
    began = time.monotonic()
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([ChatMessage(role="user", content="hi")])
    assert time.monotonic() - began < 0.5


def test_ordinary_wrapping_and_sorting_still_render():
    """The limits leave ordinary uses alone: wrapping prose, sorting a list, long lists."""
    source = (
        "{{ messages[0].content|wordwrap(5) }}|{{ (range(1000)|list)|sort|first }}|"
        f"{{{{ (range({MAX_ITEMS // 20})|list)|map('string')|list|length }}}}"
    )
    out = ChatTemplate(source).render([ChatMessage(role="user", content="hello world")])
    assert out == f"hello\nworld|0|{MAX_ITEMS // 20}"
