"""GGUF -> MLX: so a llama-architecture GGUF (the embedded default model) runs on MLX too.

``mx.load`` reads GGUF tensors (Q4_0, Q4_1 and Q8_0 come back as MLX affine-quantized
triplets); what no library does for us, and so is written here, is (1) renaming llama.cpp's
tensors to HF names, (2) undoing the row permutation llama.cpp's converter applies to the Q
and K projections, and (3) rebuilding an HF ``tokenizer.json`` from the GGUF vocabulary.
The result is an ordinary HF-style folder that ``mlx_lm.load`` opens, cached by the GGUF's
digest so the work is done once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mlxserve.errors import UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = {"llama"}
CONTROL_TOKEN_TYPE = 3
USER_DEFINED_TOKEN_TYPE = 4
GGUF_QUANT_GROUP = 32
"""Q4_0, Q4_1 and Q8_0 all quantize in blocks of 32 weights."""

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_TENSOR = re.compile(r"(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|scales|biases)")
_PRE_TOKENIZERS_WITH_DIGIT_SPLIT = {"smollm", "codeshell", "exaone", "minerva"}
_BYTE_LEVEL_PRE_TOKENIZERS = {"gpt-2", "mpt", "olmo", "jais", "trillion"} | (
    _PRE_TOKENIZERS_WITH_DIGIT_SPLIT
)
"""llama.cpp pre-tokenizers that split exactly like GPT-2's regex (after digits, for some)."""


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def hf_name(gguf_name: str) -> str:
    match = _TENSOR.fullmatch(gguf_name)
    if not match:
        raise UnsupportedArchitectureError(f"unexpected GGUF tensor {gguf_name}")
    layer, base, kind = match.groups()
    if layer is not None:
        if base not in _LAYER_NAMES:
            raise UnsupportedArchitectureError(f"unexpected GGUF tensor {gguf_name}")
        return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{kind}"
    if base not in _GLOBAL_NAMES:
        raise UnsupportedArchitectureError(f"unexpected GGUF tensor {gguf_name}")
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def unpermute_rows(array: Any, n_heads: int) -> Any:
    """Undo llama.cpp's ``permute`` of Q/K rows (it interleaves the two rotary halves).

    Rows are output features, so a quantized weight's packed ints, scales and biases all
    move the same way: the permutation is exact on quantized data too.
    """
    rows = array.shape[0]
    rest = array.shape[1:]
    return (
        array.reshape(n_heads, rows // n_heads // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(rows, *rest)
    )


def convert_weights(weights: dict[str, Any], n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    converted = {}
    for name, value in weights.items():
        target = hf_name(name)
        if ".self_attn.q_proj." in target:
            value = unpermute_rows(value, n_heads)
        elif ".self_attn.k_proj." in target:
            value = unpermute_rows(value, n_kv_heads)
        converted[target] = value
    return converted


def tensor_bits(weight: Any, scales: Any) -> int:
    """Bits per weight of one quantized tensor: a GGUF mixes types (Q4_1 blocks, Q8_0 embedding)."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GGUF_QUANT_GROUP)


def quantization_layout(weights: dict[str, Any]) -> dict[str, int]:
    """Module path -> bits, for every quantized tensor."""
    return {
        name.removesuffix(".scales"): tensor_bits(weights[name.removesuffix(".scales") + ".weight"],
                                                   value)
        for name, value in weights.items()
        if name.endswith(".scales")
    }


def dequantize_all(weights: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    bits = quantization_layout(weights)
    plain = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if base in bits:
            value = mx.dequantize(
                value, weights[f"{base}.scales"], weights[f"{base}.biases"],
                group_size=GGUF_QUANT_GROUP, bits=bits[base],
            )
        plain[name] = value.astype(mx.float32)
    return plain


def hf_config(
    meta: dict[str, Any], has_output: bool, quantized: dict[str, int]
) -> dict[str, Any]:
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return _scalar(meta.get(f"{arch}.{key}", default))

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("rope.dimension_count", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": not has_output,
        "bos_token_id": _scalar(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _scalar(meta.get("tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    if quantized:
        common = max(set(quantized.values()), key=list(quantized.values()).count)
        layout: dict[str, Any] = {"group_size": GGUF_QUANT_GROUP, "bits": common}
        for module, bits in quantized.items():
            if bits != common:
                layout[module] = {"group_size": GGUF_QUANT_GROUP, "bits": bits}
        config["quantization"] = layout
    return config


def build_tokenizer(meta: dict[str, Any], folder: Path) -> None:
    """Save an HF fast tokenizer equivalent to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} cannot be rebuilt for MLX "
            "(only byte-level BPE, 'gpt2', is supported)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(f"GGUF pre-tokenizer {pre!r} is not supported on MLX")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_TOKENIZERS_WITH_DIGIT_SPLIT:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(token, special=types[index] == CONTROL_TOKEN_TYPE, normalized=False)
        for index, token in enumerate(tokens)
        if types[index] in (CONTROL_TOKEN_TYPE, USER_DEFINED_TOKEN_TYPE)
    ]
    tokenizer.add_tokens(specials)

    def token_text(key: str) -> str | None:
        index = meta.get(key)
        return tokens[int(_scalar(index))] if index is not None else None

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token_text("tokenizer.ggml.bos_token_id"),
        eos_token=token_text("tokenizer.ggml.eos_token_id"),
        unk_token=token_text("tokenizer.ggml.unknown_token_id"),
        pad_token=token_text("tokenizer.ggml.padding_token_id"),
        clean_up_tokenization_spaces=False,
    )
    if meta.get("tokenizer.chat_template"):
        wrapped.chat_template = meta["tokenizer.chat_template"]
    wrapped.save_pretrained(str(folder))


def convert_gguf(gguf_path: Path, out: Path, *, dequantize: bool) -> Path:
    """Write an MLX model folder for ``gguf_path`` at ``out`` (atomically) and return it."""
    import mlx.core as mx

    if (out / "config.json").is_file():
        return out
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except (ValueError, RuntimeError) as exc:
        raise UnsupportedArchitectureError(
            f"MLX cannot read {gguf_path.name} (only F32/F16/Q4_0/Q4_1/Q8_0 tensors): {exc}"
        ) from exc
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {architecture!r} cannot be converted to MLX (supported: llama)"
        )
    heads = int(_scalar(meta["llama.attention.head_count"]))
    kv_heads = int(_scalar(meta.get("llama.attention.head_count_kv", heads)))
    converted = convert_weights(weights, heads, kv_heads)
    if dequantize:
        converted = dequantize_all(converted)
    quantized = quantization_layout(converted)
    building = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        mx.save_safetensors(str(building / "model.safetensors"), converted, {"format": "mlx"})
        has_output = "lm_head.weight" in converted
        (building / "config.json").write_text(json.dumps(hf_config(meta, has_output, quantized)))
        build_tokenizer(meta, building)
        try:
            os.replace(building, out)
        except OSError:  # another process converted it first
            shutil.rmtree(building, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out
