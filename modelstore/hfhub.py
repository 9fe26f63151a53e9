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


def snapshot_folder(model: HubModel) -> Path:
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
                model.repo_id, revision=model.revision, allow_patterns=MODEL_FILE_PATTERNS
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
