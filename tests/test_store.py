"""The store: import of each source kind, dedup, cp, rm + gc, verify, atomicity, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.blobs import StoredHow, hash_file
from modelstore.errors import (
    DigestMismatchError,
    ImportSourceError,
    InvalidReferenceError,
    ModelNotFoundError,
)
from modelstore.importer import import_path
from modelstore.ocilayout import pack
from modelstore.runtime import open_model
from modelstore.sources import draft_from_path
from modelstore.store import ModelStore


def blob_files(store: ModelStore) -> list[Path]:
    return sorted(store.blobs.dir.iterdir()) if store.blobs.dir.is_dir() else []


def assert_every_blob_matches_its_name(store: ModelStore) -> None:
    for path in blob_files(store):
        assert hash_file(path)[0] == "sha256:" + path.name


def test_import_hf_folder(store, mini_hf_folder):
    model = import_path(store, mini_hf_folder, "mini:1").models[0]
    config = store.config(model)
    assert (config.format, config.architecture, config.context_length) == ("mlx", "llama", 128)
    titles = {layer.title for layer in model.manifest.layers}
    assert titles == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert store.list()[0].name == "mini:1"


def test_import_gguf_file_reads_its_metadata(store, default_gguf):
    result = import_path(store, default_gguf, "smol:q4")
    config = store.config(result.models[0])
    assert (config.format, config.architecture, config.quantization) == ("gguf", "llama", "Q4_1")
    assert result.files[default_gguf.name] in {StoredHow.HARDLINK, StoredHow.COPY}


def test_import_refuses_what_is_not_a_model(store, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImportSourceError):
        import_path(store, tmp_path / "notes.txt", "x")
    with pytest.raises(ImportSourceError):
        import_path(store, tmp_path, "x")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ImportSourceError):
        import_path(store, fake, "x")
    assert store.list() == []


def test_bad_name_is_refused_before_anything_is_written(store, mini_hf_folder):
    with pytest.raises(InvalidReferenceError):
        import_path(store, mini_hf_folder, "../escape")
    assert not (store.root / "manifests").exists()


def test_hard_link_is_used_on_the_same_file_system(store, mini_hf_folder):
    result = import_path(store, mini_hf_folder, "mini:1", allow_link=True)
    assert result.files["model.safetensors"] is StoredHow.HARDLINK
    weights = result.models[0].manifest.layers_of(mediatypes.WEIGHTS_SAFETENSORS)[0]
    assert store.blobs.path(weights.digest).stat().st_ino == (
        (mini_hf_folder / "model.safetensors").stat().st_ino
    )


def test_copy_mode_copies(store, mini_hf_folder):
    result = import_path(store, mini_hf_folder, "mini:1", allow_link=False, allow_clone=False)
    assert result.files["model.safetensors"] is StoredHow.COPY


def test_importing_twice_stores_blobs_once(store, mini_hf_folder):
    first = import_path(store, mini_hf_folder, "a:1", allow_link=False).models[0]
    count = len(blob_files(store))
    second = import_path(store, mini_hf_folder, "b:1", allow_link=False)
    assert second.models[0].manifest_digest == first.manifest_digest
    assert set(second.files.values()) == {StoredHow.EXISTING}
    assert len(blob_files(store)) == count


def test_cp_adds_a_name_without_copying_blobs(store, mini_hf_folder):
    import_path(store, mini_hf_folder, "mini:1")
    count = len(blob_files(store))
    copied = store.copy("mini:1", "me/other:2")
    assert copied.manifest_digest == store.resolve("mini:1").manifest_digest
    assert len(blob_files(store)) == count
    assert {m.name for m in store.list()} == {"mini:1", "me/other:2"}


def test_rm_then_gc_frees_only_unshared_blobs(store, mini_hf_folder, default_gguf):
    import_path(store, mini_hf_folder, "mini:1")
    store.copy("mini:1", "mini:2")
    import_path(store, default_gguf, "smol:1")
    store.remove("mini:1")
    assert store.gc().removed_blobs == []
    store.remove("smol:1")
    result = store.gc()
    assert result.freed_bytes >= default_gguf.stat().st_size
    assert store.verify() == []
    with pytest.raises(ModelNotFoundError):
        store.resolve("smol:1")


def test_verify_names_a_flipped_byte_and_the_models_it_breaks(store, mini_hf_folder):
    model = import_path(store, mini_hf_folder, "mini:1", allow_link=False).models[0]
    store.copy("mini:1", "mini:2")
    weights = model.manifest.layers_of(mediatypes.WEIGHTS_SAFETENSORS)[0]
    path = store.blobs.path(weights.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    problems = store.verify()
    assert [(p.digest, p.problem, p.models) for p in problems] == [
        (weights.digest, "digest mismatch", ["mini:1", "mini:2"])
    ]


def test_blob_with_the_wrong_digest_is_never_published(store):
    with pytest.raises(DigestMismatchError):
        store.blobs.write_chunks([b"hello"], expected_digest="sha256:" + "0" * 64)
    assert blob_files(store) == []
    assert list(store.blobs.tmp_dir.iterdir()) == []


def test_open_model_materialises_files_under_their_names(store, mini_hf_folder):
    import_path(store, mini_hf_folder, "mini:1")
    local = open_model(store, "mini:1")
    assert local.format == "mlx"
    assert (local.path / "config.json").read_text() == (mini_hf_folder / "config.json").read_text()
    assert local.weights == [local.path / "model.safetensors"]


CRASHING_IMPORT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from modelstore.sources import draft_from_path
    from modelstore.store import ModelStore

    store = ModelStore(Path(sys.argv[1]))
    crash_after = int(sys.argv[3])
    seen = [0]

    def progress(n):
        seen[0] += n
        if seen[0] >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    store.commit(draft_from_path(Path(sys.argv[2])), "crash:1", allow_link=False,
                 progress=progress)
    """
)


