"""The node's configuration: one frozen object, built once at start and checked when built.

Every setting can come from an ``INFERNODE_<FIELD>`` environment variable; explicit values
(command-line flags) win over the environment. This is the only module that reads the
environment, and it only reads the mapping it is handed.
"""

from __future__ import annotations

import ssl
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from node.config_checks import CHECKS, DEFAULT_INBOX_PREFIX, GIB, MIB, ConfigError

ENV_PREFIX = "INFERNODE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class NodeConfig:
    """Everything one infernode process needs to know, fixed at start."""

    nats_url: str | None = None
    """NATS server(s), comma-separated; None starts an embedded nats-server."""
    nats_port: int | None = None
    """Port the embedded nats-server asks for, taking a free one when it is in use; None or 0
    takes any free port. ``infernode up`` asks for 4222, NATS's default, so ``nats`` commands
    work as documented; a node built in code (tests, benchmarks, an application) does not,
    so it never puts a second node's actors on a bus another program expects at 4222."""
    data_dir: Path = Path(".infernode")
    """Where the embedded server's JetStream data and the demo model live."""
    model: Path | None = None
    """GGUF model file or a model name (``infernode models``); None serves the installed
    real model, else a random-weight demo model written into ``data_dir``."""
    prefix: str = "infer"
    """First token(s) of every subject."""
    engine: str = "auto"
    """Which engine runs the model: auto, llama-cpp or ctransformers."""
    n_slots: int = 2
    """Contexts sharing one copy of the weights; sessions resident at once."""
    n_ctx: int = 0
    """Context length of each slot, in tokens; 0 takes the model's trained context, cut to
    what half of the memory available at start holds for every slot's KV cache."""
    n_batch: int = 0
    """Prompt tokens per evaluation during prefill; 0 takes the engine's own: llama-server's
    2,048 on llama-cpp (evaluated in micro-batches of 512), 512 on ctransformers."""
    threads: int = 0
    """CPU threads per evaluation; 0 decides per evaluation from the idle cores: llama-cpp's
    one batch (every running session's tokens together) gets them all, ctransformers' busy
    slots split them."""
    gpu_layers: int = 0
    """Layers offloaded to CUDA; 0 runs on the CPU only."""
    llama_lib: Path | None = None
    """A llama.cpp shared library to use instead of the bundled one."""
    chat_template: str = "auto"
    """auto, gguf (the model's own), a built-in family's name, or a .jinja file."""
    flash_attn: str = "auto"
    """Flash attention on the llama-cpp engine: auto (on where llama.cpp supports it, as
    llama-server), on or off (as llama-cpp-python)."""
    overflow: str = "truncate"
    """When a session outgrows the context: truncate (leave its oldest whole turns out of the
    window), shift (the same, keeping the KV state of what stays where the engine can), or
    refuse (context_overflow 422)."""
    speculate: str = "auto"
    """Speculative decoding by n-gram lookup in the context: auto (propose where the reply's
    last tokens occurred before, on engines that verify a batch: llama-cpp) or off."""
    bank_ram_bytes: int = GIB
    """Host RAM for banked KV snapshots; 0 turns snapshots off."""
    bank_session_bytes: int = 256 * MIB
    """Most host RAM one session's snapshots may hold."""
    bank_dir: Path | None = None
    """Directory for durable snapshots; None keeps them in RAM only."""
    bank_object_store: bool = False
    """Keep durable snapshots in a JetStream object store."""
    bank_durable_bytes: int = 16 * GIB
    """Most bytes the durable tier holds; past it the least recently used snapshots go.
    0 means no cap."""
    bank_share_groups: str = ""
    """Sessions that may restore each other's KV prefixes beyond their own agent:
    ``NAME=PATTERN[,PATTERN][;NAME=...]``, patterns over session ids or agent names (globs
    allowed). Empty: a prefix is shared only among one agent's sessions (``<agent>_...``),
    and any other session shares with nobody."""
    commit_wait_s: float = 30.0
    """How long the bank committer waits for a slot to go idle before dropping a snapshot."""
    intake_max_prompts: int = 100_000
    """Prompts the intake stream holds before publishes are refused (never dropped)."""
    intake_max_bytes: int = 1 << 30
    """Bytes the intake stream holds before publishes are refused."""
    records_max_age: float = 0.0
    """Seconds a record stays in the record stream; 0 keeps records for ever."""
    records_max_bytes: int = 0
    """Bytes the record stream holds, the oldest records dropped first; 0 is unlimited."""
    max_pending_per_session: int = 64
    """Prompts a session may have waiting before new ones get busy (429)."""
    max_pending_bytes: int = 16 * MIB
    """Bytes of messages a session may have waiting before new ones get busy (429)."""
    max_session_bytes: int = 64 * MIB
    """Bytes of messages a session may record in all before new ones get too_large (413)."""
    max_node_bytes: int = GIB
    """Bytes of messages all sessions of the node may hold in memory together before new
    ones get busy (429). A fixed 1 GiB, not a share of RAM, so one configuration behaves
    the same on every machine: 16 sessions at the per-session bound, or hundreds of
    ordinary ones, far under the RAM a machine that runs a model has."""
    max_sessions: int = 4096
    """Sessions the node keeps runners for."""
    tombstones: int = 1024
    """Recently deleted session ids remembered to answer gone (410)."""
    heartbeat_s: float = 30.0
    """Seconds between stats heartbeat log lines; 0 turns them off."""
    turn_timeout_s: float = 3600.0
    """Longest a session runner waits for the engine's result of one turn."""
    turn_probe_s: float = 10.0
    """How often a runner waiting on a turn asks the engine whether it still runs."""
    stop_wait_s: float = 10.0
    """How long a stopping node waits for a cut turn's abort to be recorded."""
    node_id: str | None = None
    """This node's name among the nodes on one NATS; None derives it from the host name and
    ``data_dir`` (the same at every restart, so a node takes its own partitions back at
    once)."""
    partitions: int = 16
    """Partitions the sessions are spread over; the same on every node of a cluster."""
    lease_ttl_s: float = 10.0
    """Seconds a partition's lease lasts unless its owner renews it (every third of it);
    a dead node's sessions move after at most this long."""
    replicas: int = 1
    """Copies JetStream keeps of each stream, KV bucket and object store the node makes, on
    as many servers of a NATS cluster (1 on a single server; 3 survives one server lost)."""
    balance: bool = True
    """Take a fair share of the partitions (live nodes counted in the lease bucket) and hand
    the surplus over when a node joins; off: take every free partition, hand none over."""
    log_level: str = "info"
    """debug, info, warning, error or critical."""
    log_format: str = "auto"
    """auto (console on a terminal, JSON otherwise), json or console."""
    metrics_port: int | None = None
    """Port for HTTP metrics; None serves none (0 picks a free port)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics port listens on (0.0.0.0 in a container)."""
    openai_port: int | None = None
    """Port of the OpenAI-compatible HTTP gateway in this process; None runs none."""
    openai_host: str = "127.0.0.1"
    """Address the gateway listens on; beyond loopback only with ``api_keys``."""
    api_keys: Path | None = None
    """File of ``KEY AGENT`` lines: bearer keys the gateway accepts, and whose they are."""
    openai_max_body_bytes: int = 8 * MIB
    """Largest request body the gateway reads; larger ones are refused (413) unread."""
    openai_max_requests: int = 256
    """Requests the gateway handles at once; more are refused (429, Retry-After)."""
    openai_header_timeout_s: float = 10.0
    """Seconds a connection has to send its request headers before it is closed."""
    openai_max_connections: int = 2048
    """Connections the gateway holds open in all; past it an idle one is closed to make
    room, and with none idle the newcomer gets 503."""
    openai_max_connections_per_client: int = 256
    """Connections one client address may hold open; past it that address's idle ones make
    room, and with none idle the newcomer gets 429. Far more than one client's pool uses
    (the SDKs keep at most 100), and an eighth of the total, so eight addresses holding
    all they may still leave the gateway room."""
    verify_restore: bool = True
    """Check at load that a restored KV state equals the live one."""
    llama_log: bool = False
    """Pass llama.cpp's own log lines through to stderr."""
    nats_user: str | None = None
    """NATS user name (with ``nats_password``)."""
    nats_password: str | None = None
    """NATS password (with ``nats_user``)."""
    nats_token: str | None = None
    """NATS authentication token."""
    nats_creds: str | None = None
    """Path of a NATS .creds file (JWT and nkey seed)."""
    nats_nkey_seed: str | None = None
    """An nkey seed, or the path of a file holding one."""
    nats_tls_ca: str | None = None
    """CA bundle that signs the server's certificate."""
    nats_tls_cert: str | None = None
    """Client certificate for mutual TLS (with ``nats_tls_key``)."""
    nats_tls_key: str | None = None
    """Private key of ``nats_tls_cert``."""
    nats_inbox_prefix: str = DEFAULT_INBOX_PREFIX
    """Subject prefix of this connection's reply inboxes; a private one (such as
    ``_INBOX.infernode``) lets server permissions keep other users out of the replies."""
    max_payload: int = 8 * MIB
    """Largest message the embedded server accepts; also caps a prompt's size."""

    def __post_init__(self) -> None:
        for check in CHECKS:
            check(self)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> NodeConfig:
        """Settings from ``INFERNODE_*`` variables, then ``overrides`` (None ones skipped)."""
        hints = _field_types()
        values: dict[str, object] = {}
        for name, hint in hints.items():
            var = ENV_PREFIX + name.upper()
            if var in environ:
                values[name] = _convert(environ[var], hint, var)
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in hints:
                raise ConfigError(f"{name!r} is not a setting; known settings are {_names()}")
            if isinstance(value, str) and hints[name] is not str:
                value = _convert(value, hints[name], name)
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]

    # -- NATS -----------------------------------------------------------------------------
    def servers(self, url: str | None = None) -> list[str]:
        """The server URLs to connect to: ``url`` if given, else ``nats_url``."""
        raw = url or self.nats_url
        if not raw:
            raise ConfigError(
                "no NATS URL is known; pass --nats-url or let `infernode up` start one"
            )
        return [u.strip() for u in raw.split(",") if u.strip()]

    def nats_connect_options(
        self, url: str | None = None, name: str = "infernode"
    ) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``; ``url`` overrides ``nats_url``."""
        options: dict[str, Any] = {
            "servers": self.servers(url),
            "name": name,
            # The node must outlive a NATS restart, so it never stops reconnecting.
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
        }
        optional = {
            "user": self.nats_user,
            "password": self.nats_password,
            "token": self.nats_token,
            "user_credentials": self.nats_creds,
        }
        options.update({k: v for k, v in optional.items() if v is not None})
        if self.nats_inbox_prefix != DEFAULT_INBOX_PREFIX:
            options["inbox_prefix"] = self.nats_inbox_prefix
        if self.nats_nkey_seed is not None:
            is_file = Path(self.nats_nkey_seed).expanduser().is_file()
            key = "nkeys_seed" if is_file else "nkeys_seed_str"
            options[key] = self.nats_nkey_seed
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when any TLS setting is given, else None."""
        if not (self.nats_tls_ca or self.nats_tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.nats_tls_ca)
        if self.nats_tls_cert and self.nats_tls_key:
            context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        return context


