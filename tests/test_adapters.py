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


async def greedy(store: ModelStore, name: str, runner_name: str = "mlx") -> list[list[int]]:
    from mlxserve.runners.select import make_runner

    runner = make_runner(runner_name)
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


def test_an_mlx_adapter_on_a_gguf_model_is_refused_at_create(store, trained, tmp_path):
    spec = {"from": "model://tiny:gguf", "adapters": [str(trained / "adapters")]}
    with pytest.raises(SpecValidationError, match="one GGUF LoRA file"):
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


# -- GGUF LoRA on llama.cpp ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_lora(tiny_models, tmp_path_factory) -> Path:
    """A folder with ``adapter.gguf`` (a GGUF LoRA for the tiny GGUF) and ``fused.gguf``."""
    from tests.fixtures.gguf_lora import make_fused_gguf, make_gguf_lora

    root = tmp_path_factory.mktemp("gguf-lora")
    make_gguf_lora(root / "adapter.gguf", tiny_models.hf_folder)
    make_fused_gguf(root / "fused.gguf", tiny_models.hf_folder, root)
    return root


@pytest.fixture(scope="module")
def gguf_store(store, gguf_lora) -> ModelStore:
    import_path(store, gguf_lora / "fused.gguf", "tiny:gguf-fused")
    create(
        store,
        gguf_lora,
        "tiny:gguf-lora",
        {"from": "model://tiny:gguf", "adapters": ["adapter.gguf"]},
    )
    return store


async def llamacpp_greedy(store: ModelStore, name: str) -> list[list[int]]:
    return await greedy(store, name, "llamacpp")


def test_a_gguf_adapter_is_stored_as_its_own_layer(gguf_store):
    layers = gguf_store.resolve("tiny:gguf-lora").manifest.layers
    assert [layer.media_type for layer in layers].count(mediatypes.ADAPTER_GGUF) == 1
    base = {layer.digest for layer in gguf_store.resolve("tiny:gguf").manifest.layers}
    weights = [layer for layer in layers if layer.media_type == mediatypes.WEIGHTS_GGUF]
    assert [layer.digest in base for layer in weights] == [True]


async def test_a_gguf_adapter_changes_the_output_and_matches_the_fused_gguf(gguf_store):
    base = await llamacpp_greedy(gguf_store, "tiny:gguf")
    adapted = await llamacpp_greedy(gguf_store, "tiny:gguf-lora")
    fused = await llamacpp_greedy(gguf_store, "tiny:gguf-fused")
    assert adapted != base
    assert adapted == fused


def test_a_gguf_model_with_an_adapter_runs_on_llama_cpp(gguf_store):
    """The GGUF-to-MLX converter does not apply adapters: such a model stays on llama.cpp."""
    from mlxserve.runners.select import capable_runners

    model = open_model(gguf_store, "tiny:gguf-lora")
    assert model.adapter is not None and model.adapter.is_file()
    assert [plugin.name for plugin in capable_runners(model)] == ["llamacpp"]
    assert "mlx" in [plugin.name for plugin in capable_runners(open_model(gguf_store, "tiny:gguf"))]


def _other_arch_lora(path: Path, tiny_models) -> Path:
    from tests.fixtures.gguf_lora import lora_pairs, write_gguf_lora

    return write_gguf_lora(path, lora_pairs(tiny_models.hf_folder), architecture="qwen2")


def _wrong_shape_lora(path: Path, tiny_models) -> Path:
    import numpy as np

    from tests.fixtures.gguf_lora import lora_pairs, write_gguf_lora

    pairs = lora_pairs(tiny_models.hf_folder)
    name = next(iter(pairs))
    a, b = pairs[name]
    pairs[name] = (np.zeros((a.shape[0], a.shape[1] * 2), np.float32), b)
    return write_gguf_lora(path, pairs)


def _missing_tensor_lora(path: Path, tiny_models) -> Path:
    from tests.fixtures.gguf_lora import lora_pairs, write_gguf_lora

    pairs = lora_pairs(tiny_models.hf_folder)
    pairs["model.layers.9.mlp.down_proj.weight"] = next(iter(pairs.values()))
    return write_gguf_lora(path, pairs)


