"""GGUF -> MLX: every supported architecture, in F16, Q8_0, Q4_K and Q6_K, against llama.cpp.

Each tiny random-weight GGUF (``tests/fixtures/gguf_models.py``) is converted and loaded in
mlx-lm (float weights, as on this CPU), and its greedy choices are compared with llama.cpp's on
the same file: llama.cpp decodes 32 tokens greedily from each prompt, and MLX, fed the same
tokens, must pick the same next token at (almost) every step. llama.cpp quantizes activations
to 8 bits for quantized weights, so a rare near-tie flips; the bar is 95% of the steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mlxserve.errors import (
    OutOfMemoryError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)
from mlxserve.runners.mlx import gguf_convert
from mlxserve.runners.mlx.gguf_convert import convert_gguf, mlx_can_convert
from modelstore.errors import ImportSourceError
from tests.chat_helpers import chat_prompt, chat_request
from tests.fixtures.gguf_models import ARCHITECTURES, MORE_QUANTS, QUANTS, build_gguf

STEPS = 32
PROMPTS = ([5, 60, 100, 200, 33], [300, 12, 7, 250], [42], [17, 222, 71], [90, 180, 270, 360])
MIN_AGREEMENT = 0.95
MIN_DISTINCT = 6
"""References that repeat one token whatever the prompt test nothing: the fixtures must make
the layers matter (a random model may still settle into a loop on one prompt)."""


@pytest.fixture(scope="session")
def gguf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ggufs")


def llama_cpp_greedy(path: Path, prompt: list[int]) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llm.eval(prompt)
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return tokens


def mlx_choices(folder: Path, prompt: list[int], continuation: list[int]) -> list[int]:
    """MLX's greedy choice after each prefix of ``prompt + continuation`` (one forward pass)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm.load(str(folder))
    logits = model(mx.array([prompt + continuation]), cache=make_prompt_cache(model))[0]
    return np.array(mx.argmax(logits, axis=-1)).tolist()[len(prompt) - 1 : -1]


def agreement(gguf: Path, folder: Path) -> float:
    agreeing = total = 0
    seen: set[int] = set()
    for prompt in PROMPTS:
        reference = llama_cpp_greedy(gguf, prompt)
        seen.update(reference)
        ours = mlx_choices(folder, prompt, reference)
        agreeing += sum(a == b for a, b in zip(reference, ours, strict=True))
        total += len(reference)
    assert len(seen) >= MIN_DISTINCT, f"degenerate references: only tokens {sorted(seen)}"
    return agreeing / total


def tensor_types(path: Path) -> set[str]:
    from gguf import GGUFReader

    return {tensor.tensor_type.name for tensor in GGUFReader(path).tensors}


FULL_MATRIX_ARCHITECTURES = ("llama", "gemma3")
"""Every architecture runs in Q4_K (what most users have) and these in every quantization;
the rest of the matrix is marked ``slow``."""
CASES = [
    pytest.param(
        arch,
        quant,
        marks=() if quant == "Q4_K_M" or arch in FULL_MATRIX_ARCHITECTURES else pytest.mark.slow,
    )
    for arch in ARCHITECTURES
    for quant in QUANTS
]


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_converted_gguf_decodes_like_llama_cpp(gguf_root, tmp_path, arch, quant):
    gguf = build_gguf(gguf_root, arch, quant)
    expected_type = {"Q4_K_M": "Q4_K"}.get(quant, quant)
    assert expected_type in tensor_types(gguf)
    folder = convert_gguf(gguf, tmp_path / "mlx", dequantize=True)
    figure = agreement(gguf, folder)
    print(f"\n{arch} {quant}: greedy agreement with llama.cpp {figure:.3f}")
    assert figure >= MIN_AGREEMENT


@pytest.mark.parametrize(
    "quant",
    [
        pytest.param(q, marks=() if q in ("BF16", "Q5_K_M", "IQ4_XS") else pytest.mark.slow)
        for q in MORE_QUANTS
    ],
)
def test_more_quantization_types_decode_like_llama_cpp(gguf_root, tmp_path, quant):
    gguf = build_gguf(gguf_root, "qwen3", quant)
    assert quant.removesuffix("_M") in tensor_types(gguf)
    folder = convert_gguf(gguf, tmp_path / "mlx", dequantize=True)
    figure = agreement(gguf, folder)
    print(f"\nqwen3 {quant}: greedy agreement with llama.cpp {figure:.3f}")
    assert figure >= MIN_AGREEMENT


