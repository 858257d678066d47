"""Credentials of the embedded nats-server, made at its first start, kept in the data dir.

The embedded server listens on loopback only, but that is not enough: without users any
local process could read every session's records, forge events, publish to the node's
internal subjects (skipping admission) or purge its streams. So the first ``infernode up``
writes two passwords into ``<data-dir>/nats-auth.json``, readable by the user only (0600):

- the node's own user, the only one allowed on internal subjects, the record log,
  JetStream's API and the node's reply inboxes (``_INBOX.infernode``);
- a client user for the CLI and the client library, which may do what an agent and an
  operator do: publish prompts, aborts and admin requests, read events and its replies.

A client that names no credentials of its own uses the client user when, and only when,
it connects to the URL that ``infernode up`` wrote into the same data directory, so the
password never goes to another server. A gateway started on its own (``infernode openai``)
is part of the node: it keeps its conversation index in JetStream, so it uses the node's user.

For the Go ``nats`` CLI, every start also writes ``<data-dir>/nats-context.json`` (0600), a
``nats context`` file of the client user and the server's URL: linked into the CLI's context
directory and selected, it lets plain ``nats sub``/``pub``/``req`` lines in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from node.config import NodeConfig
from schemas.subjects import SERVER_API_SUBJECTS, Subjects, inbox_all

AUTH_FILE = "nats-auth.json"
"""Generated passwords, in the data directory (mode 0600)."""
SERVER_CONFIG_FILE = "nats-auth.conf"
"""The embedded server's users and permissions, regenerated at every start (mode 0600)."""
URL_FILE = "nats.url"
"""Where ``infernode up`` writes its embedded server's URL."""
CONTEXT_FILE = "nats-context.json"
"""A ``nats context`` of the client user for the Go ``nats`` CLI (mode 0600)."""
NODE_USER = "infernode"
CLIENT_USER = "infernode-client"
NODE_INBOX_PREFIX = "_INBOX.infernode"
"""The node's reply inboxes: the engine's answers to the runners travel there."""


@dataclass(frozen=True)
class LocalCredentials:
    """The passwords of the embedded server's two users."""

    node_password: str
    client_password: str

    @classmethod
    def load_or_create(cls, data_dir: Path) -> LocalCredentials:
        """Read ``<data_dir>/nats-auth.json``, or write new passwords there (0600) first."""
        path = data_dir / AUTH_FILE
        if path.is_file():
            raw = json.loads(path.read_text())
            return cls(raw["node"]["password"], raw["client"]["password"])
        made = cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        body = {
            "node": {"user": NODE_USER, "password": made.node_password},
            "client": {"user": CLIENT_USER, "password": made.client_password},
        }
        _write_private(path, json.dumps(body, indent=2) + "\n")
        return made

    def write_server_config(self, directory: Path, subjects: Subjects) -> Path:
        """The server's ``authorization`` block for these users; its path (0600)."""
        own = [subjects.internal_all(), subjects.records_all(), inbox_all(NODE_INBOX_PREFIX)]
        publish_deny = [*own, subjects.events_all(), subjects.rejected(), *SERVER_API_SUBJECTS]
        subscribe_deny = [*own, *SERVER_API_SUBJECTS]
        client = {
            "publish": {"allow": [">"], "deny": publish_deny},
            "subscribe": {"allow": [">"], "deny": subscribe_deny},
        }
        users = [
            {"user": NODE_USER, "password": self.node_password,
             "permissions": {"publish": ">", "subscribe": ">"}},
            {"user": CLIENT_USER, "password": self.client_password, "permissions": client},
        ]
        # nats-server's configuration format accepts JSON values.
        path = directory / SERVER_CONFIG_FILE
        directory.mkdir(parents=True, exist_ok=True)
        _write_private(path, "authorization " + json.dumps({"users": users}, indent=2) + "\n")
        return path

    def write_cli_context(self, data_dir: Path, url: str) -> Path:
        """The ``nats`` CLI's context for the client user on ``url``; its path (0600).

        Written at every start: the credentials stay, the URL may not (a free port is
        taken when the asked one is in use).
        """
        body = {
            "description": "infernode up's embedded server, as its client user",
            "url": url, "user": CLIENT_USER, "password": self.client_password,
        }
        path = data_dir / CONTEXT_FILE
        _write_private(path, json.dumps(body, indent=2) + "\n")
        return path

    def node_config(self, config: NodeConfig) -> NodeConfig:
        """``config`` for the node's own connections to the embedded server."""
        return dataclasses.replace(
            config, nats_user=NODE_USER, nats_password=self.node_password, nats_token=None,
            nats_creds=None, nats_nkey_seed=None, nats_inbox_prefix=NODE_INBOX_PREFIX,
        )


def client_config(config: NodeConfig, url: str) -> NodeConfig:
    """``config`` with the local client user, if it names no credentials and ``url`` is the
    embedded server that ``infernode up`` started in ``config.data_dir``."""
    creds = _local_credentials(config, url)
    if creds is None:
        return config
    return dataclasses.replace(config, nats_user=CLIENT_USER, nats_password=creds.client_password)


def gateway_config(config: NodeConfig, url: str) -> NodeConfig:
    """``config`` for a gateway started on its own: the node's user on the local embedded
    server (the gateway's conversation index lives in JetStream, which clients may not use),
    else ``config`` as it is."""
    creds = _local_credentials(config, url)
    return config if creds is None else creds.node_config(config)


def _local_credentials(config: NodeConfig, url: str) -> LocalCredentials | None:
    """The passwords in ``config.data_dir`` when ``config`` names no credentials of its own
    and ``url`` is the server ``infernode up`` wrote there; None otherwise."""
    if config.nats_user or config.nats_token or config.nats_creds or config.nats_nkey_seed:
        return None
    written, auth = config.data_dir / URL_FILE, config.data_dir / AUTH_FILE
    try:
        if not (written.is_file() and auth.is_file()) or written.read_text().strip() != url.strip():
            return None
        raw = json.loads(auth.read_text())
        return LocalCredentials(raw["node"]["password"], raw["client"]["password"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: connect without, and let the server say so


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, never readable by others meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
