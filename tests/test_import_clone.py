"""``import`` never hard-links a user's folder by default: an edit to the source must not
change a stored model. Files are cloned copy-on-write where the file system can (APFS, btrfs,
XFS), else copied; ``--link`` hard-links when asked; the output says which each file got, and
the progress bar's total is the bytes actually imported."""

from __future__ import annotations

import json
import os
import shutil

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
