"""Models from the Hugging Face hub and its local cache, through ``huggingface_hub``.

``huggingface_hub`` already knows the cache layout, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and tokens, so we only choose *what* to fetch and how to name it. A snapshot
in the cache is a folder of symlinks into the cache's ``blobs/``; importing it hard-links those
blobs into the store (same file system) instead of keeping a second copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from modelstore.errors import ImportSourceError, InvalidReferenceError, ModelNotFoundError

HF_SCHEME = "hf://"
HF_HOST = "hf.co"
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.gguf",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "LICENSE*",
    "README.md",
]
"""What a model needs; skips PyTorch ``.bin``/``.pth`` twins of the safetensors weights."""
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubModel:
        """``hf://ORG/REPO[@REVISION]`` (the scheme may be left out)."""
        repo_id, _, revision = text.removeprefix(HF_SCHEME).partition("@")
        if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
            raise InvalidReferenceError(
                f"invalid Hugging Face repository {text!r}: expected hf://ORG/REPO[@REVISION]",
                reference=text,
            )
        return cls(repo_id, revision or None)

    def store_name(self) -> str:
        """``hf.co/org/repo:revision``, folded into the store's reference grammar."""
        org, repo = (_component(part) for part in self.repo_id.split("/"))
        tag = re.sub(r"[^A-Za-z0-9_.-]", "-", self.revision or "latest")[:128]
        return f"{HF_HOST}/{org}/{repo}:{tag.lstrip('.-') or 'latest'}"


def _component(text: str) -> str:
    folded = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return folded[:64] or "model"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(model: HubModel) -> Path:
    """The model's snapshot folder in the local cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(model.repo_id, revision=model.revision, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{model.repo_id} is not in the Hugging Face cache", model=model.repo_id
        ) from None


GGUF_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q5_0", "Q6_K", "Q8_0", "BF16", "F16")
"""Which GGUF of a repo holding several quantizations to take, best first (Ollama's default
quantization first); a file matching none is taken only when nothing matches."""


def choose_gguf(names: list[str]) -> str | None:
    """The one GGUF file of a repo to fetch (projector files are not models)."""
    ggufs = sorted(n for n in names if n.endswith(".gguf") and "mmproj" not in n.lower())
    for quant in GGUF_PREFERENCE:
        for name in ggufs:
            if quant.lower() in name.lower():
                return name
    return ggufs[0] if ggufs else None


def choose_weights(names: list[str], prefer_gguf: bool) -> str | None:
    """For a repo's file list: the GGUF file to take, or ``None`` to take the MLX/safetensors
    model. MLX weights are preferred where MLX runs fast (Apple Silicon: ``prefer_gguf``
    false), GGUF elsewhere; a repo with only one kind gives that kind."""
    gguf = choose_gguf(names)
    has_folder_model = "config.json" in names and any(n.endswith(".safetensors") for n in names)
    if gguf is None or (has_folder_model and not prefer_gguf):
        return None
    return gguf


def snapshot_source(model: HubModel, *, prefer_gguf: bool) -> Path:
    """What to import for ``model``: its snapshot folder, or the one GGUF file in it that
    ``choose_weights`` picks (only that file is downloaded, not every quantization)."""
    try:
        folder = cached_snapshot(model)
    except ModelNotFoundError:
        folder = None
    if folder is None:
        folder = snapshot_folder(model, prefer_gguf=prefer_gguf)
    names = [p.name for p in folder.iterdir()]
    chosen = choose_weights(names, prefer_gguf)
    return folder / chosen if chosen else folder


def _remote_patterns(model: HubModel, prefer_gguf: bool) -> list[str]:
    """The download patterns for ``model``: one GGUF, or the folder model without GGUFs."""
    from huggingface_hub import list_repo_files

    names = list_repo_files(model.repo_id, revision=model.revision)
    chosen = choose_weights([Path(n).name for n in names if "/" not in n], prefer_gguf)
    if chosen:
        return [chosen, "LICENSE*", "README.md"]
    return [pattern for pattern in MODEL_FILE_PATTERNS if pattern != "*.gguf"]


def snapshot_folder(model: HubModel, *, prefer_gguf: bool = False) -> Path:
    """The model's snapshot folder: from the cache when it is there, else downloaded."""
    try:
        return cached_snapshot(model)
    except ModelNotFoundError as missing:
        if _offline():
            raise ModelNotFoundError(
                f"{missing.message} and HF_HUB_OFFLINE is set", model=model.repo_id
            ) from None
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model.repo_id,
                revision=model.revision,
                allow_patterns=_remote_patterns(model, prefer_gguf),
            )
        )
    except Exception as exc:  # network, auth, missing repo: huggingface_hub has many types
        raise ImportSourceError(f"cannot fetch {model.repo_id} from the hub: {exc}") from None


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    revision: str
    """The commit hash of the snapshot."""
    refs: tuple[str, ...]
    size: int
    folder: Path

    def hub_model(self) -> HubModel:
        """Named by its first ref (``main``) when it has one, else by its commit."""
        return HubModel(self.repo_id, self.refs[0] if self.refs else self.revision)


def cached_models() -> list[CachedModel]:
    """Every model snapshot in the local cache, newest commit per repo first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            found.append(
                CachedModel(
                    repo.repo_id,
                    revision.commit_hash,
                    tuple(sorted(revision.refs)),
                    revision.size_on_disk,
                    Path(revision.snapshot_path),
                )
            )
    return sorted(found, key=lambda m: m.repo_id)
