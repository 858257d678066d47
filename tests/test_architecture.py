"""The code keeps the shape DESIGN.md gives it: subjects spelled only in schemas, a typed
internal protocol (no magic bytes on the bus), and no import circles among our packages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_SCHEMAS = ("actors", "node")

# A subject is dot-separated tokens: the prefix, then one of our first tokens; or anything
# ending in a wildcard; or a NATS system subject. File names ("nats.url") and dotted module
# paths ("actors.engine.actor") do not match.
_FIRST_TOKENS = r"prompt|abort|events|admin|internal|records|rejected"
_SUBJECT_RE = re.compile(
    rf"^[A-Za-z0-9_{{}}-]+\.({_FIRST_TOKENS})(\.|$)"
    r"|^[A-Za-z0-9_{}-]+(\.[A-Za-z0-9_{}-]+)*\.[*>]$"
    r"|^\$(SRV|JS|KV|O)\."
)


def _python_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant, and every f-string with ``{}`` for its placeholders."""
    out: list[tuple[int, str]] = []
    inside_fstring: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                for v in node.values
            )
            out.append((node.lineno, text))
            inside_fstring.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in inside_fstring):
            out.append((node.lineno, node.value))
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    """Line numbers of docstrings (prose may name a subject to explain it)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                lines.add(body[0].value.lineno)
        # attribute docstrings: a bare string right after an assignment
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            for stmt in stmts if isinstance(stmts, list) else []:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    lines.add(stmt.value.lineno)
    return lines


def test_subject_pattern_recognises_subjects_and_spares_other_strings():
    """The detector flags the shapes a subject takes and leaves file and module names alone."""
    for subject in ("infer.prompt.s1", "{}.events.{}.{}", "{}.internal.engine.status",
                    "infer.abort.*", "{}.records.>", "$SRV.PING", "x.y.>"):
        assert _SUBJECT_RE.search(subject), subject
    for other in ("nats.url", "actors.engine.actor", "infernode-{}", "demo-random-llama.gguf",
                  "session {} was deleted", "engine", "127.0.0.1", "a.b.c", "infer"):
        assert not _SUBJECT_RE.search(other), other


def test_no_subject_literal_appears_in_actors_or_node():
    """Every subject is built by schemas.subjects; actors and node only call its builders."""
    found = []
    for path in _python_files(*OUTSIDE_SCHEMAS):
        tree = ast.parse(path.read_text(), str(path))
        prose = _docstrings(tree)
        for line, text in _strings(tree):
            if line not in prose and _SUBJECT_RE.search(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "subject literals outside schemas:\n" + "\n".join(found)


def _bus_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        and n.func.attr in {"publish", "request", "respond"}
    ]


def test_no_raw_bytes_are_sent_between_actors():
    """Requests and replies on the bus are encoded models, never ``b"1"`` or hand-made JSON."""
    found = []
    for path in _python_files(*OUTSIDE_SCHEMAS):
        tree = ast.parse(path.read_text(), str(path))
        for call in _bus_calls(tree):
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                for node in ast.walk(arg):
                    # ``{}`` is the documented body of the admin verbs that take no arguments
                    if (isinstance(node, ast.Constant) and isinstance(node.value, bytes)
                            and node.value != b"{}"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "raw bytes on the bus:\n" + "\n".join(found)


def test_no_subject_is_parsed_by_splitting_outside_schemas():
    """Subject tokens are read by ``Subjects`` helpers, not ``split(".")``/``rsplit(".")``."""
    found = []
    for path in _python_files(*OUTSIDE_SCHEMAS):
        tree = ast.parse(path.read_text(), str(path))
        for n in ast.walk(tree):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in {"split", "rsplit", "rpartition", "partition"}
                    and isinstance(n.func.value, ast.Attribute)
                    and n.func.value.attr == "subject"):
                found.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert not found, "subjects split by hand:\n" + "\n".join(found)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module)
    return out


def test_a_session_runner_reaches_only_its_bus_never_its_host():
    """Runner, turn, mailbox and state modules import neither the host nor a NATS client."""
    for name in ("runner", "turn", "mailbox", "state"):
        imported = _imports(ROOT / "actors" / "session" / f"{name}.py")
        assert "actors.session.host" not in imported, name
        assert not any(m == "nats" or m.startswith("nats.") for m in imported), name
