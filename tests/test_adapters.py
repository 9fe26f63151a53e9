"""LoRA adapters in the ModelSpec: an adapter trained for a few steps with ``mlx_lm.lora`` on
the tiny fixture is stored as layers of its own, changes the model's output, and gives exactly
the tokens of the model ``mlx_lm fuse`` makes from it; one that does not fit its base is
refused when the model is created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxserve.runners.base import GenerateRequest, RunnerOptions
from modelstore import mediatypes
from modelstore.errors import SpecValidationError
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.spec import build_draft, load_spec
from modelstore.store import ModelStore
from tests.fixtures.tiny_models import make_tiny_draft

PROMPTS = ["The capital of France is", "Once upon a time there was"]
GENERATED = 16
TRAINING_TEXT = "The capital of France is Paris. The cat sat on the mat."
TRAIN_STEPS = 10


def mlx_lm(*args: str, cwd: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    """A folder holding ``adapters/`` (a few steps of ``mlx_lm lora``) and ``fused/``."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    data.mkdir()
    rows = "".join(json.dumps({"text": TRAINING_TEXT}) + "\n" for _ in range(8))
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(rows)
    base = str(tiny_models.hf_folder)
    mlx_lm(
        "lora",
        "--model",
        base,
        "--train",
        "--data",
        "data",
        "--iters",
        str(TRAIN_STEPS),
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--learning-rate",
        "5e-2",
        "--steps-per-eval",
        "1000",
        "--val-batches",
        "1",
        "--seed",
        "0",
        "--adapter-path",
        "adapters",
        cwd=root,
    )
    mlx_lm("fuse", "--model", base, "--adapter-path", "adapters", "--save-path", "fused", cwd=root)
    return root


def create(store: ModelStore, folder: Path, name: str, spec: dict) -> None:
    path = folder / f"{name.replace(':', '-')}.modelspec.json"
    path.write_text(json.dumps(spec))
    store.commit(build_draft(load_spec(path), store), name)


@pytest.fixture(scope="module")
def store(tiny_models, trained, tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("lora-store"))
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    import_path(store, trained / "fused", "tiny:fused")
    create(store, trained, "tiny:lora", {"from": "model://tiny:mlx", "adapters": ["adapters"]})
    return store


async def greedy(store: ModelStore, name: str) -> list[list[int]]:
    from mlxserve.runners.mlx import MlxRunner

    runner = MlxRunner()
    await runner.load(open_model(store, name), RunnerOptions(max_parallel=1))
    try:
        answers = []
        for prompt in PROMPTS:
            request = GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=GENERATED)
            answers.append([t async for c in runner.generate(request) for t in c.token_ids])
        return answers
    finally:
        await runner.unload()


def test_the_adapter_is_stored_as_its_own_layers(store):
    layers = store.resolve("tiny:lora").manifest.layers
    types = {layer.media_type for layer in layers}
    assert {mediatypes.ADAPTER, mediatypes.ADAPTER_CONFIG} <= types
    base = {layer.digest for layer in store.resolve("tiny:mlx").manifest.layers}
    weights = [layer for layer in layers if layer.media_type == mediatypes.WEIGHTS_SAFETENSORS]
    assert all(layer.digest in base for layer in weights)


async def test_the_adapter_changes_the_output_and_matches_the_fused_model(store):
    base = await greedy(store, "tiny:mlx")
    adapted = await greedy(store, "tiny:lora")
    fused = await greedy(store, "tiny:fused")
    assert adapted != base
    assert adapted == fused


async def test_fusing_on_create_matches_mlx_lms_fuse(store, trained, tmp_path):
    from modelstore.adapters import fuse_adapter

    spec = trained / "tiny-lora.modelspec.json"
    fused = fuse_adapter(build_draft(load_spec(spec), store), tmp_path / "work")
    assert not {layer.media_type for layer in fused.layers} & {
        mediatypes.ADAPTER,
        mediatypes.ADAPTER_CONFIG,
    }
    store.commit(fused, "tiny:fused-here")
    assert await greedy(store, "tiny:fused-here") == await greedy(store, "tiny:fused")


def test_an_adapter_for_another_base_is_refused_at_create(store, trained, tiny_models, tmp_path):
    import_path(store, make_tiny_draft(tmp_path / "one-layer", tiny_models.hf_folder), "one:mlx")
    spec = {"from": "model://one:mlx", "adapters": [str(trained / "adapters")]}
    with pytest.raises(SpecValidationError, match="lacks"):
        create(store, tmp_path, "bad:lora", spec)


def test_an_adapter_on_a_gguf_model_is_refused_at_create(store, trained, tmp_path):
    spec = {"from": "model://tiny:gguf", "adapters": [str(trained / "adapters")]}
    with pytest.raises(SpecValidationError, match="MLX models"):
        create(store, tmp_path, "bad:gguf", spec)


def test_mlxctl_create_fuse_stores_fused_weights_and_no_adapter(store_home, tiny_models, trained):
    from tests.cli import mlxctl

    mlxctl("import", str(tiny_models.hf_folder), "--name", "tiny:mlx", home=store_home)
    spec = trained / "cli.modelspec.yaml"
    spec.write_text("from: model://tiny:mlx\nadapters: [adapters]\n")
    mlxctl("create", "tiny:fused-cli", "-f", str(spec), "--fuse", home=store_home)
    shown = json.loads(mlxctl("show", "tiny:fused-cli", "--json", home=store_home).stdout)
    assert "adapter" not in json.dumps([layer["media_type"] for layer in shown["layers"]])
    assert shown["source"]["fused_adapter"].startswith("sha256:")


def test_api_create_takes_ollamas_adapters_field(store, trained):
    """Ollama's ``/api/create`` ``adapters`` (uploaded blobs by file name) gives the same
    adapter layers as a ModelSpec's ``adapters:`` folder."""
    import hashlib
    import urllib.request

    from tests.daemon import Daemon

    daemon = Daemon(store.root).start()
    try:
        uploaded = {}
        for name in ("adapters.safetensors", "adapter_config.json"):
            data = (trained / "adapters" / name).read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{daemon.url}/api/blobs/{digest}", data=data, method="POST"
                ),
                timeout=60,
            )
            uploaded[name] = digest
        body = {"model": "tiny:lora-api", "from": "tiny:mlx", "adapters": uploaded, "stream": False}
        request = urllib.request.Request(
            f"{daemon.url}/api/create",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read())["status"] == "success"
    finally:
        daemon.stop()

    def adapter_digests(name: str) -> set[str]:
        kinds = {mediatypes.ADAPTER, mediatypes.ADAPTER_CONFIG}
        layers = store.resolve(name).manifest.layers
        return {layer.digest for layer in layers if layer.media_type in kinds}

    assert adapter_digests("tiny:lora-api") == adapter_digests("tiny:lora")
