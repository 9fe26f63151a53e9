"""``mlxctl import``: one entry point for every kind of source a user can point at."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from modelstore.blobs import ProgressCallback, StoredHow
from modelstore.errors import ImportSourceError, MlxserveError
from modelstore.manifest import is_safe_file_name
from modelstore.ocilayout import import_archive, is_archive
from modelstore.sources import draft_from_path
from modelstore.store import Check, ModelStore, StoredModel
from modelstore.templates import template_warning


@dataclass(frozen=True)
class ImportResult:
    models: list[StoredModel]
    files: dict[str, StoredHow] = field(default_factory=dict)
    """File name -> how it got in (hard link, copy, already stored); empty for archives."""
    warnings: list[str] = field(default_factory=list)
    """What the user should know about the model (an inferred chat template, or none)."""


def source_size(path: Path) -> int:
    """The bytes an import of ``path`` reads: the files its model is made of (a folder's other
    files are not imported, so a progress bar counting them would never fill)."""
    if not path.exists():
        return 0
    if path.is_dir() or path.suffix == ".gguf":
        try:
            return draft_from_path(path).total_source_bytes()
        except MlxserveError:
            pass  # import_path reports what is wrong with it
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


_NOT_IN_NAMES = re.compile(r"[^a-z0-9._-]+")
_SEPARATOR_RUNS = re.compile(r"[._-]{2,}")
NAME_LENGTH = 64


def derived_name(path: Path) -> str:
    """The name ``import`` (and ``run ./path``) stores a folder or file under when none is
    given: ``./Qwen2.5-0.5B-Instruct`` -> ``qwen2.5-0.5b-instruct``, ``Tiny-Q8_0.gguf`` ->
    ``tiny-q8_0``; folded into the reference grammar, tag ``latest``."""
    resolved = path.expanduser().resolve()
    stem = resolved.name if resolved.is_dir() else resolved.stem
    folded = _NOT_IN_NAMES.sub("-", stem.lower())
    folded = _SEPARATOR_RUNS.sub("-", folded).strip("._-")[:NAME_LENGTH].strip("._-")
    return folded or "model"


ZIP_MAX_BYTES = 256 << 30
"""A model zip claiming more than this unpacked is refused before anything is written."""
ZIP_MAX_RATIO = 50
"""Unpacked / packed bytes: weights barely compress (~1.1x), tokenizer and config text ~5x; a
zip bomb claims thousands. Refused before anything is written."""


@contextlib.contextmanager
def unpacked_zip(path: Path, scratch: Path) -> Iterator[Path]:
    """A zipped model folder (``all_minilm_l6_v2/model.zip``) unpacked under the store's
    scratch folder (the same file system as the blobs, so committing it hard-links instead of
    copying), removed when the ``with`` body leaves."""
    scratch.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="import-zip-", dir=scratch))
    try:
        yield extract_zip(path, target)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def extract_zip(path: Path, target: Path) -> Path:
    """Unpack the zipped model folder ``path`` into the empty folder ``target`` (the caller
    removes it) and return the model's folder: the zip's single top folder, else ``target``.
    Every member name is checked first (no absolute paths, no ``..``), and the sizes the zip
    declares are bounded; ``zipfile`` then refuses a member longer than declared."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImportSourceError(
            f"{path}: not a readable zip file ({exc})", path=str(path)
        ) from None
    with archive:
        members = archive.infolist()
        for member in members:
            parts = PurePosixPath(member.filename).parts
            if not parts or not all(is_safe_file_name(part) for part in parts):
                raise ImportSourceError(
                    f"{path}: unsafe member name {member.filename!r}", path=str(path)
                )
        unpacked = sum(member.file_size for member in members)
        if unpacked > ZIP_MAX_BYTES:
            raise ImportSourceError(f"{path}: unpacks to more than {ZIP_MAX_BYTES} bytes")
        packed = sum(member.compress_size for member in members)
        if unpacked > ZIP_MAX_RATIO * max(packed, 1):
            raise ImportSourceError(
                f"{path}: unpacks to {unpacked} bytes from {packed}, over the limit of "
                f"{ZIP_MAX_RATIO}x compression (a zip bomb?)"
            )
        try:
            archive.extractall(target)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ImportSourceError(f"{path}: cannot unpack ({exc})", path=str(path)) from None
    entries = list(target.iterdir())
    only_folder = len(entries) == 1 and entries[0].is_dir()
    return entries[0] if only_folder else target


def import_path(
    store: ModelStore,
    path: Path,
    name: str | None = None,
    *,
    allow_link: bool = False,
    allow_clone: bool = True,
    progress: ProgressCallback | None = None,
    check: Check | None = None,
) -> ImportResult:
    """Import an HF-style folder (or a ``.zip`` of one), a ``.gguf`` file or a packed archive
    (which names itself; anything else is named after itself, ``derived_name``).

    A user's folder can still change under the store, so its files are cloned (or copied),
    hard-linked only with ``allow_link`` (``import --link``; the HF cache, whose blobs never
    change). ``check`` is ``ModelStore.commit``'s (a packed archive is not checked: it is
    this project's own packing of a stored model)."""
    if not path.exists():
        raise ImportSourceError(f"{path}: no such file or folder", path=str(path))
    if path.is_file() and path.suffix != ".gguf" and is_archive(path):
        return ImportResult(import_archive(store, path, name, progress))
    name = name or derived_name(path)
    if path.is_file() and path.suffix == ".zip":
        with unpacked_zip(path, store.blobs.tmp_dir) as folder:
            draft = draft_from_path(folder)
            draft.config.source = {"kind": "zip", "name": path.name}
            result = store.commit(draft, name, progress=progress, check=check)
    else:
        draft = draft_from_path(path)
        result = store.commit(
            draft,
            name,
            allow_link=allow_link,
            allow_clone=allow_clone,
            progress=progress,
            check=check,
        )
    warning = template_warning(draft.config.template_source)
    return ImportResult([result.model], result.blobs, [warning] if warning else [])
