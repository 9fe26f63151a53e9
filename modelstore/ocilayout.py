"""Packed models: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) in a tar.

``pack`` is deterministic: entries in a fixed order, mtime 0, owner 0/0, fixed modes, so the
same inputs give the same bytes (and the same archive digest in CI). ``import_archive`` never
extracts paths from the archive onto disk: it looks blobs up by digest and streams each into
the store, verified, so a hostile archive cannot write outside the store.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelstore import mediatypes
from modelstore.atomic import publish_file
from modelstore.blobs import CHUNK_SIZE, ProgressCallback, hash_file, sha256_digest
from modelstore.draft import ModelDraft, draft_manifest
from modelstore.errors import ImportSourceError, InvalidManifestError
from modelstore.manifest import Descriptor, Manifest
from modelstore.reference import ModelReference, parse_reference
from modelstore.store import ModelStore, StoredModel

OCI_LAYOUT_BODY = b'{"imageLayoutVersion":"1.0.0"}'
FILE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class PackResult:
    path: Path
    digest: str
    manifest_digest: str
    size: int


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = DIR_MODE if directory else FILE_MODE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def index_bytes(manifest_digest: str, manifest_size: int, ref: ModelReference) -> bytes:
    body = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mediatypes.OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {mediatypes.ANNOTATION_REF_NAME: str(ref)},
            }
        ],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def pack(
    draft: ModelDraft, name: str, out: Path, progress: ProgressCallback | None = None
) -> PackResult:
    """Write ``draft`` as an OCI layout archive at ``out`` (atomically: temp file + rename)."""
    ref = parse_reference(name)
    blobs: dict[str, tuple[int, Path | bytes]] = {}
    stored = []
    for layer in draft.layers:
        if layer.path is not None:
            digest, size = hash_file(layer.path)
            blobs[digest] = (size, layer.path)
        else:
            data = layer.data or b""
            digest, size = sha256_digest(data), len(data)
            blobs[digest] = (size, data)
        stored.append((digest, size))
    config = draft.config.to_bytes()
    blobs[sha256_digest(config)] = (len(config), config)
    manifest = draft_manifest(draft, stored).to_bytes()
    manifest_digest = sha256_digest(manifest)
    blobs[manifest_digest] = (len(manifest), manifest)

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with (
            open(temp, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            tar.addfile(_tar_info("oci-layout", len(OCI_LAYOUT_BODY)), io.BytesIO(OCI_LAYOUT_BODY))
            index = index_bytes(manifest_digest, len(manifest), ref)
            tar.addfile(_tar_info("index.json", len(index)), io.BytesIO(index))
            tar.addfile(_tar_info("blobs", 0, directory=True))
            tar.addfile(_tar_info("blobs/sha256", 0, directory=True))
            for digest in sorted(blobs):
                size, content = blobs[digest]
                info = _tar_info(f"blobs/sha256/{digest.removeprefix('sha256:')}", size)
                if isinstance(content, bytes):
                    tar.addfile(info, io.BytesIO(content))
                else:
                    with open(content, "rb") as handle:
                        tar.addfile(info, handle)
                if progress:
                    progress(size)
            raw.flush()
        publish_file(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    digest, size = hash_file(out)
    return PackResult(out, digest, manifest_digest, size)


def is_archive(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def _member_chunks(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    handle = tar.extractfile(member)
    if handle is None:
        raise ImportSourceError(f"archive entry {member.name} is not a file")
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk


def import_archive(
    store: ModelStore,
    path: Path,
    name: str | None = None,
    progress: ProgressCallback | None = None,
) -> list[StoredModel]:
    """Import every model an archive's index names; ``name`` renames a single-model archive."""
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ImportSourceError(f"{path} is not a readable archive: {exc}") from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

        def read_small(entry: str) -> bytes:
            member = members.get(entry)
            if member is None:
                raise ImportSourceError(f"{path.name} is not an OCI layout: no {entry}")
            return b"".join(_member_chunks(tar, member))

        def blob_member(digest: str) -> tarfile.TarInfo:
            member = members.get(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            if member is None:
                raise ImportSourceError(f"{path.name} lacks blob {digest}", digest=digest)
            return member

        read_small("oci-layout")
        try:
            index = json.loads(read_small("index.json"))
            entries = index["manifests"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidManifestError(f"{path.name}: bad index.json ({exc})") from None
        if not isinstance(entries, list) or not entries:
            raise InvalidManifestError(f"{path.name}: index.json lists no manifests")
        if name is not None and len(entries) != 1:
            raise ImportSourceError("--name needs an archive holding exactly one model")
        imported = []
        with store.writing():
            for entry in entries:
                descriptor = Descriptor.from_json(entry)
                ref_name = name or descriptor.annotations.get(mediatypes.ANNOTATION_REF_NAME)
                if not ref_name:
                    raise ImportSourceError(
                        f"{path.name}: a manifest has no name; give one with --name"
                    )
                ref = parse_reference(ref_name)
                manifest_bytes = b"".join(_member_chunks(tar, blob_member(descriptor.digest)))
                if sha256_digest(manifest_bytes) != descriptor.digest:
                    raise InvalidManifestError(f"{path.name}: manifest digest mismatch")
                manifest = Manifest.from_bytes(manifest_bytes)
                for digest in manifest.blob_digests():
                    store.add_blob_stream(
                        _member_chunks(tar, blob_member(digest)), digest, progress
                    )
                imported.append(store.put_manifest(ref, manifest, raw=manifest_bytes))
        return imported
