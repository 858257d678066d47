"""A turn's cost in the session runner does not grow with its session's log: the runner builds
a turn's request from the system head and the window, finds the window where it left it, and
looks at the history's tool calls only for a prompt that answers one (counted, not timed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from actors.session.conversation import WindowCut, conversation
from actors.session.state import HistoryItem, Pending, SessionState
from actors.session.tools import tool_refusal
from schemas.chat import ChatMessage
from schemas.messages import PromptRequest
from schemas.records import UserRecord

SYSTEM = ChatMessage(role="system", content="keep the window")


class CountingList(list[HistoryItem]):
    """A history that counts the items read from it."""

    reads = 0

    def __getitem__(self, index: Any) -> Any:
        got = super().__getitem__(index)
        self.reads += len(got) if isinstance(index, slice) else 1
        return got

    def __iter__(self) -> Iterator[HistoryItem]:
        for item in super().__iter__():
            self.reads += 1
            yield item


def history_of(turns: int) -> CountingList:
    """A system message, then ``turns`` question-and-answer pairs."""
    items = CountingList([HistoryItem("sys", SYSTEM)])
    for n in range(turns):
        items.append(HistoryItem(f"u{n}", ChatMessage(role="user", content=f"question {n}")))
        items.append(HistoryItem(f"a{n}", ChatMessage(role="assistant", content=f"answer {n}"),
                                 (n, n + 1), "model"))
    return items


def question(n: int) -> Pending:
    message = ChatMessage(role="user", content=f"new question {n}")
    return Pending(UserRecord(id=f"q{n}", message=message, ts=0.0), wants_reply=True)


def test_a_turns_request_holds_the_system_head_and_the_window_and_counts_the_rest():
    """The request leaves out exactly the messages before the window, counted as messages and
    whole turns, and indexes the kept assistant token ids in its own messages."""
    st = SessionState("s", history=history_of(50), window_from="u40")
    convo = conversation(st, [question(0)], WindowCut(), whole=False)
    kept = [h.message for h in st.history[:1] + st.history[81:]]
    assert convo.messages == (*kept, question(0).record.message)
    assert (convo.window_start, convo.omitted, convo.omitted_turns) == (81, 80, 40)
    assert convo.assistant_tokens == {2 + 2 * i: (40 + i, 41 + i) for i in range(10)}
    whole = conversation(st, [question(0)], WindowCut(), whole=True)
    assert len(whole.messages) == 102 and whole.omitted == 0 and whole.window_start == 81


def test_the_window_is_found_where_it_was_left_not_by_walking_the_whole_log():
    """Turn after turn on a 1,000-turn session, each turn reads the window and what its
    window passed since the last turn, never the log before it again."""
    st = SessionState("s", history=history_of(1000), window_from="u990")
    cut = WindowCut()
    conversation(st, [question(0)], cut, whole=False)
    for n in range(1, 30):
        st.history.extend([HistoryItem(f"x{n}", ChatMessage(role="user", content="more")),
                           HistoryItem(f"y{n}", ChatMessage(role="assistant", content="ok"))])
        if n % 10 == 0:
            st.window_from = f"x{n - 5}"  # the window moved on
        st.history.reads = 0
        convo = conversation(st, [question(n)], cut, whole=False)
        assert st.history.reads < 60, f"turn {n} read {st.history.reads} history items"
        assert convo.omitted_turns == sum(
            1 for h in st.history[1:convo.window_start] if h.message.role == "user")
        assert convo.omitted + len(convo.messages) == len(st.history) + 1


def test_a_prompt_without_tool_results_never_walks_the_history_for_tool_calls():
    """Only a prompt holding a tool result is checked against the session's calls."""
    st = SessionState("s", history=history_of(1000))
    st.history.reads = 0
    prompt = PromptRequest(messages=(ChatMessage(role="user", content="go on"),))
    assert tool_refusal(st, prompt) is None
    assert st.history.reads == 0
    answer = ChatMessage(role="tool", content="42", tool_call_id="call_1")
    refused = tool_refusal(st, PromptRequest(messages=(answer,)))
    assert refused is not None and refused.details["tool_call_id"] == "call_1"
