"""docs/ARCHITECTURE.md names only what exists: its files, its functions, its tests, and the
section numbers that code and tests cite."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()

PATH = re.compile(r"(?<![\w/.])((?:actors|node|schemas|tests)/(?:[\w]+/)*\w+\.py)\b")
QUALIFIED = re.compile(
    r"(?<![\w/.])((?:actors|node|schemas|tests)/(?:[\w]+/)*\w+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
)
TEST = re.compile(r"(?<![\w/.])(tests/(?:[\w]+/)*\w+\.py)::(test_\w+)")
MEMBER = re.compile(r"`([A-Z]\w*)\.([A-Za-z_]\w*)`")
"""A backticked ``Class.member`` named without its file."""
PACKAGES = ("actors", "node", "schemas", "tests")
TOP_SECTIONS = (
    "Layout", "Subjects", "Messages", "Session runner invariants", "Engine", "Bank",
    "Durability", "Many nodes", "Running it",
)
"""The first nine sections, whose numbers citations in the code rely on."""


def where_is() -> str:
    """The text of the "Where is…?" section."""
    return DOC.split("## Where is", 1)[1].split("\n## ", 1)[0]


@cache
def names_in(path: str) -> dict[str, ast.AST]:
    """Qualified names (``f``, ``C``, ``C.m``, ``CONST``) defined in a module."""
    tree = ast.parse((ROOT / path).read_text())
    found: dict[str, ast.AST] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found[prefix + node.name] = node
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        found[prefix + target.id] = node

    visit(tree.body, "")
    for node in ast.walk(tree):  # attributes a class's methods set: ``self.name = ...``
        if isinstance(node, ast.ClassDef):
            for inner in ast.walk(node):
                if (isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store)
                        and isinstance(inner.value, ast.Name) and inner.value.id == "self"):
                    found.setdefault(f"{node.name}.{inner.attr}", inner)
    return found


@cache
def classes() -> dict[str, list[str]]:
    """Every class of our packages, by name: the files defining one of that name."""
    out: dict[str, list[str]] = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            for name, node in names_in(path).items():
                if isinstance(node, ast.ClassDef) and "." not in name:
                    out.setdefault(name, []).append(path)
    return out


def test_every_file_the_architecture_document_names_exists():
    """Each actors/, node/, schemas/ or tests/ path in docs/ARCHITECTURE.md is a real file."""
    paths = set(PATH.findall(DOC))
    assert len(paths) >= 60
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_every_function_the_where_is_section_names_is_defined_in_its_file():
    """Each `file.py:name` of the "Where is…?" section is defined there (def, class or method)."""
    refs = QUALIFIED.findall(where_is())
    assert len(refs) >= 15
    missing = [f"{p}:{n}" for p, n in refs if n not in names_in(p)]
    assert not missing, f"the Where is section names what its file does not define: {missing}"


def test_every_file_qualified_name_in_the_document_is_defined_in_its_file():
    """Beyond the "Where is…?" section, each `file.py:name` the document names exists too."""
    refs = QUALIFIED.findall(DOC)
    assert len(refs) >= 80
    missing = sorted({f"{p}:{n}" for p, n in refs if n not in names_in(p)})
    assert not missing, f"docs/ARCHITECTURE.md names what its file does not define: {missing}"


def test_every_test_the_document_cites_exists():
    """Each `tests/x.py::test_y` that the document gives as proof is a test in that file."""
    refs = TEST.findall(DOC)
    assert len(refs) >= 30
    missing = sorted({f"{p}::{n}" for p, n in refs if n not in names_in(p)})
    assert not missing, f"docs/ARCHITECTURE.md cites tests that do not exist: {missing}"


def test_sections_keep_the_numbers_code_cites():
    """§1–§9 keep their titles in order, and §4 has the eight invariants 4.1–4.8."""
    numbered = re.findall(r"^## (\d+)\. (.+)$", DOC, re.M)
    first = [(int(n), title) for n, title in numbered][: len(TOP_SECTIONS)]
    assert first == list(enumerate(TOP_SECTIONS, start=1))
    assert [int(n) for n, _ in numbered] == list(range(1, len(numbered) + 1))
    invariants = DOC.split("## 4. ", 1)[1].split("\n## 5. ", 1)[0]
    assert re.findall(r"^### (4\.\d) ", invariants, re.M) == [f"4.{i}" for i in range(1, 9)]


def test_every_class_member_the_document_names_exists():
    """Each backticked `Class.member` names a class of ours that defines or sets that member."""
    refs = set(MEMBER.findall(DOC))
    assert len(refs) >= 60
    missing = sorted(
        f"{c}.{m}" for c, m in refs
        if not any(f"{c}.{m}" in names_in(p) for p in classes().get(c, ()))
    )
    assert not missing, f"docs/ARCHITECTURE.md names members no class defines: {missing}"
