"""Every NATS subject, stream and header name of infernode, built from one prefix.

Nothing outside this module spells a subject string; a test enforces it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from enum import StrEnum

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

ABORTED_HEADER = "Infer-Aborted"
"""Header set to ``1`` on ``provisional`` and ``aborted`` events."""
MSG_ID_HEADER = "Nats-Msg-Id"
"""JetStream's de-duplication header; infernode also reads it as the idempotency key."""
ERROR_HEADER = "Infer-Error"
"""Header naming the error code on an error reply."""
SERVICE_ERROR_HEADER = "Nats-Service-Error"
"""NATS micro's header carrying an error reply's description (what ``nats req`` shows)."""
SERVICE_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
"""NATS micro's header carrying an error reply's status code."""
EXPECTED_SUBJECT_SEQ_HEADER = "Nats-Expected-Last-Subject-Sequence"
"""JetStream stores a record only if its session's last record is at this sequence."""
NODE_HEADER = "Infer-Node"
"""On a record: the node that appended it."""
ANSWER_TO_HEADER = "Infer-Answer-To"
"""On an ask in the intake stream: the requester's inbox, which receives the answer."""
ANSWER_SEAL_HEADER = "Infer-Answer-Seal"
"""On an ask in the intake stream: the ask door's seal over session, ``Nats-Msg-Id`` and
``Infer-Answer-To`` (``actors.seal``); without a matching one the prompt is refused."""
ANSWER_SEAL_KEY = "answer-seal"
"""The key of the secret that seals asks, in ``Subjects.secret_bucket``."""
INBOX_ROOT = "_INBOX"
"""First token of the reply inboxes NATS clients make; an ask is answered only under it."""
SERVER_API_SUBJECTS = ("$JS.>", "$KV.>", "$O.>")
"""JetStream's API, key-value and object-store subjects (stream purge and delete among them)."""


def inbox_all(inbox_prefix: str) -> str:
    """Every reply inbox under ``inbox_prefix``."""
    return f"{inbox_prefix}.>"


class EventKind(StrEnum):
    """The last token of an event subject."""

    ACCEPTED = "accepted"
    STARTED = "started"
    TOKEN = "token"
    TOOL_CALL = "tool_call"
    PROMPT_PROGRESS = "prompt_progress"
    PROVISIONAL = "provisional"
    COMMIT = "commit"
    ABORTED = "aborted"
    DONE = "done"
    ERROR = "error"
    STATUS = "status"


class AdminVerb(StrEnum):
    """The last token of an admin subject."""

    SESSIONS = "sessions"
    SESSION = "session"
    METRICS = "metrics"
    HEALTH = "health"
    DELETE = "delete"
    COUNT_TOKENS = "count_tokens"


NODE_WIDE_VERBS = frozenset(
    {AdminVerb.HEALTH, AdminVerb.SESSIONS, AdminVerb.METRICS, AdminVerb.SESSION}
)
"""Admin verbs every node receives: health, sessions and metrics each node answers for
itself (a client gathers the replies); one session's history only the node owning it."""


def is_session_id(value: str) -> bool:
    """True when ``value`` is a valid session id (one subject token)."""
    return SESSION_ID_RE.fullmatch(value) is not None


MEMBER_KEY_PREFIX = "member."
"""Keys of the lease bucket that name a live node rather than a partition."""


def partition_of(session: str, partitions: int) -> int:
    """The partition of ``session``: FNV-1a (32 bit) of its id, modulo ``partitions``.

    It is the hash NATS's ``partition()`` subject transform computes, which the intake
    stream applies as it stores a prompt (``intake_transform``): the node and the server
    agree on every session's partition without asking each other.
    """
    h = 0x811C9DC5
    for byte in session.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


