"""The code keeps the shape docs/ARCHITECTURE.md §1-§2 gives it: subjects spelled only in
schemas, a typed internal protocol (no magic bytes on the bus), and no import circles among
our packages.
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
_FIRST_TOKENS = r"prompt|intake|abort|events|admin|internal|records|rejected"
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


OUR_PACKAGES = ("schemas", "actors", "node")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports (type-only and local imports too)."""
    modules = {_module_name(p): p for p in _python_files(*OUR_PACKAGES)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for n in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                # ``from actors.engine import llama_api`` imports the module llama_api
                targets = [f"{n.module}.{a.name}" for a in n.names] + [n.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_reports_a_circle_and_nothing_else():
    """The finder sees a two-module circle and passes a chain."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles_among_our_packages():
    """No module of schemas, actors or node reaches itself through imports (type-only too)."""
    assert _cycles(_import_graph()) == []


def test_imports_go_one_way_node_actors_schemas():
    """schemas imports nothing of ours; actors import nothing of node."""
    for name, edges in _import_graph().items():
        if name.startswith("schemas"):
            assert not {e for e in edges if not e.startswith("schemas")}, name
        if name.startswith("actors"):
            assert not {e for e in edges if e.startswith("node")}, name


def test_actor_constructors_take_settings_without_defaults_of_their_own():
    """Every actor's ``__init__`` in actors/ has no default values: the config owns them."""
    found = []
    for path in _python_files("actors"):
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(cls, ast.ClassDef):
                continue
            bases = {b.id for b in cls.bases if isinstance(b, ast.Name)}
            if "Actor" not in bases:
                continue
            for fn in cls.body:
                if not (isinstance(fn, ast.FunctionDef) and fn.name == "__init__"):
                    continue
                if fn.args.defaults or any(d is not None for d in fn.args.kw_defaults):
                    found.append(f"{path.relative_to(ROOT)}:{cls.name}")
    assert not found, "actors with defaults of their own: " + ", ".join(found)


WIRED = {"Admission", "BankCommitter", "RunnerHost", "AdminActor", "NodeService", "EngineActor"}


def test_the_node_and_the_tests_node_build_actors_only_through_the_wiring():
    """Only node/wiring.py builds the node's actors, so both nodes run with one set of limits."""
    found = []
    for path in [*_python_files("node"), ROOT / "tests" / "fake_engine.py"]:
        if path.name == "wiring.py":
            continue
        for n in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in WIRED:
                found.append(f"{path.relative_to(ROOT)}:{n.lineno}: {n.func.id}")
    assert not found, "actors built outside node/wiring.py:\n" + "\n".join(found)
