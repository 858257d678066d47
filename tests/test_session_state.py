"""SessionState: what the runner does live, a replay of its records does again."""

from __future__ import annotations

import itertools

from actors.session.state import SessionState, parents_of, rebuild, supersedes_of
from schemas.chat import ChatMessage
from schemas.records import (
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    DeleteRecord,
    ProvisionalRecord,
    Record,
    TurnStartRecord,
    UserRecord,
)

_ids = itertools.count()


def user(text: str, reply: bool = True, seq: int | None = None) -> UserRecord:
    return UserRecord(
        id=f"msg_{text}", message=ChatMessage(role="user", content=text), reply=reply,
        intake_seq=seq, ts=float(next(_ids)),
    )


def start(turn: str, inputs: list[UserRecord], parents: list[UserRecord]) -> TurnStartRecord:
    return TurnStartRecord(
        id=turn, input_ids=tuple(u.id for u in inputs), parent_ids=tuple(u.id for u in parents),
        ts=0.0,
    )


def committed(turn: str, parents: list[UserRecord], generation: int,
              supersedes: str | None = None) -> list[Record]:
    ids = tuple(u.id for u in parents)
    text = f"answer {turn}"
    return [
        AssistantRecord(id=f"a_{turn}", turn_id=turn, parent_ids=ids, finish_reason="stop",
                        message=ChatMessage(role="assistant", content=text), ts=0.0),
        CommitRecord(id=f"c_{turn}", turn_id=turn, assistant_id=f"a_{turn}",
                     generation=generation, parent_ids=ids, supersedes=supersedes, ts=0.0),
    ]


def aborted(turn: str, reason: str) -> list[Record]:
    return [
        ProvisionalRecord(id=f"p_{turn}", turn_id=turn, parent_ids=(),
                          message=ChatMessage(role="assistant", content="part"), ts=0.0),
        AbortRecord(id=f"x_{turn}", turn_id=turn, provisional_id=f"p_{turn}", reason=reason,
                    ts=0.0),
    ]


def contents(state: SessionState) -> list[str | None]:
    return [h.message.content for h in state.history]


def test_a_folded_append_keeps_log_order_after_a_rebuild():
    """An append folded into the history while idle sits before the next turn's input."""
    note, q = user("note", reply=False), user("q")
    state = rebuild("s", [note, q, start("t1", [q], [q]), *committed("t1", [q], 1)])
    assert contents(state) == ["note", "q", "answer t1"]
    assert state.pending == [] and state.generation == 1


def test_a_client_abort_defers_its_input_until_a_retry():
    """After a client abort the input waits, answered by a retry that supersedes it."""
    q = user("q")
    state = rebuild("s", [q, start("t1", [q], [q]), *aborted("t1", "client")])
    assert state.generation == 0 and state.has_deferred() and not state.wants_turn()
    assert state.retry_deferred() and state.wants_turn()
    taken = state.take_pending()
    assert parents_of(taken) == ("msg_q",) and supersedes_of(taken) == "p_t1"


def test_a_retried_turn_aborted_again_stays_deferred_after_a_rebuild():
    """A retry leaves no record of its own; its turn start says what it answered."""
    q = user("q")
    state = rebuild("s", [
        q, start("t1", [q], [q]), *aborted("t1", "client"),
        start("t2", [q], [q]), *aborted("t2", "client"),
    ])
    assert state.has_deferred()
    state.retry_deferred()
    assert supersedes_of(state.take_pending()) == "p_t2"


def test_a_new_question_after_an_abort_keeps_the_old_one_as_context():
    """A new question instead of a retry: the aborted input is context, not a parent."""
    q, r = user("q"), user("r")
    state = rebuild("s", [q, start("t1", [q], [q]), *aborted("t1", "client"), r])
    assert not state.has_deferred() and state.wants_turn()
    taken = state.take_pending()
    assert [p.record.id for p in taken] == ["msg_q", "msg_r"]
    assert parents_of(taken) == ("msg_r",) and supersedes_of(taken) is None


def test_a_shutdown_abort_is_answered_again_and_superseded():
    """A turn cut by a shutdown or restart is retried without being asked again."""
    q = user("q")
    for reason in ("shutdown", "node_restart"):
        state = rebuild("s", [q, start("t1", [q], [q]), *aborted("t1", reason)])
        assert state.wants_turn() and not state.has_deferred()
        assert supersedes_of(state.take_pending()) == "p_t1"


def test_a_context_overflow_drops_its_input():
    """A turn whose input cannot fit drops it; nothing waits, the history is unchanged."""
    q = user("q")
    state = rebuild("s", [q, start("t1", [q], [q]), *aborted("t1", "context_overflow")])
    assert state.pending == [] and state.history == []


def test_an_interrupted_turn_is_left_open_for_the_host_to_close():
    """A turn start with no end is the open turn; its input is out of pending."""
    q = user("q")
    state = rebuild("s", [q, start("t1", [q], [q])])
    assert state.open_turn is not None and state.open_turn.id == "t1"
    assert [p.record.id for p in state.open_taken] == ["msg_q"]


def test_a_delete_record_resets_the_session():
    """Records before a delete are history no more."""
    q = user("q")
    state = rebuild("s", [q, start("t1", [q], [q]), *committed("t1", [q], 1),
                          DeleteRecord(id="d", ts=0.0)])
    assert state.generation == 0 and state.history == [] and state.pending == []


def test_intake_sequences_map_to_every_record_of_their_prompt():
    """A redelivered prompt is recognised, with the ids of what was already recorded."""
    state = SessionState("s")
    for text in ("a", "b"):
        state.add_user(user(text, seq=7))
    assert state.intake_seqs == {7: ("msg_a", "msg_b")}


def test_appends_are_not_folded_while_an_aborted_input_waits():
    """A ``reply: false`` append after an abort waits behind the deferred input."""
    q, note = user("q"), user("note", reply=False)
    state = rebuild("s", [q, start("t1", [q], [q]), *aborted("t1", "client"), note])
    state.fold_unanswered_appends()
    assert [p.record.id for p in state.pending] == ["msg_q", "msg_note"]
    assert state.history == []
