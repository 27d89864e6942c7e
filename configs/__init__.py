"""The shipped shift configs (YAML), installed with the package so `imagenetpp demo` and
`imagenetpp curate configs/<name>.yaml` work from a wheel as from the source tree."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled(name: str) -> Path | None:
    """The shipped config ``name`` (``demo_knn_img``, ``demo_knn_img.yaml``), or None."""
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = Path(str(resources.files(__name__).joinpath(name)))
    return path if path.is_file() else None


def names() -> list[str]:
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