def test_a_wrong_conversion_is_caught(gguf_root, tmp_path, monkeypatch):
    """The comparison can fail: leave llama's Q/K rows permuted and MLX decodes otherwise."""
    gguf = build_gguf(gguf_root, "llama", "F16")
    wrong = dataclasses.replace(gguf_convert.ARCHITECTURES["llama"], permuted_qk=False)
    monkeypatch.setitem(gguf_convert.ARCHITECTURES, "llama", wrong)
    folder = convert_gguf(gguf, tmp_path / "mlx", dequantize=True)
    assert agreement(gguf, folder) < 0.8


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "mistral", "phi3"])
def test_tokenizer_rebuilt_from_the_vocabulary_matches_llama_cpp(gguf_root, tmp_path, arch):
    import llama_cpp
    from transformers import AutoTokenizer

    gguf = build_gguf(gguf_root, arch, "Q8_0")
    folder = convert_gguf(gguf, tmp_path / "mlx", dequantize=True)
    ours = AutoTokenizer.from_pretrained(str(folder))
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, vocab_only=True, verbose=False)
    for text in ("The capital of France is Paris.", "Hello world! 12345 cats"):
        expected = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text, add_special_tokens=False) == expected


def test_config_is_built_from_the_metadata(gguf_root, tmp_path):
    folder = convert_gguf(
        build_gguf(gguf_root, "qwen3moe", "Q4_K_M"), tmp_path / "m", dequantize=True
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert "quantization" not in config


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(gguf_root, tmp_path):
    """Positions in these tests are too short for rope scaling to change a token, so the
    recovered parameters are checked directly."""
    folder = convert_gguf(build_gguf(gguf_root, "llama3", "F16"), tmp_path / "m", dequantize=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    from gguf import GGUFReader

    meta = gguf_convert.GgufMeta(GGUFReader(path := write_gguf(tmp_path / "x.gguf", "llama")), path)
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        gguf_convert.rope_scaling_from_freqs(meta, np.linspace(1.0, 3.0, 32))


def test_phi3_longrope_factors_become_its_rope_scaling(tmp_path):
    from gguf import GGUFReader

    long, short = np.linspace(1.0, 4.0, 32), np.linspace(1.0, 1.2, 32)
    path = write_gguf(
        tmp_path / "x.gguf",
        "phi3",
        extra={"rope_factors_long.weight": long, "rope_factors_short.weight": short},
    )
    scaling = gguf_convert.rope_scaling(gguf_convert.GgufMeta(GGUFReader(path), path))
    assert scaling is not None and scaling["type"] == "longrope"
    assert np.allclose(scaling["long_factor"], long) and np.allclose(scaling["short_factor"], short)


def test_on_metal_weights_are_requantized_at_the_nearest_width(gguf_root, tmp_path):
    import mlx.core as mx
    import mlx_lm

    gguf = build_gguf(gguf_root, "llama", "Q4_K_M")
    folder = convert_gguf(gguf, tmp_path / "q", dequantize=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert config["quantization"]["lm_head"]["bits"] == 6  # llama.cpp chose Q6_K for it
    model, _ = mlx_lm.load(str(folder))
    assert model.layers[0].self_attn.q_proj.bits == 4
    logits = model(mx.array([[5, 60, 100]]))
    assert logits.shape == (1, 3, config["vocab_size"])


def test_conversion_is_refused_up_front_when_it_would_not_fit(gguf_root, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert.platform, "total_memory_bytes", lambda: 1 << 20)
    with pytest.raises(OutOfMemoryError, match=r"llama\.cpp"):
        convert_gguf(build_gguf(gguf_root, "llama", "Q8_0"), tmp_path / "m", dequantize=True)
    assert not any(tmp_path.iterdir())


def write_gguf(
    path: Path, arch: str, raw_type: str | None = None, extra: dict[str, np.ndarray] | None = None
) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(128)
    writer.add_head_count(2)
    if raw_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:
        qtype = gguf.GGMLQuantizationType[raw_type]
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=qtype)
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_mlx_lm_lacks_is_unsupported_architecture(tmp_path):
    gguf = write_gguf(tmp_path / "x.gguf", "rwkv6")
    with pytest.raises(UnsupportedArchitectureError, match="rwkv6") as caught:
        convert_gguf(gguf, tmp_path / "out", dequantize=True)
    assert caught.value.code == "unsupported_architecture"
    assert not mlx_can_convert("rwkv6", "F32")


def test_a_malformed_gguf_is_a_clear_error_not_a_crash(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="vocabulary"):
        convert_gguf(write_gguf(tmp_path / "x.gguf", "llama"), tmp_path / "out", dequantize=True)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    # The bounded header check (modelstore/gguf_header.py) refuses it before gguf-py reads it.
    with pytest.raises(ImportSourceError, match="not a valid GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out", dequantize=True)


def test_a_type_gguf_py_cannot_dequantize_is_unsupported_quantization(tmp_path):
    gguf = write_gguf(tmp_path / "x.gguf", "llama", raw_type="Q1_0")
    with pytest.raises(UnsupportedQuantizationError, match="Q1_0") as caught:
        convert_gguf(gguf, tmp_path / "out", dequantize=True)
    assert caught.value.code == "unsupported_quantization"
    assert not mlx_can_convert("llama", "Q1_0")
    assert mlx_can_convert("qwen3", "Q4_K_M") and mlx_can_convert("gemma3", "IQ4_XS")


def test_unsupported_quantization_is_a_400():
    from mlxserve.server.errors import status_for

    assert status_for(UnsupportedQuantizationError("x")) == 400


def test_choose_runner_prefers_mlx_for_every_convertible_gguf(monkeypatch):
    from mlxserve.runners import select
    from modelstore.model import LocalModel

    monkeypatch.setattr(select.platform, "preferred_runners", lambda: ("mlx", "llamacpp"))

    def model(architecture: str, quantization: str) -> LocalModel:
        return LocalModel(
            "m:1",
            "sha256:" + "0" * 64,
            Path("/nowhere"),
            "gguf",
            [],
            architecture=architecture,
            quantization=quantization,
        )

    assert select.choose_runner(model("qwen3", "Q4_K_M")) == "mlx"
    assert select.choose_runner(model("gemma3", "Q6_K")) == "mlx"
    assert select.choose_runner(model("rwkv6", "Q4_K_M")) == "llamacpp"
    assert select.choose_runner(model("llama", "Q1_0")) == "llamacpp"


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
async def test_a_converted_gguf_chats_on_the_mlx_runner_as_on_llama_cpp(gguf_root, tmp_path, arch):
    """Through the runners, as the daemon uses them: same prompt, same tokens, same answer."""
    from mlxserve.chat.model import LoadedModel
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    store = ModelStore(tmp_path / "home")
    import_path(store, build_gguf(gguf_root, arch, "F16"), f"{arch}:f16")
    mlx = await LoadedModel.load(store, f"{arch}:f16", "mlx")
    cpp = await LoadedModel.load(store, f"{arch}:f16", "llamacpp")
    try:
        messages = [{"role": "user", "content": "The capital of France is"}]
        prompt = chat_prompt(mlx, messages)
        assert prompt == chat_prompt(cpp, messages)
        assert mlx.runner.tokenize(prompt, False) == cpp.runner.tokenize(prompt, False)
        tokens = []
        for loaded in (mlx, cpp):
            request = chat_request(loaded, messages, {"temperature": 0.0, "max_tokens": 8})
            tokens.append([t async for c in loaded.generate(request) for t in c.token_ids])
        assert len(tokens[0]) == 8 and tokens[0] == tokens[1]
    finally:
        await mlx.unload()
        await cpp.unload()


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_raw_prompt_gets_bos_exactly_as_llama_cpp_gives_it(tmp_path, add_bos):
    """MLX keeps BOS on raw prompts where the GGUF says llama.cpp adds it (Gemma's raw
    completions otherwise differ between the runners)."""
    import llama_cpp
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_models import make_tiny_gguf

    gguf = make_tiny_gguf(tmp_path / "tiny.gguf", add_bos=add_bos)
    folder = convert_gguf(gguf, tmp_path / "mlx", dequantize=True)
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, vocab_only=True, verbose=False)
    text = "The capital of France is"
    expected = llm.tokenize(text.encode(), add_bos=True, special=True)
    converted = AutoTokenizer.from_pretrained(str(folder)).encode(text, add_special_tokens=True)
    assert converted == expected
    assert (converted[0] == llm.token_bos()) is add_bos