@pytest.mark.parametrize("crash_after", [1, 10 << 20, 60 << 20], ids=["first-chunk", "mid", "late"])
def test_a_crash_mid_import_leaves_nothing_partial(store, default_gguf, crash_after):
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASHING_IMPORT,
            str(store.root),
            str(default_gguf),
            str(crash_after),
        ],
        check=False,
    )
    assert process.returncode == -9
    assert store.list() == []
    assert_every_blob_matches_its_name(store)
    store.gc()
    assert blob_files(store) == []
    assert list(store.blobs.tmp_dir.iterdir()) == []


CONCURRENT_IMPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    store = ModelStore(Path(sys.argv[1]))
    for round in range(3):
        import_path(store, Path(sys.argv[2]), f"{sys.argv[3]}:{round}", allow_link=False)
    """
)


def test_two_processes_importing_at_once_do_not_corrupt_the_store(store, default_gguf):
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_IMPORT, str(store.root), str(default_gguf), name]
        )
        for name in ("left", "right")
    ]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    assert len(store.list()) == 6
    assert store.verify() == []
    assert len({m.manifest_digest for m in store.list()}) == 1
    weights = [p for p in blob_files(store) if p.stat().st_size > 1 << 20]
    assert len(weights) == 1


def test_archive_round_trip(store, mini_hf_folder, tmp_path):
    draft = draft_from_path(mini_hf_folder)
    archive = pack(draft, "packed/mini:7", tmp_path / "mini.tar")
    models = import_path(store, archive.path).models
    assert [m.name for m in models] == ["packed/mini:7"]
    assert models[0].manifest_digest == archive.manifest_digest
    assert store.verify() == []
    renamed = import_path(store, archive.path, "other:1").models
    assert renamed[0].manifest_digest == archive.manifest_digest


def test_archive_with_a_tampered_blob_is_refused_and_names_nothing(store, mini_hf_folder, tmp_path):
    archive = pack(draft_from_path(mini_hf_folder), "mini:1", tmp_path / "mini.tar").path
    data = bytearray(archive.read_bytes())
    marker = data.find(b'"model_type"')
    data[marker + 2] ^= 0x20
    archive.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        import_path(store, archive)
    assert store.list() == []
    assert_every_blob_matches_its_name(store)


def test_pack_is_byte_identical_twice(mini_hf_folder, tmp_path):
    first = pack(draft_from_path(mini_hf_folder), "mini:1", tmp_path / "a.tar")
    os.utime(mini_hf_folder / "config.json", (1, 1))
    second = pack(draft_from_path(mini_hf_folder), "mini:1", tmp_path / "b.tar")
    assert first.digest == second.digest
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_manifest_is_an_oci_image_manifest(store, mini_hf_folder):
    model = import_path(store, mini_hf_folder, "mini:1").models[0]
    body = json.loads(store.blobs.read_bytes(model.manifest_digest))
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == mediatypes.OCI_MANIFEST
    assert body["config"]["mediaType"] == mediatypes.MODEL_CONFIG
    for layer in body["layers"]:
        assert set(layer) == {"mediaType", "digest", "size", "annotations"}
        assert mediatypes.ANNOTATION_TITLE in layer["annotations"]
