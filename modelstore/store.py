"""The model store: names (tags) -> manifests -> blobs, under ``$MLXSERVE_HOME``.

Layout (``docs/STORE.md``)::

    blobs/sha256/<hex>                          every blob, manifests and configs included
    manifests/<host>/<namespace>/<name>/<tag>   the manifest bytes a tag points at
    runtime/<manifest-hex>/                     a model's files under their own names (links)
    tmp/                                        partial writes; never visible elsewhere
    gc.lock, manifests.lock                     cross-process locks (``locks.py``)

Writers hold ``gc.lock`` shared while they add blobs and ``manifests.lock`` exclusive while
they change a tag; ``gc`` holds ``gc.lock`` exclusive, so it never sees a half-imported model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modelstore.atomic import publish_folder, write_atomically
from modelstore.blobs import BlobStore, BlobWrite, ProgressCallback, StoredHow, sha256_digest
from modelstore.draft import ModelConfig, ModelDraft, draft_manifest
from modelstore.errors import CorruptStoreError, ModelNotFoundError, StoreHomeError
from modelstore.locks import locked, locked_async
from modelstore.manifest import Manifest
from modelstore.reference import ModelReference, parse_reference

HOME_ENV = "MLXSERVE_HOME"
MIN_FREE_BYTES = 64 << 20
"""Below this much free space the store's disk counts as full: no write is started."""
_MOVE_IT = f"or set {HOME_ENV} to another folder"
GC_LOCK = "gc.lock"


def default_root() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".mlxserve")


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


@dataclass(frozen=True)
class StoredModel:
    """One tag in the store and the manifest it points at."""

    reference: ModelReference
    manifest_digest: str
    manifest: Manifest
    modified: float

    @property
    def name(self) -> str:
        return str(self.reference)

    @property
    def size(self) -> int:
        return self.manifest.total_size()


Check = Callable[[StoredModel], None]
"""What ``commit`` runs on a model before its name points at it (a trial load): it raises to
refuse the model, and the name is then left as it was."""


@dataclass(frozen=True)
class CommitResult:
    model: StoredModel
    blobs: dict[str, StoredHow]
    """How each layer blob got in (``hardlink``, ``copy``, ``existing``...): ``import`` says."""


@dataclass(frozen=True)
class VerifyProblem:
    digest: str
    problem: str
    models: list[str]


