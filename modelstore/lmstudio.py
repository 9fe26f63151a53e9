"""LM Studio's models folder: ``<root>/<publisher>/<repo>/`` holding GGUF files or MLX folders.

The root is ``$LMSTUDIO_MODELS`` if set, else ``~/.lmstudio/models`` (or the older
``~/.cache/lm-studio/models``). Each GGUF file (but a vision projector, ``mmproj-*.gguf``) is
one model, which takes the folder's projector if it has one (LM Studio pairs them the same way;
the model becomes a vision model); a repo folder with ``config.json`` and ``*.safetensors`` is
one MLX model. LM Studio keeps no digests, so what is imported is hashed as it is linked; the
files are hard-linked into the store, so nothing is copied.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelstore.draft import ModelDraft
from modelstore.errors import ImportSourceError
from modelstore.sources import draft_from_gguf, draft_from_hf_folder, projector_layer

LMSTUDIO_MODELS_ENV = "LMSTUDIO_MODELS"
DEFAULT_ROOTS = (Path(".lmstudio") / "models", Path(".cache") / "lm-studio" / "models")
PROJECTOR_PREFIX = "mmproj"
_NOT_IN_NAMES = re.compile(r"[^a-z0-9._-]+")


def lmstudio_root() -> Path:
    if os.environ.get(LMSTUDIO_MODELS_ENV):
        return Path(os.environ[LMSTUDIO_MODELS_ENV])
    for relative in DEFAULT_ROOTS:
        if (Path.home() / relative).is_dir():
            return Path.home() / relative
    return Path.home() / DEFAULT_ROOTS[0]


def _component(text: str) -> str:
    """A reference component from a folder or file name (``Qwen3-4B-GGUF`` -> ``qwen3-4b-gguf``)."""
    cleaned = _NOT_IN_NAMES.sub("-", text.lower()).strip("._-")
    return re.sub(r"[._-]{2,}", "-", cleaned)[:64] or "model"


@dataclass(frozen=True)
class LmStudioModel:
    publisher: str
    repo: str
    kind: Literal["gguf", "mlx"]
    path: Path
    """The GGUF file, or the MLX folder."""

    @property
    def display_name(self) -> str:
        suffix = f"/{self.path.name}" if self.kind == "gguf" else ""
        return f"{self.publisher}/{self.repo}{suffix}"

    @property
    def store_name(self) -> str:
        """``publisher/repo:tag``: the tag is the GGUF's file name, or ``mlx``."""
        tag = _component(self.path.stem) if self.kind == "gguf" else "mlx"
        return f"{_component(self.publisher)}/{_component(self.repo)}:{tag}"

    @property
    def size(self) -> int:
        if self.kind == "gguf":
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def draft(self) -> ModelDraft:
        draft = (
            draft_from_gguf(self.path) if self.kind == "gguf" else draft_from_hf_folder(self.path)
        )
        draft.config.source = {"kind": "lmstudio", "name": self.display_name}
        if self.kind == "gguf":
            projectors = _projectors(self.path.parent)
            if projectors:
                # Several (F16, Q8_0, ...) are the same projector at other precisions: the
                # first by name, so the choice is the same on every import.
                draft.layers.append(projector_layer(projectors[0], draft))
        return draft


def _is_projector(path: Path) -> bool:
    return path.name.lower().startswith(PROJECTOR_PREFIX)


def _projectors(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.gguf")) if p.is_file() and _is_projector(p)]


def _is_mlx_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def list_models(root: Path | None = None) -> list[LmStudioModel]:
    root = root or lmstudio_root()
    found: list[LmStudioModel] = []
    for repo in sorted(root.glob("*/*")):
        if not repo.is_dir():
            continue
        publisher = repo.parent.name
        if _is_mlx_folder(repo):
            found.append(LmStudioModel(publisher, repo.name, "mlx", repo))
        for gguf in sorted(repo.glob("*.gguf")):
            if gguf.is_file() and not _is_projector(gguf):
                found.append(LmStudioModel(publisher, repo.name, "gguf", gguf))
    return found


def find_models(wanted: str, root: Path | None = None) -> list[LmStudioModel]:
    """``publisher/repo`` (every model in it) or ``publisher/repo/file.gguf``."""
    root = root or lmstudio_root()
    models = [
        m
        for m in list_models(root)
        if wanted in (m.display_name, f"{m.publisher}/{m.repo}", m.store_name)
    ]
    if not models:
        raise ImportSourceError(
            f"{wanted} is not in LM Studio's models folder {root} ('mlxctl import "
            "--from-lmstudio' lists what is)",
            path=str(root / wanted),
        )
    return models