def _a_model_not_an_adapter(path: Path, tiny_models) -> Path:
    import shutil

    return Path(shutil.copy(tiny_models.gguf_path, path))


def _lying_header(path: Path, tiny_models) -> Path:
    """A GGUF header claiming 2^62 tensors: refused by the bounded header walk."""
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 0))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_other_arch_lora, "adapts a qwen2 model"),
        (_wrong_shape_lora, "maps 128 values"),
        (_missing_tensor_lora, "lacks"),
        (_a_model_not_an_adapter, "not a GGUF LoRA adapter"),
        (_lying_header, "tensor count"),
    ],
    ids=["architecture", "shape", "tensor", "not-an-adapter", "lying-header"],
)
def test_a_mismatched_gguf_adapter_is_refused_at_create(
    gguf_store, tiny_models, tmp_path, make, message
):
    make(tmp_path / "bad.gguf", tiny_models)
    spec = {"from": "model://tiny:gguf", "adapters": ["bad.gguf"]}
    with pytest.raises(SpecValidationError, match=message):
        create(gguf_store, tmp_path, "bad:gguf-lora", spec)


async def test_an_ollama_model_with_an_adapter_layer_imports_and_applies_it(
    gguf_store, gguf_lora, tiny_models, tmp_path
):
    """Ollama's ``ADAPTER`` (a GGUF LoRA layer) becomes our adapter layer, checked against the
    base and applied by llama.cpp, instead of a file kept aside."""
    from modelstore.ollama import ADAPTER, find_model, import_ollama
    from tests.fixtures.ollama_store import add_ollama_model

    root = tmp_path / "ollama"
    extra = [(ADAPTER, gguf_lora / "adapter.gguf")]
    add_ollama_model(root, "tiny", "lora", tiny_models.gguf_path, extra_layers=extra)
    import_ollama(gguf_store, find_model("tiny:lora", root), root, name="tiny:ollama-lora")
    types = [layer.media_type for layer in gguf_store.resolve("tiny:ollama-lora").manifest.layers]
    assert types.count(mediatypes.ADAPTER_GGUF) == 1
    assert await llamacpp_greedy(gguf_store, "tiny:ollama-lora") == await llamacpp_greedy(
        gguf_store, "tiny:gguf-fused"
    )


def test_the_ollama_client_creates_a_model_with_a_gguf_adapter(gguf_store, gguf_lora):
    """``ollama.create(..., adapters=...)`` after uploading the GGUF LoRA as a blob, as
    ``ollama create`` does for a Modelfile's ``ADAPTER`` line; then it chats on llama.cpp."""
    import hashlib

    import ollama

    from tests.daemon import Daemon

    data = (gguf_lora / "adapter.gguf").read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    daemon = Daemon(gguf_store.root).start()
    try:
        client = ollama.Client(host=daemon.url, timeout=120)
        client.create_blob(gguf_lora / "adapter.gguf")
        client.create(model="tiny:client-lora", from_="tiny:gguf", adapters={"a.gguf": digest})
        shown = client.show("tiny:client-lora")
        answer = client.generate(
            model="tiny:client-lora",
            prompt=PROMPTS[0],
            options={"temperature": 0, "num_predict": 8},
        )
        assert answer.done and answer.eval_count == 8
    finally:
        daemon.stop()
    layers = gguf_store.resolve("tiny:client-lora").manifest.layers
    assert [layer.digest for layer in layers if layer.media_type == mediatypes.ADAPTER_GGUF] == [
        digest
    ]
    assert shown.details.parent_model
    assert f"ADAPTER {digest}" in shown.modelfile


def test_importing_a_gguf_adapter_as_a_model_says_what_it_is(store_home, gguf_lora):
    from tests.cli import mlxctl

    adapter = str(gguf_lora / "adapter.gguf")
    result = mlxctl("import", adapter, "--name", "a:b", home=store_home, check=False)
    assert result.returncode != 0
    assert "is a LoRA adapter, not a model" in result.stderr
