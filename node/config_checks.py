"""What makes a ``NodeConfig`` valid: the allowed values, and one check per concern.

Each check raises ``ConfigError`` with a sentence that names the setting, what it got and the
flag or variable that fixes it. ``NodeConfig`` runs ``CHECKS`` when it is built.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from pathlib import Path

from actors.engine.bank.domains import ShareGroupsError, parse_share_groups
from actors.replicas import MAX_REPLICAS
from node.models import ModelNameError, resolve_model
from schemas.subjects import Subjects

NodeConfig = typing.Any
"""A ``node.config.NodeConfig``: the checks run inside its ``__post_init__``, and naming the
class here would make the two modules import each other."""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
# nats-server refuses a max_payload above 64 MiB.
MAX_NATS_PAYLOAD = 64 * MIB
MAX_PARTITIONS = 1024
"""More partitions than this only cost leases and consumers."""

ENGINES = ("auto", "llama-cpp", "ctransformers")
OVERFLOW_POLICIES = ("truncate", "shift", "refuse")
CHAT_TEMPLATES = (
    "auto", "gguf", "chatml", "llama-2", "mistral", "llama-3", "gemma", "phi-3",
)
FLASH_ATTN = ("off", "on", "auto")
SPECULATE = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
DEFAULT_INBOX_PREFIX = "_INBOX"
_INBOX_PREFIX_RE = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ConfigError(ValueError):
    """A setting is invalid; the message says how to fix it."""


# -- validation ---------------------------------------------------------------------------
def _fail(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _check_choices(c: NodeConfig) -> None:
    choices = {
        ("engine", "--engine"): ENGINES,
        ("overflow", "--overflow"): OVERFLOW_POLICIES,
        ("speculate", "--speculate"): SPECULATE,
        ("flash_attn", "--flash-attn"): FLASH_ATTN,
        ("log_level", "--log-level"): LOG_LEVELS,
        ("log_format", "--log-format"): LOG_FORMATS,
    }
    for (name, flag), allowed in choices.items():
        value = getattr(c, name)
        if value not in allowed:
            _fail(
                f"{name} must be one of {', '.join(allowed)} (got {value!r}); "
                f"pass {flag} {allowed[0]}"
            )


def _check_chat_template(c: NodeConfig) -> None:
    if c.chat_template in CHAT_TEMPLATES or Path(c.chat_template).expanduser().is_file():
        return
    _fail(
        f"chat_template must be one of {', '.join(CHAT_TEMPLATES)} or a jinja file (got "
        f"{c.chat_template!r}, which is neither); pass --chat-template auto"
    )


def _check_counts(c: NodeConfig) -> None:
    minimums = {
        ("n_slots", "--slots"): 1,
        ("n_ctx", "--ctx"): 0,
        ("n_batch", "--batch"): 0,
        ("threads", "--threads"): 0,
        ("gpu_layers", "--gpu-layers"): 0,
        ("bank_ram_bytes", "--bank-ram-bytes"): 0,
        ("bank_session_bytes", "--bank-session-bytes"): 0,
        ("bank_durable_bytes", "--bank-durable-bytes"): 0,
        ("max_pending_per_session", "--max-pending"): 1,
        ("max_pending_bytes", "--max-pending-bytes"): KIB,
        ("max_session_bytes", "--max-session-bytes"): KIB,
        ("max_node_bytes", "--max-node-bytes"): KIB,
        ("max_sessions", "--max-sessions"): 1,
        ("tombstones", "--tombstones"): 0,
        ("records_max_bytes", "--records-max-bytes"): 0,
        ("partitions", "--partitions"): 1,
        ("replicas", "--replicas"): 1,
    }
    for (name, flag), least in minimums.items():
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{name} must be a whole number (got {value!r}); pass {flag} {max(least, 1)}")
        if value < least:
            _fail(f"{name} must be at least {least} (got {value}); pass {flag} {least} or more")
    if 0 < c.n_ctx < 16:  # 0 is auto: the model's trained context
        _fail(f"n_ctx must be 0 (auto) or at least 16 (got {c.n_ctx}); pass --ctx 16 or more")


def _check_durations(c: NodeConfig) -> None:
    if not c.commit_wait_s > 0:
        _fail(
            f"commit_wait_s must be more than 0 seconds (got {c.commit_wait_s}); "
            "set INFERNODE_COMMIT_WAIT_S=30"
        )
    for name in ("turn_timeout_s", "turn_probe_s", "stop_wait_s"):
        if not getattr(c, name) > 0:
            _fail(
                f"{name} must be more than 0 seconds (got {getattr(c, name)}); "
                f"set INFERNODE_{name.upper()} to a positive number"
            )
    if not c.lease_ttl_s >= 1:
        _fail(
            f"lease_ttl_s must be at least 1 second (got {c.lease_ttl_s}); pass --lease-ttl-s 10"
        )
    if not c.records_max_age >= 0:
        _fail(
            f"records_max_age must be 0 (keep for ever) or more seconds "
            f"(got {c.records_max_age}); pass --records-max-age 0"
        )
    if not c.heartbeat_s >= 0:
        _fail(
            f"heartbeat_s must be 0 (off) or more seconds (got {c.heartbeat_s}); "
            "set INFERNODE_HEARTBEAT_S=30"
        )


def _check_sizes(c: NodeConfig) -> None:
    if not KIB <= c.max_payload <= MAX_NATS_PAYLOAD:
        _fail(
            f"max_payload must be between {KIB} and {MAX_NATS_PAYLOAD} bytes "
            f"(got {c.max_payload}); set INFERNODE_MAX_PAYLOAD={8 * MIB}"
        )
    if c.metrics_port is not None and not 0 <= c.metrics_port <= 65535:
        _fail(
            "metrics_port must be a port between 0 (any free port) and 65535 "
            f"(got {c.metrics_port}); pass a free port such as 9464, or leave it unset"
        )


def _check_gateway(c: NodeConfig) -> None:
    if c.openai_port is not None and not 0 <= c.openai_port <= 65535:
        _fail(
            "openai_port must be a port between 0 (any free port) and 65535 "
            f"(got {c.openai_port}); pass --openai-port 8000, or leave it unset"
        )
    if c.openai_max_body_bytes < KIB or c.openai_max_requests < 1:
        _fail(
            "openai_max_body_bytes must be at least 1024 and openai_max_requests at least 1; "
            f"pass --openai-max-body-bytes {8 * MIB} and --openai-max-requests 256"
        )
    if not 1 <= c.openai_max_connections_per_client <= c.openai_max_connections:
        _fail(
            "openai_max_connections_per_client must be at least 1 and at most "
            f"openai_max_connections (got {c.openai_max_connections_per_client} and "
            f"{c.openai_max_connections}); pass --openai-max-connections 2048 and "
            "--openai-max-connections-per-client 256"
        )
    if not c.openai_header_timeout_s > 0:
        _fail(
            "openai_header_timeout_s must be more than 0 seconds; pass "
            "--openai-header-timeout-s 10"
        )
    if c.api_keys is None and c.openai_host not in LOOPBACK_HOSTS:
        _fail(
            f"the OpenAI gateway may listen on {c.openai_host} only with API keys; pass "
            "--api-keys FILE, or --openai-host 127.0.0.1"
        )


def _check_prefix(c: NodeConfig) -> None:
    try:
        Subjects(c.prefix)
    except ValueError as e:
        raise ConfigError(f"{e}; pass --prefix infer or another valid prefix") from e
    try:
        Subjects(c.prefix, c.node_id or "")
    except ValueError as e:
        raise ConfigError(f"{e}; pass --node-id node-1 or leave it unset") from e
    if c.replicas > MAX_REPLICAS:
        _fail(
            f"replicas must be at most {MAX_REPLICAS}, JetStream's limit (got {c.replicas}); "
            "pass --replicas 3"
        )
    if c.partitions > MAX_PARTITIONS:
        _fail(
            f"partitions must be at most {MAX_PARTITIONS} (got {c.partitions}); "
            "pass --partitions 16"
        )


def _check_nats_url(c: NodeConfig) -> None:
    if c.nats_url is None:
        return
    urls = [u.strip() for u in c.nats_url.split(",") if u.strip()]
    if not urls:
        _fail(
            "nats_url is empty; pass --nats-url nats://HOST:4222, or leave it unset to "
            "start an embedded server"
        )
    for url in urls:
        scheme = url.split("://", 1)[0] if "://" in url else "nats"
        if scheme not in NATS_SCHEMES:
            _fail(
                f"NATS URL {url!r} has scheme {scheme!r}; use nats://HOST:4222 "
                f"(or {', '.join(s + '://' for s in NATS_SCHEMES[1:])})"
            )


def _check_nats_port(c: NodeConfig) -> None:
    if c.nats_port is not None and not 0 <= c.nats_port <= 65535:
        _fail(
            "nats_port must be a port between 0 (any free port) and 65535 "
            f"(got {c.nats_port}); pass --nats-port 4222, or leave it unset"
        )


def _check_files(c: NodeConfig) -> None:
    files = {
        ("llama_lib", "--llama-lib PATH"): c.llama_lib,
        ("nats_creds", "INFERNODE_NATS_CREDS"): c.nats_creds,
        ("nats_tls_ca", "INFERNODE_NATS_TLS_CA"): c.nats_tls_ca,
        ("nats_tls_cert", "INFERNODE_NATS_TLS_CERT"): c.nats_tls_cert,
        ("nats_tls_key", "INFERNODE_NATS_TLS_KEY"): c.nats_tls_key,
        ("api_keys", "--api-keys FILE"): c.api_keys,
    }
    for (name, how), value in files.items():
        if value is not None and not Path(value).is_file():
            _fail(f"{name} file {str(value)!r} does not exist; fix the path or drop {how}")


def _check_auth(c: NodeConfig) -> None:
    if (c.nats_user is None) != (c.nats_password is None):
        _fail(
            "nats_user and nats_password go together; set both INFERNODE_NATS_USER and "
            "INFERNODE_NATS_PASSWORD, or neither"
        )
    if (c.nats_tls_cert is None) != (c.nats_tls_key is None):
        _fail(
            "nats_tls_cert and nats_tls_key go together; set both INFERNODE_NATS_TLS_CERT "
            "and INFERNODE_NATS_TLS_KEY, or neither"
        )
    if not _INBOX_PREFIX_RE.fullmatch(c.nats_inbox_prefix):
        _fail(
            f"nats_inbox_prefix {c.nats_inbox_prefix!r} must be dot-separated subject tokens "
            "without wildcards, such as _INBOX.infernode; set INFERNODE_NATS_INBOX_PREFIX"
        )
    if c.nats_creds is not None and c.nats_nkey_seed is not None:
        _fail(
            "nats_creds already holds an nkey seed; set INFERNODE_NATS_CREDS or "
            "INFERNODE_NATS_NKEY_SEED, not both"
        )


def _check_model(c: NodeConfig) -> None:
    if c.model is None or c.model.is_file():
        return
    try:
        resolve_model(c.model)
    except ModelNameError as e:
        raise ConfigError(str(e)) from e


def _check_share_groups(c: NodeConfig) -> None:
    try:
        parse_share_groups(c.bank_share_groups)
    except ShareGroupsError as e:
        _fail(f"{e} (--bank-share-groups, INFERNODE_BANK_SHARE_GROUPS)")


CHECKS: tuple[Callable[[NodeConfig], None], ...] = (
    _check_choices,
    _check_share_groups,
    _check_chat_template,
    _check_model,
    _check_counts,
    _check_durations,
    _check_sizes,
    _check_gateway,
    _check_prefix,
    _check_nats_url,
    _check_nats_port,
    _check_files,
    _check_auth,
)