# -- conversion ---------------------------------------------------------------------------
def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(NodeConfig)
    return {f.name: hints[f.name] for f in fields(NodeConfig)}


def _names() -> str:
    return ", ".join(f.name for f in fields(NodeConfig))


def _convert(raw: str, hint: object, source: str) -> object:
    base, optional = _unwrap_optional(hint)
    text = raw.strip()
    if optional and text.lower() in {"", "none", "null"}:
        return None
    try:
        return _CONVERTERS[base](text)
    except ValueError as e:
        raise ConfigError(
            f"{source}={raw!r} is not {_KIND[base]}; set it to {_EXAMPLE[base]}"
        ) from e


def _unwrap_optional(hint: object) -> tuple[object, bool]:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _to_int(text: str) -> int:
    # Base 0 also takes 0x1000 and 1_048_576, but refuses a plain leading zero like 08.
    try:
        return int(text)
    except ValueError:
        return int(text, 0)


_CONVERTERS: dict[object, Callable[[str], object]] = {
    int: _to_int,
    float: float,
    bool: _to_bool,
    str: str,
    Path: lambda t: Path(t).expanduser(),
}
_KIND: dict[object, str] = {
    int: "a whole number",
    float: "a number",
    bool: "a yes/no value",
    str: "text",
    Path: "a path",
}
_EXAMPLE: dict[object, str] = {
    int: "digits such as 4",
    float: "a number such as 2.5",
    bool: "1, 0, true, false, yes or no",
    str: "some text",
    Path: "a file path",
}


