"""``import`` never hard-links a user's folder by default: an edit to the source must not
change a stored model. Files are cloned copy-on-write where the file system can (APFS, btrfs,
XFS), else copied; ``--link`` hard-links when asked; the output says which each file got, and
the progress bar's total is the bytes actually imported.

This machine's disk is ext4 (no reflink), so the clone itself is tested on an XFS file system
made for the test in a loop-mounted image file (``mkfs.xfs -m reflink=1``, from Debian's
``xfsprogs``; ``scripts/install-system-deps.sh``): the store and the source folder both live
there, and the kernel's FIEMAP says the stored blob shares the source's extents."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.blobs import StoredHow, clone_file, hash_file
from modelstore.importer import import_path, source_size
from modelstore.store import ModelStore
from tests.cli import mlxctl


def reflinks_here(folder) -> bool:
    """Whether this file system clones (ext4 and tmpfs do not; btrfs, XFS and APFS do)."""
    source, target = folder / "probe-source", folder / "probe-target"
    source.write_bytes(b"x" * 4096)
    try:
        return clone_file(source, target)
    finally:
        source.unlink()
        target.unlink(missing_ok=True)


def test_default_import_does_not_link_and_survives_an_edit_to_the_source(
    store_home, mini_hf_folder, tmp_path
):
    weights = mini_hf_folder / "model.safetensors"
    out = json.loads(
        mlxctl("import", str(mini_hf_folder), "--name", "mini:1", "--json", home=store_home).stdout
    )
    expected = "clone" if reflinks_here(tmp_path) else "copy"
    assert out[0]["files"]["model.safetensors"] == expected
    assert weights.stat().st_nlink == 1, "the source is hard-linked into the store"
    with open(weights, "r+b") as handle:  # edit in place, as a training script would
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\xff\xff\xff\xff")
    assert mlxctl("verify", home=store_home, check=False).returncode == 0
    text = mlxctl("import", str(mini_hf_folder), "--name", "mini:2", home=store_home).stdout
    assert f"file(s) {'cloned' if expected == 'clone' else 'copied'}" in text


def test_link_hard_links_when_asked_and_says_so(store_home, mini_hf_folder):
    out = mlxctl("import", str(mini_hf_folder), "--name", "mini:1", "--link", home=store_home)
    assert "hard-linked" in out.stdout
    assert (mini_hf_folder / "model.safetensors").stat().st_nlink == 2


def test_clone_file_says_no_and_leaves_nothing_where_the_file_system_cannot(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(os.urandom(1 << 16))
    if clone_file(source, target):
        assert hash_file(target) == hash_file(source)
    else:
        assert not target.exists()


def test_the_progress_total_is_what_import_reads(store, mini_hf_folder):
    shutil.copyfile(mini_hf_folder / "model.safetensors", mini_hf_folder / "pytorch_model.bin")
    (mini_hf_folder / "README.md").write_text("not part of the model " * 1000)
    total = source_size(mini_hf_folder)
    counted: list[int] = []
    result = import_path(store, mini_hf_folder, "mini:1", progress=counted.append)
    assert sum(counted) == total
    stored = {layer.title for layer in result.models[0].manifest.layers}
    assert "pytorch_model.bin" not in stored
    assert result.files["model.safetensors"] in {StoredHow.CLONE, StoredHow.COPY}
    (weights,) = result.models[0].manifest.layers_of(mediatypes.WEIGHTS_SAFETENSORS)
    assert ModelStore(store.root).blobs.verify(weights.digest)


XFS_IMAGE_BYTES = 320 << 20
"""A sparse image file (mkfs.xfs's smallest file system is 300 MiB); only what is written
takes disk space."""
FS_IOC_FIEMAP = 0xC020660B
"""``_IOWR('f', 11, struct fiemap)``: the extents of a file, as ``filefrag -v`` reads them."""
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
FIEMAP_HEADER = struct.Struct("=QQIIII")
"""``struct fiemap``: start, length, flags, mapped extents, extent count, reserved."""
FIEMAP_EXTENT = struct.Struct("=QQQQQI12x")
"""``struct fiemap_extent``: logical, physical, length, two reserved, flags, three reserved."""
MAX_EXTENTS = 32


def extents(path: Path) -> list[tuple[int, int]]:
    """``(physical offset, flags)`` of each extent of ``path`` (the kernel's FIEMAP)."""
    request = FIEMAP_HEADER.pack(0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, MAX_EXTENTS, 0)
    buffer = bytearray(request + bytes(FIEMAP_EXTENT.size * MAX_EXTENTS))
    with open(path, "rb") as handle:
        fcntl.ioctl(handle.fileno(), FS_IOC_FIEMAP, buffer)
    mapped = FIEMAP_HEADER.unpack_from(buffer)[3]
    found = []
    for index in range(mapped):
        offset = FIEMAP_HEADER.size + index * FIEMAP_EXTENT.size
        _, physical, _, _, _, flags = FIEMAP_EXTENT.unpack_from(buffer, offset)
        found.append((physical, flags))
    return found


@pytest.fixture
def reflink_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a fresh XFS with reflink, mounted from an image file for this test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop-device XFS needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("needs mkfs.xfs (Debian's xfsprogs: scripts/install-system-deps.sh)")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as handle:
        handle.truncate(XFS_IMAGE_BYTES)
    mount.mkdir()
    made = subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"this container cannot loop-mount a file system: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def test_import_on_a_reflink_file_system_clones_and_an_edit_leaves_the_blob(
    reflink_folder, mini_hf_folder
):
    source = Path(shutil.copytree(mini_hf_folder, reflink_folder / "mini-model"))
    home = reflink_folder / "home"
    weights = source / "model.safetensors"
    digest, _ = hash_file(weights)
    out = json.loads(mlxctl("import", str(source), "--name", "mini:1", "--json", home=home).stdout)
    assert out[0]["files"]["model.safetensors"] == "clone"
    blob = ModelStore(home).blobs.path(digest)
    assert weights.stat().st_nlink == 1 and blob.stat().st_ino != weights.stat().st_ino
    stored = extents(blob)
    assert stored and all(flags & FIEMAP_EXTENT_SHARED for _, flags in stored), stored
    assert {physical for physical, _ in stored} == {physical for physical, _ in extents(weights)}
    with open(weights, "r+b") as handle:  # edit in place, as a training script would
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\xff\xff\xff\xff")
    assert hash_file(weights)[0] != digest
    assert hash_file(blob)[0] == digest, "the edit reached the stored blob"
    assert mlxctl("verify", home=home, check=False).returncode == 0