@dataclass(frozen=True)
class Subjects:
    """Subject builders for one prefix (default ``infer``)."""

    prefix: str = "infer"
    node: str = ""
    """The node whose engine and bank subjects these are; "" for the unscoped ones. Each
    node of a cluster scopes them, so a runner's turn never reaches another node's engine."""

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(
                f"subject prefix {self.prefix!r} must be dot-separated tokens of "
                "letters, digits, '_' or '-', such as 'infer' or 'team1.infer'"
            )
        if self.node and not is_session_id(self.node):
            raise ValueError(
                f"node id {self.node!r} must be 1-128 letters, digits, '_' or '-'"
            )

    # -- public ---------------------------------------------------------------------------
    def prompt(self, session: str) -> str:
        """Where an agent publishes a prompt for ``session``."""
        return f"{self.prefix}.prompt.{session}"

    def prompt_all(self) -> str:
        """Every prompt subject (the intake stream's filter)."""
        return f"{self.prefix}.prompt.>"

    def prompt_unsessioned(self) -> tuple[str, str]:
        """Stored prompts the transform left under ``prompt``, refused by any node: those
        with more than one token after ``prompt``, and those whose one token is a literal
        ``*`` or ``>`` (the server publishes them, and moves no wildcard subject to a
        partition). Two filters, not the stream's own one, which a consumer would take for
        "every message"."""
        return f"{self.prefix}.prompt.*", f"{self.prefix}.prompt.*.>"

    def intake_transform(self, partitions: int) -> tuple[str, str]:
        """``(source, destination)`` of the intake stream's subject transform: a prompt is
        stored under ``<prefix>.intake.<partition>.<session>`` (see ``partition_of``)."""
        dest = f"{self.prefix}.intake.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"
        return f"{self.prefix}.prompt.*", dest

    def intake(self, partition: int | str = "*") -> str:
        """The stored prompts of one partition (default: of every partition)."""
        return f"{self.prefix}.intake.{partition}.*"

    def session_of_prompt(self, subject: str) -> str:
        """The session token of a stored prompt's subject (possibly invalid; check it)."""
        untransformed = f"{self.prefix}.prompt."
        if subject.startswith(untransformed):  # more than one token: never a session id
            return subject[len(untransformed):]
        return subject[len(self.prefix) + len(".intake."):].partition(".")[2]

    def event_of(self, subject: str) -> tuple[str, str]:
        """``(session, kind)`` of an event subject (tokens unchecked; ``ValueError`` if none)."""
        head = f"{self.prefix}.events."
        session, dot, kind = subject[len(head):].rpartition(".")
        if not subject.startswith(head) or not dot:
            raise ValueError(f"{subject!r} is not an event subject under {self.prefix!r}")
        return session, kind

    def abort(self, session: str) -> str:
        """Request-reply subject that aborts the running turn of ``session``."""
        return f"{self.prefix}.abort.{session}"

    def abort_all(self) -> str:
        """Every abort subject."""
        return f"{self.prefix}.abort.*"

    def session_of_abort(self, subject: str) -> str:
        """The session token of an abort subject."""
        return subject[len(self.prefix) + len(".abort.") :]

    def ask(self, session: str) -> str:
        """Request subject whose reply is the answer of the turn that answers the prompt."""
        return f"{self.prefix}.ask.{session}"

    def ask_all(self) -> str:
        """Every ask subject (the micro service's ``ask`` endpoint)."""
        return f"{self.prefix}.ask.*"

    def session_of_ask(self, subject: str) -> str:
        """The session token of an ask subject (possibly invalid; check it)."""
        return subject[len(self.prefix) + len(".ask.") :]

    def may_answer(self, subject: str, node_inbox: str) -> bool:
        """True when the node may publish an answer to ``subject`` (a requester's inbox).

        The node may publish anywhere, so any other reply subject (an application's
        ``orders.create``, a server API, another deployment's prompts or admin verbs) would
        make it publish there for the requester: only a reply inbox under ``_INBOX`` is
        answered, and never one under ``node_inbox``, the node's own connections' prefix
        (unless that is the bare ``_INBOX``), where its actors' replies travel.
        """
        tokens = subject.split(".")
        if not (
            len(tokens) >= 2 and tokens[0] == INBOX_ROOT and all(tokens)
            and not any(c in subject for c in " \t\r\n*>")
        ):
            return False
        return node_inbox == INBOX_ROOT or not f"{subject}.".startswith(f"{node_inbox}.")

    def events(self, session: str, kind: EventKind | str) -> str:
        """Where the node publishes one kind of event of ``session``."""
        return f"{self.prefix}.events.{session}.{kind}"

    def events_all(self, session: str = "*") -> str:
        """Every event of ``session`` (default: of every session)."""
        return f"{self.prefix}.events.{session}.>"

    def event_kind(self, subject: str) -> str:
        """The kind (last token) of an event subject."""
        return subject.rsplit(".", 1)[-1]

    def rejected(self) -> str:
        """Error events for prompts that name no valid session."""
        return f"{self.prefix}.rejected"

    def admin(self, verb: AdminVerb | str) -> str:
        """Operator request-reply subject."""
        return f"{self.prefix}.admin.{verb}"

    def admin_group(self, verb: AdminVerb) -> str | None:
        """The queue group of an admin endpoint: this node's own for the verbs every node
        receives (``NODE_WIDE_VERBS``), None (the micro service's shared group: any one
        node answers) for the others."""
        if verb in NODE_WIDE_VERBS and self.node:
            return f"node-{self.node}"
        return None

    def admin_all(self) -> str:
        """Every admin subject."""
        return f"{self.prefix}.admin.>"

    def records(self, session: str) -> str:
        """The durable record log of ``session``."""
        return f"{self.prefix}.records.{session}"

    def records_all(self) -> str:
        """Every record log (the record stream's filter)."""
        return f"{self.prefix}.records.>"

    # -- internal: actor to actor ---------------------------------------------------------
    def internal_all(self) -> str:
        """Every internal subject (only the node's own user may use them)."""
        return f"{self.prefix}.internal.>"

    @property
    def _local(self) -> str:
        """Root of the subjects that stay inside one node (its engine and bank)."""
        if self.node:
            return f"{self.prefix}.internal.node.{self.node}"
        return f"{self.prefix}.internal"

    def admit(self, session: str) -> str:
        """Admission → session runner: record this prompt (request-reply)."""
        return f"{self.prefix}.internal.admit.{session}"

    def admit_all(self) -> str:
        """Every admit subject (the runner host's subscription)."""
        return f"{self.prefix}.internal.admit.*"

    def session_control(self, session: str) -> str:
        """Admin → session runner: delete / inspect one session (request-reply)."""
        return f"{self.prefix}.internal.session.{session}"

    def session_control_all(self) -> str:
        """Every session-control subject."""
        return f"{self.prefix}.internal.session.*"

    def session_of_control(self, subject: str) -> str:
        """The session token of a session-control subject."""
        return subject[len(self.prefix) + len(".internal.session.") :]

    def engine_generate(self) -> str:
        """Session runner → engine: run one turn (request; result to the reply inbox)."""
        return f"{self._local}.engine.generate"

    def engine_cancel(self, session: str) -> str:
        """Session runner → engine: stop the running turn of ``session``."""
        return f"{self._local}.engine.cancel.{session}"

    def engine_cancel_all(self) -> str:
        """Every engine cancel subject."""
        return f"{self._local}.engine.cancel.*"

    def engine_turn_status(self) -> str:
        """Is a session's turn still running in the engine? (``TurnStatusRequest``)."""
        return f"{self._local}.engine.status"

    def engine_snapshot(self) -> str:
        """Bank committer → engine: snapshot a session's KV state into the bank."""
        return f"{self._local}.engine.snapshot"

    def engine_forget(self) -> str:
        """Session runner → engine: drop a deleted session's slot and bank entries."""
        return f"{self._local}.engine.forget"

    def engine_adopt(self) -> str:
        """Session runner host → engine: sessions moved here; index their banked snapshots."""
        return f"{self._local}.engine.adopt"

    def engine_bank_flush(self) -> str:
        """Session runner host → engine: bank sessions handed to another node durably now."""
        return f"{self._local}.engine.flush"

    def bank_commit(self) -> str:
        """Session runner → bank committer: bank the turn that was just committed."""
        return f"{self._local}.bank.commit"

    # -- JetStream ------------------------------------------------------------------------
    @property
    def _stream_base(self) -> str:
        return self.prefix.replace(".", "_").replace("-", "_").upper()

    @property
    def prompt_stream(self) -> str:
        """Stream capturing prompt intake."""
        return f"{self._stream_base}_PROMPTS"

    @property
    def intake_origin_stream(self) -> str:
        """An empty stream the intake sources from: JetStream keeps de-duplication off only
        on a stream with a source, and the intake must have none (a ``Nats-Msg-Id`` is an
        agent's own, so one session's would drop another session's prompt)."""
        return f"{self._stream_base}_PROMPTS_ORIGIN"

    def intake_origin(self) -> str:
        """The one subject of ``intake_origin_stream``; nothing publishes there."""
        return f"{self.prefix}.internal.intake.origin"

    @property
    def intake_marks_stream(self) -> str:
        """Stream of the in-flight marks of the intake's prompts (``actors.intake_marks``)."""
        return f"{self._stream_base}_INTAKE_MARKS"

    def intake_mark(self, intake_seq: int) -> str:
        """The mark of the prompt at ``intake_seq`` in the intake stream."""
        return f"{self.prefix}.internal.intake.mark.{intake_seq}"

    def intake_mark_all(self) -> str:
        """Every in-flight mark (the marks stream's filter)."""
        return f"{self.prefix}.internal.intake.mark.*"

    @property
    def record_stream(self) -> str:
        """Stream holding every session's record log."""
        return f"{self._stream_base}_RECORDS"

    @property
    def bank_bucket(self) -> str:
        """Object store bucket of the bank's durable tier."""
        return f"{self._stream_base}_BANK"

    @property
    def bank_object_stream(self) -> str:
        """The JetStream stream behind the bank's object store (``OBJ_<bucket>``)."""
        return self.object_stream(self.bank_bucket)

    @staticmethod
    def object_stream(bucket: str) -> str:
        """The JetStream stream behind object store ``bucket`` (JetStream names it so)."""
        return f"OBJ_{bucket}"

    @staticmethod
    def stream_message_delete(stream: str) -> str:
        """JetStream's API subject that deletes one message of ``stream``."""
        return f"$JS.API.STREAM.MSG.DELETE.{stream}"

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The JetStream stream behind KV bucket ``bucket`` (JetStream names it so)."""
        return f"KV_{bucket}"

    def bank_object_meta(self, name: str) -> str:
        """The object store's metadata subject of object ``name`` (JetStream's object store
        layout: ``$O.<bucket>.M.<url-safe base64 of the name>``)."""
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        return f"$O.{self.bank_bucket}.M.{encoded}"

    @property
    def gateway_bucket(self) -> str:
        """KV bucket where OpenAI gateways index committed conversations (shared by all)."""
        return f"{self._stream_base}_GATEWAY"

    @property
    def gateway_answers_bucket(self) -> str:
        """KV bucket of answers kept for retried ``Idempotency-Key`` requests (with a TTL)."""
        return f"{self._stream_base}_GATEWAY_ANSWERS"

    def admission_consumer(self, partition: int | None) -> str:
        """Durable consumer of one partition's prompts (its owner's admission pulls it), or
        with None of the prompts no partition holds (every node refuses them)."""
        return f"admission-{'invalid' if partition is None else partition}"

    @property
    def secret_bucket(self) -> str:
        """KV bucket of the deployment's secrets (the ask seal's key): only the node's user
        may read it (JetStream's API is closed to agents)."""
        return f"{self._stream_base}_SECRETS"

    @property
    def lease_bucket(self) -> str:
        """KV bucket of the partition leases (one key per partition, with a TTL)."""
        return f"{self._stream_base}_LEASES"

    def lease_key(self, partition: int) -> str:
        """The lease key of one partition."""
        return f"partition.{partition}"

    def member_key(self, node: str) -> str:
        """The membership key of one node in the lease bucket (renewed with its leases)."""
        return f"{MEMBER_KEY_PREFIX}{node}"

    @property
    def service_name(self) -> str:
        """Name under which the node registers as a NATS micro service."""
        return "infernode"

    def service_info(self) -> str:
        """The micro service's INFO subject (its metadata names the model file)."""
        return f"$SRV.INFO.{self.service_name}"
