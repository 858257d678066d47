"""What a session checks before it records a prompt that uses tools.

These refusals need the session's state (its tool set and the calls in its history), so
they run in the runner, before anything is recorded; checks that need only the prompt are
in its schema (``schemas/messages.py``) and in admission (``actors/engine/constraints.py``).
"""

from __future__ import annotations

from actors.session.state import SessionState
from schemas.errors import ErrorCode, InferError
from schemas.messages import PromptRequest
from schemas.tools import NamedToolChoice, Tool, forced_tool


def tool_refusal(state: SessionState, prompt: PromptRequest) -> InferError | None:
    """Why ``prompt`` cannot be recorded in ``state``'s session, or None."""
    tools = prompt.tools if prompt.tools is not None else state.tools
    refusal = _choice_refusal(state.session, tools, prompt)
    if refusal is not None:
        return refusal
    if not any(m.role == "tool" for m in prompt.messages):
        return None  # the session's calls are looked at only for a tool result to check
    known = state.call_ids()
    for i, m in enumerate(prompt.messages):
        if m.role == "tool" and m.tool_call_id not in known:
            return InferError(
                ErrorCode.BAD_REQUEST,
                f"the tool message answers call {m.tool_call_id!r}, which no assistant message "
                f"of session {state.session} made; nothing was recorded",
                {"tool_call_id": m.tool_call_id or "", "param": f"messages.{i}.tool_call_id"},
            )
        known.update(c.id for c in m.tool_calls or ())
    return None


def _choice_refusal(
    session: str, tools: tuple[Tool, ...], prompt: PromptRequest
) -> InferError | None:
    choice = prompt.tool_choice
    names = [t.function.name for t in tools]
    if forced_tool(choice) and not tools:
        return InferError(
            ErrorCode.BAD_REQUEST,
            f"tool_choice forces a tool call but session {session} has no tools; send "
            "`tools` with the prompt; nothing was recorded",
            {"param": "tool_choice"},
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        return InferError(
            ErrorCode.BAD_REQUEST,
            f"tool_choice names the function {choice.function.name!r}, which is not among "
            f"session {session}'s tools ({', '.join(names)}); nothing was recorded",
            {"tool": choice.function.name, "param": "tool_choice"},
        )
    return None
