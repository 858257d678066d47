"""The ask door's seal on ``Infer-Answer-To``: the node answers only where an ask came from.

An agent may publish a prompt straight into the intake with any headers, so admission cannot
tell an ask from a forged ``Infer-Answer-To`` by the header alone, and the node, which may
publish anywhere, would send the answer wherever the header points. The ask door, which saw
the reply subject NATS delivered with the request, seals it instead: an HMAC-SHA256 over the
session, the prompt's ``Nats-Msg-Id`` and the inbox, keyed by a secret that every node of the
deployment reads from JetStream (``node.streams.answer_seal_secret``) and no agent can read.
Admission honours ``Infer-Answer-To`` only with the seal that matches it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from schemas.subjects import ANSWER_SEAL_HEADER, ANSWER_TO_HEADER, MSG_ID_HEADER


def seal(secret: bytes, session: str, msg_id: str, inbox: str) -> str:
    """The seal of an ask of ``session`` with header ``Nats-Msg-Id: msg_id``, answered to
    ``inbox`` (hex)."""
    # NUL never occurs in a subject or a header value: the fields cannot run into each other.
    text = "\0".join((session, msg_id, inbox)).encode()
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def is_sealed(secret: bytes, session: str, headers: Mapping[str, str]) -> bool:
    """True when ``headers`` carry an ``Infer-Answer-To`` the ask door sealed for ``session``."""
    inbox, got = headers.get(ANSWER_TO_HEADER), headers.get(ANSWER_SEAL_HEADER)
    if inbox is None or got is None:
        return False
    want = seal(secret, session, headers.get(MSG_ID_HEADER, ""), inbox)
    return hmac.compare_digest(want, got)
