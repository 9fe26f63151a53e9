"""``mlxctl import --from-ollama`` and ``--from-lmstudio`` over stores built in each app's layout.

Weights must come in as hard links (same inode, no second copy), a blob whose bytes no longer
match its name must be refused, and a manifest naming a missing blob must say which.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.model import RUNNER_PARAMETERS
from modelstore.ollama import PARAMETER_NAMES, map_parameters
from modelstore.parameters import SPEC_PARAMETERS
from modelstore.store import ModelStore
from tests.cli import mlxctl
from tests.fixtures.gguf_mmproj import make_tiny_mmproj
from tests.fixtures.ollama_store import LICENSE, SYSTEM, add_ollama_model


@pytest.fixture
def ollama_root(tmp_path: Path, tiny_models) -> Path:
    root = tmp_path / "ollama" / "models"
    add_ollama_model(root, "tiny", "latest", tiny_models.gguf_path)
    return root


def run(home: Path, root: Path, *args: str, check: bool = True):
    return mlxctl(
        "import", "--from-ollama", *args, home=home, check=check, env={"OLLAMA_MODELS": str(root)}
    )


def weights_blob(root: Path) -> Path:
    return max((root / "blobs").iterdir(), key=lambda p: p.stat().st_size)


def test_dry_run_lists_what_would_be_imported_and_stores_nothing(store_home, ollama_root):
    listed = json.loads(run(store_home, ollama_root, "--all", "--dry-run", "--json").stdout)
    assert [(row["source"], row["name"]) for row in listed] == [("tiny:latest", "tiny:latest")]
    assert listed[0]["size"] > weights_blob(ollama_root).stat().st_size
    assert ModelStore(store_home).list() == []


def test_import_hard_links_the_weights_and_maps_the_layers(store_home, ollama_root):
    run(store_home, ollama_root, "tiny:latest", "--json")
    store = ModelStore(store_home)
    model = store.resolve("tiny:latest")
    (weights,) = model.manifest.layers_of(mediatypes.WEIGHTS_GGUF)
    assert store.blobs.path(weights.digest).stat().st_ino == weights_blob(ollama_root).stat().st_ino
    shown = json.loads(mlxctl("show", "tiny:latest", "--json", home=store_home).stdout)
    assert shown["parameters"] == {
        "temperature": 0.2,
        "context_length": 4096,
        "stop": ["<|im_end|>"],
    }
    assert shown["system"] == SYSTEM
    # the GGUF's own Jinja template is the one used (show prints the template in use)
    assert shown["template_source"] is None and "<|im_start|>" in shown["template"]
    assert store.text_layer(model, mediatypes.LICENSE) == LICENSE
    assert "ollama.template.gotmpl" in {layer["title"] for layer in shown["layers"]}
    assert shown["format"] == "gguf" and shown["architecture"] == "llama"
    assert mlxctl("verify", home=store_home).returncode == 0


def test_a_tampered_blob_is_refused(store_home, ollama_root):
    blob = weights_blob(ollama_root)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run(store_home, ollama_root, "tiny:latest", check=False)
    assert result.returncode != 0
    assert "digest_mismatch" in result.stderr
    assert ModelStore(store_home).list() == []


def test_a_dangling_manifest_names_the_missing_blob(store_home, ollama_root):
    blob = weights_blob(ollama_root)
    blob.unlink()
    result = run(store_home, ollama_root, "tiny:latest", check=False)
    assert result.returncode != 0
    assert "blob_not_found" in result.stderr and blob.name.replace("-", ":") in result.stderr


def test_an_absent_name_is_a_clear_error(store_home, ollama_root):
    result = run(store_home, ollama_root, "nope:1", check=False)
    assert result.returncode != 0 and "not in Ollama's store" in result.stderr


def test_all_imports_every_tag(store_home, ollama_root, tiny_models):
    add_ollama_model(ollama_root, "tiny", "v2", tiny_models.gguf_path)
    add_ollama_model(ollama_root, "tinier", "q", tiny_models.gguf_path, namespace="someone")
    run(store_home, ollama_root, "--all", "--json")
    names = sorted(m.name for m in ModelStore(store_home).list())
    assert names == ["someone/tinier:q", "tiny:latest", "tiny:v2"]


def test_ollama_parameter_names_map_to_ours():
    mapped, dropped = map_parameters(
        {"num_predict": 5, "repeat_penalty": 1.1, "stop": "x", "mirostat": 2}
    )
    assert mapped == {"max_tokens": 5, "repetition_penalty": 1.1, "stop": ["x"]}
    assert dropped == ["mirostat"]
    assert set(PARAMETER_NAMES.values()) <= {*SPEC_PARAMETERS, *RUNNER_PARAMETERS}


@pytest.fixture
def lmstudio_root(tmp_path: Path, tiny_models) -> Path:
    root = tmp_path / "lmstudio" / "models"
    gguf_repo = root / "lmstudio-community" / "Tiny-Llama-GGUF"
    gguf_repo.mkdir(parents=True)
    shutil.copyfile(tiny_models.gguf_path, gguf_repo / "Tiny-Llama-F32.gguf")
    make_tiny_mmproj(gguf_repo / "mmproj-Tiny-Llama-F16.gguf")
    shutil.copytree(tiny_models.hf_folder, root / "mlx-community" / "Tiny-Llama-MLX")
    return root


def run_lmstudio(home: Path, root: Path, *args: str, check: bool = True):
    return mlxctl(
        "import",
        "--from-lmstudio",
        *args,
        home=home,
        check=check,
        env={"LMSTUDIO_MODELS": str(root)},
    )


def test_lmstudio_dry_run_lists_gguf_files_and_mlx_folders(store_home, lmstudio_root):
    listed = json.loads(
        run_lmstudio(store_home, lmstudio_root, "--dry-run", "--all", "--json").stdout
    )
    assert sorted((row["source"], row["name"], row["format"]) for row in listed) == [
        (
            "lmstudio-community/Tiny-Llama-GGUF/Tiny-Llama-F32.gguf",
            "lmstudio-community/tiny-llama-gguf:tiny-llama-f32",
            "gguf",
        ),
        ("mlx-community/Tiny-Llama-MLX", "mlx-community/tiny-llama-mlx:mlx", "mlx"),
    ]
    assert ModelStore(store_home).list() == []


def test_lmstudio_import_hard_links_both_kinds(store_home, lmstudio_root):
    run_lmstudio(store_home, lmstudio_root, "--all", "--json")
    store = ModelStore(store_home)
    gguf = store.resolve("lmstudio-community/tiny-llama-gguf:tiny-llama-f32")
    (weights,) = gguf.manifest.layers_of(mediatypes.WEIGHTS_GGUF)
    assert len(gguf.manifest.layers_of(mediatypes.PROJECTOR_GGUF)) == 1  # the folder's mmproj
    assert "vision" in store.config(gguf).features
    source = lmstudio_root / "lmstudio-community" / "Tiny-Llama-GGUF" / "Tiny-Llama-F32.gguf"
    assert store.blobs.path(weights.digest).stat().st_ino == source.stat().st_ino
    mlx = store.resolve("mlx-community/tiny-llama-mlx:mlx")
    (tensors,) = mlx.manifest.layers_of(mediatypes.WEIGHTS_SAFETENSORS)
    folder = lmstudio_root / "mlx-community" / "Tiny-Llama-MLX"
    assert (
        os.stat(store.blobs.path(tensors.digest)).st_ino
        == (folder / "model.safetensors").stat().st_ino
    )
    assert store.config(mlx).source == {"kind": "lmstudio", "name": "mlx-community/Tiny-Llama-MLX"}