@dataclass(frozen=True)
class GcResult:
    removed_blobs: list[str]
    freed_bytes: int


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).expanduser()
        self.blobs = BlobStore(self.root)
        self.manifests_dir = self.root / "manifests"
        self.runtime_dir = self.root / "runtime"
        self.prompt_cache_dir = self.root / "cache" / "prompts"
        """The runners' prompt caches, one folder per weights blob (docs/STORE.md)."""

    def check(self, *, write: bool) -> None:
        """Raise ``StoreHomeError`` (one line: the path, what is wrong, what to do) unless the
        store can be read, and with ``write`` also written, so a bad home is never a traceback
        halfway through a command nor a store that quietly looks empty."""
        root = self.root
        try:
            is_folder = root.is_dir()
            exists = is_folder or root.exists()
        except PermissionError:
            raise StoreHomeError(
                f"the store {root} cannot be reached (permission denied on a parent folder): "
                f"give this user access {_MOVE_IT}"
            ) from None
        except OSError as exc:
            raise StoreHomeError(
                f"the store {root} is unusable ({exc.strerror}): {_MOVE_IT}"
            ) from None
        if exists and not is_folder:
            raise StoreHomeError(
                f"the store {root} is a file, not a folder: move it away {_MOVE_IT}"
            )
        if not exists:
            if not write:
                return  # nothing stored yet: truly empty
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreHomeError(
                    f"the store {root} cannot be created ({exc.strerror}): create it {_MOVE_IT}"
                ) from None
        if not os.access(root, os.R_OK | os.X_OK):
            raise StoreHomeError(
                f"the store {root} cannot be read (permission denied): give this user access "
                f"(chown/chmod) {_MOVE_IT}"
            )
        if not write:
            return
        if not os.access(root, os.W_OK):
            why = "read-only file system" if _read_only(root) else "permission denied"
            raise StoreHomeError(
                f"the store {root} cannot be written ({why}): make it writable {_MOVE_IT}"
            )
        free = shutil.disk_usage(root).free
        if free < MIN_FREE_BYTES:
            raise StoreHomeError(
                f"the store {root} is on a full disk ({free >> 20} MiB free): free some space "
                f"(mlxctl rm, then mlxctl gc) {_MOVE_IT}"
            )

    # -- locks -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held while adding blobs that no manifest references yet (blocks ``gc`` only)."""
        with locked(self.root / GC_LOCK, exclusive=False):
            yield

    def writing_async(self) -> contextlib.AbstractAsyncContextManager[None]:
        """``writing`` for coroutines (a pull in the daemon)."""
        return locked_async(self.root / GC_LOCK, exclusive=False)

    def _manifests_locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.root / "manifests.lock", exclusive=True)

    # -- names -------------------------------------------------------------------------------

    def _tag_path(self, ref: ModelReference) -> Path:
        return self.manifests_dir / ref.host_dir / ref.namespace_dir / ref.name / ref.tag

    def resolve(self, name: str | ModelReference) -> StoredModel:
        ref = parse_reference(name) if isinstance(name, str) else name
        path = self._tag_path(ref)
        try:
            data = path.read_bytes()
            modified = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFoundError(f"model '{ref}' not found", model=str(ref)) from None
        digest = sha256_digest(data)
        if ref.digest and ref.digest != digest:
            raise ModelNotFoundError(
                f"model '{ref}' not found: the tag points at {digest}", model=str(ref)
            )
        return StoredModel(ref.with_tag(ref.tag), digest, Manifest.from_bytes(data), modified)

    def exists(self, name: str | ModelReference) -> bool:
        try:
            self.resolve(name)
        except ModelNotFoundError:
            return False
        return True

    def list(self) -> list[StoredModel]:
        models = []
        if not self.manifests_dir.is_dir():
            return models
        for tag_path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not tag_path.is_file():
                continue
            host_dir, namespace, name, tag = tag_path.relative_to(self.manifests_dir).parts
            host = None if host_dir == "local" else host_dir.replace("_", ":")
            text = "/".join(p for p in (host, namespace, name) if p) + f":{tag}"
            try:
                models.append(self.resolve(text))
            except Exception:  # a tag file we cannot read is reported by verify, not list
                continue
        return models

    # -- writing -----------------------------------------------------------------------------

    def put_manifest(
        self, ref: ModelReference, manifest: Manifest, *, raw: bytes | None = None
    ) -> StoredModel:
        """Point ``ref`` at ``manifest``; every blob it names must already be stored.

        ``raw`` keeps a pulled manifest's exact bytes, so its digest stays the registry's.
        """
        if raw is not None and Manifest.from_bytes(raw) != manifest:
            raise CorruptStoreError(f"cannot tag {ref}: raw manifest bytes differ from it")
        for digest in manifest.blob_digests():
            if not self.blobs.exists(digest):
                raise CorruptStoreError(
                    f"cannot tag {ref}: blob {digest} is missing", digest=digest
                )
        data = manifest.to_bytes() if raw is None else raw
        digest = self.blobs.write_bytes(data).digest
        with self._manifests_locked(), write_atomically(self._tag_path(ref)) as handle:
            handle.write(data)
        stored = self.resolve(ref.with_tag(ref.tag))
        if stored.manifest_digest != digest:
            raise CorruptStoreError(f"tag {ref} changed while it was written", model=str(ref))
        return stored

    def commit(
        self,
        draft: ModelDraft,
        name: str | ModelReference,
        *,
        allow_link: bool = True,
        allow_clone: bool = True,
        progress: ProgressCallback | None = None,
        check: Check | None = None,
    ) -> CommitResult:
        """Store every layer of ``draft``, then its config, then the manifest (last).

        ``check`` sees the model once its blobs are in and before ``name`` points at it (the
        daemon's and the CLI's trial load, ``mlxserve/runners/trial.py``): what it raises
        leaves the name as it was, and the blobs for ``gc``."""
        ref = parse_reference(name) if isinstance(name, str) else name
        hows: dict[str, StoredHow] = {}
        with self.writing():
            written_layers = []
            for layer in draft.layers:
                if layer.path is not None:
                    written = self.blobs.import_file(
                        layer.path,
                        allow_link=allow_link,
                        allow_clone=allow_clone,
                        progress=progress,
                        expected_digest=layer.digest,
                    )
                else:
                    written = self.blobs.write_bytes(layer.data or b"")
                hows[layer.title] = written.how
                written_layers.append((written.digest, written.size))
            self.blobs.write_bytes(draft.config.to_bytes())
            manifest = draft_manifest(draft, written_layers)
            if check is not None:
                data = manifest.to_bytes()
                self.blobs.write_bytes(data)
                check(StoredModel(ref, sha256_digest(data), manifest, time.time()))
            stored = self.put_manifest(ref, manifest)
        return CommitResult(stored, hows)

    def add_blob_stream(
        self, chunks: Iterator[bytes], expected_digest: str, progress: ProgressCallback | None
    ) -> BlobWrite:
        """For archives; call inside ``writing()``."""
        return self.blobs.write_chunks(chunks, expected_digest, progress)

    def copy(self, source: str, target: str) -> StoredModel:
        """A new name for the same manifest: no blob is copied."""
        model = self.resolve(source)
        return self.put_manifest(parse_reference(target), model.manifest)

    def remove(self, name: str) -> StoredModel:
        """Remove a tag; blobs stay until ``gc`` (another tag may share them)."""
        model = self.resolve(name)
        with self._manifests_locked():
            path = self._tag_path(model.reference)
            path.unlink(missing_ok=True)
            for parent in list(path.parents)[:3]:
                with contextlib.suppress(OSError):
                    parent.rmdir()
            self.prune_prompt_cache(self.referenced_blobs())
        return model

    def prune_prompt_cache(self, referenced: Iterable[str]) -> None:
        """Remove the cached prompts of weights no tag references any more: they hold a
        representation of users' prompts, and nothing could use them."""
        if not self.prompt_cache_dir.is_dir():
            return
        live = {d.removeprefix("sha256:") for d in referenced}
        for folder in self.prompt_cache_dir.iterdir():
            if folder.name != "tmp" and folder.name not in live:
                shutil.rmtree(folder, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------

    def config(self, model: StoredModel) -> ModelConfig:
        return ModelConfig.from_bytes(self.blobs.read_bytes(model.manifest.config.digest))

    def text_layer(self, model: StoredModel, media_type: str) -> str | None:
        layers = model.manifest.layers_of(media_type)
        return self.blobs.read_bytes(layers[0].digest).decode() if layers else None

    def materialize(self, model: StoredModel) -> Path:
        """A folder holding the model's files under their titles, linked to the blobs.

        Runners open this folder as any local model. Built in a temporary folder and renamed,
        so a half-built folder is never used. Symbolic links (not hard links) so that a blob's
        link count keeps meaning "shared with a file outside the store" for ``show``.
        """
        target = self.runtime_dir / model.manifest_digest.removeprefix("sha256:")
        if target.is_dir():
            return target
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        building = self.runtime_dir / f".{target.name}.{os.getpid()}.partial"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        for layer in model.manifest.layers:
            if not layer.title:
                continue
            blob = self.blobs.path(layer.digest)
            if not blob.is_file():
                raise CorruptStoreError(
                    f"model {model.name}: blob {layer.digest} is missing; run `mlxctl verify`",
                    digest=layer.digest,
                )
            os.symlink(os.path.relpath(blob, target), building / layer.title)
        publish_folder(building, target)
        return target

    # -- maintenance -------------------------------------------------------------------------

    def referenced_blobs(self) -> dict[str, list[str]]:
        """digest -> the names of the models that need it (manifest blobs included)."""
        users: dict[str, list[str]] = {}
        for model in self.list():
            for digest in [model.manifest_digest, *model.manifest.blob_digests()]:
                users.setdefault(digest, []).append(model.name)
        return users

    def verify(self, progress: Callable[[str, int], None] | None = None) -> list[VerifyProblem]:
        """Re-hash every blob a model references; report each bad or missing one."""
        problems = []
        for digest, models in sorted(self.referenced_blobs().items()):
            path = self.blobs.path(digest)
            if not path.is_file():
                problems.append(VerifyProblem(digest, "missing", sorted(set(models))))
                continue
            ok = self.blobs.verify(
                digest, (lambda n, d=digest: progress(d, n)) if progress else None
            )
            if not ok:
                problems.append(VerifyProblem(digest, "digest mismatch", sorted(set(models))))
        return problems

    def gc(self) -> GcResult:
        """Remove blobs no tag references, stale runtime folders and temporary files."""
        with locked(self.root / GC_LOCK, exclusive=True), self._manifests_locked():
            referenced = self.referenced_blobs()
            removed, freed = [], 0
            for digest in self.blobs.digests():
                if digest not in referenced:
                    freed += self.blobs.remove(digest)
                    removed.append(digest)
            live = {d.removeprefix("sha256:") for d in referenced}
            if self.runtime_dir.is_dir():
                for folder in self.runtime_dir.iterdir():
                    if folder.name not in live:
                        shutil.rmtree(folder, ignore_errors=True)
            self.prune_prompt_cache(referenced)
            self.blobs.clean_temp()
        return GcResult(removed, freed)
