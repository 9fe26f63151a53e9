"""The tiny fixture models are real, loadable, and the same model in both formats.

The runner conformance suite trusts that the HF folder and the GGUF hold identical weights and
tokenizer; these tests check that trust directly against mlx_lm and llama.cpp, so a broken
fixture shows up here instead of as a puzzling runner disagreement.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.tiny_models import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    HEADS,
    SPECIAL_TOKENS,
    TinyModels,
    build_fixture_models,
    make_tiny_gguf,
)

TEXTS = [
    "The capital of France is Paris.",
    "Hello world! How are you today?",
    "They're here, I'll wait; we've 12 cats & 345 dogs.",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_end|>",
]
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_fixture_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mlx_model(models: TinyModels) -> tuple[Any, Any]:
    mlx_lm = pytest.importorskip("mlx_lm")
    return mlx_lm.load(str(models.hf_folder))


@pytest.fixture(scope="module")
def llama(models: TinyModels) -> Any:
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(models.gguf_path), n_ctx=512, verbose=False)


def mlx_greedy(mlx_model: tuple[Any, Any], prompt: str, count: int) -> list[int]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_model
    sampler = make_sampler(temp=0.0)
    return [
        response.token
        for response in stream_generate(model, tokenizer, prompt, max_tokens=count, sampler=sampler)
    ]


def llama_greedy(llama: Any, prompt: str, count: int) -> list[int]:
    ids = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    tokens: list[int] = []
    for token in llama.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            break
    return tokens


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_hf_folder_has_the_usual_files(models: TinyModels) -> None:
    folder = models.hf_folder
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == len(tokenizer["model"]["vocab"])
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_hf_folder_loads_in_mlx_lm_and_generates(mlx_model: tuple[Any, Any]) -> None:
    from mlx_lm import generate

    _, tokenizer = mlx_model
    assert tokenizer.bos_token_id == BOS_ID
    assert tokenizer.eos_token_id == EOS_ID
    text = generate(*mlx_model, "The capital of France is", max_tokens=4)
    assert isinstance(text, str)
    assert text
    # The special tokens' output rows are zero, so greedy decoding never stops early.
    assert len(mlx_greedy(mlx_model, PROMPTS[0], GREEDY_TOKENS)) == GREEDY_TOKENS


def test_chat_template_renders_chatml(mlx_model: tuple[Any, Any]) -> None:
    _, tokenizer = mlx_model
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_metadata_is_what_llama_cpp_converters_write(models: TinyModels) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(models.gguf_path))

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("general.name") == "tiny-llama"
    assert value("llama.attention.head_count") == HEADS
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    assert value("tokenizer.ggml.bos_token_id") == BOS_ID
    assert value("tokenizer.ggml.eos_token_id") == EOS_ID
    assert value("tokenizer.ggml.add_bos_token") is False
    tokens = value("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type")
    assert [types[tokens.index(t)] for t in SPECIAL_TOKENS] == [gguf.TokenType.CONTROL] * 3
    names = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= names
    assert "blk.1.attn_q.weight" in names
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_gguf_loads_in_llama_cpp_and_generates(llama: Any) -> None:
    assert llama.token_bos() == BOS_ID
    assert llama.token_eos() == EOS_ID
    result = llama("The capital of France is", max_tokens=4, temperature=0.0)
    assert result["usage"]["completion_tokens"] >= 1
    assert len(llama_greedy(llama, PROMPTS[0], GREEDY_TOKENS)) == GREEDY_TOKENS


@pytest.mark.parametrize("text", TEXTS)
def test_both_formats_tokenize_the_same(mlx_model: tuple[Any, Any], llama: Any, text: str) -> None:
    _, tokenizer = mlx_model
    hf_ids = tokenizer.encode(text, add_special_tokens=False)
    assert llama.tokenize(text.encode(), add_bos=False, special=True) == hf_ids
    assert llama.detokenize(hf_ids, special=True).decode() == text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_decoding_agrees_between_mlx_lm_and_llama_cpp(
    mlx_model: tuple[Any, Any], llama: Any, prompt: str
) -> None:
    assert mlx_greedy(mlx_model, prompt, GREEDY_TOKENS) == llama_greedy(
        llama, prompt, GREEDY_TOKENS
    )


def test_greedy_decoding_is_repeatable(mlx_model: tuple[Any, Any]) -> None:
    first = mlx_greedy(mlx_model, PROMPTS[0], GREEDY_TOKENS)
    assert mlx_greedy(mlx_model, PROMPTS[0], GREEDY_TOKENS) == first
    assert len(set(first)) > 1, "random weights should not collapse to one repeated token"


def test_same_seed_gives_byte_identical_files(
    models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> None:
    again = build_fixture_models(tmp_path_factory.mktemp("tiny-again"))
    assert digests(again.hf_folder) == digests(models.hf_folder)
    assert digests(again.gguf_path.parent) == digests(models.gguf_path.parent)
    # Without a folder, the GGUF is regenerated from the seed: still the same bytes.
    standalone = make_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")
    assert standalone.read_bytes() == models.gguf_path.read_bytes()
