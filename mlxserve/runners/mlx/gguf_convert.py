"""GGUF -> MLX: any GGUF of an architecture mlx-lm implements, in any quantization gguf-py reads.

The libraries do the parts they know: gguf-py reads the file, dequantizes every llama.cpp type
(``gguf.quants.dequantize``) and names tensors per architecture (``gguf.TensorNameMap``, which
is inverted here: llama.cpp's converter maps HF names to GGUF names, we need the way back);
mlx-lm says which parameters a model has (its ``Model`` built from the ``config.json`` written
here, never evaluated, so it costs no memory); transformers rebuilds the tokenizer from the GGUF
vocabulary. What no library does, and so is written here:

- ``config.json`` from the GGUF's metadata keys, per architecture (``ARCHITECTURES``);
- undoing what llama.cpp's converter did to some tensors: the Q/K row permutation of the llama
  family, the ``+1`` folded into Gemma's norm weights;
- streaming the result into one safetensors file a tensor at a time (``safetensors``' writer
  needs every tensor in memory at once), so the peak memory is about one tensor, not the model.

Off Metal the weights are written as float32 (MLX's quantized matmuls are slow on the CPU); on
Metal each quantized tensor is requantized to MLX's affine format at the nearest bit width
(``mlx_bits``). The result is an HF-style folder that ``mlx_lm.load`` opens, cached by the
GGUF's digest so the work is done once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxserve import platform
from mlxserve.errors import (
    OutOfMemoryError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)
from mlxserve.mlx_lm_private import model_classes
from modelstore.atomic import publish_folder
from modelstore.model import LocalModel
from modelstore.sources import gguf_adds_bos, open_gguf

ConvertProgress = Callable[[int], None]
"""Called with the number of GGUF bytes just converted."""

MLX_GROUP_SIZE = 64
"""mlx-lm's default quantization group: what ``mlx_lm.convert`` writes."""
SAFETENSORS_ALIGNMENT = 8
GEMMA_NORM_OFFSET = 1.0
"""llama.cpp's Gemma converters store ``1 + w`` for every norm; mlx-lm adds the 1 itself."""
DEQUANTIZE_CHUNK_BYTES = 16 << 20
"""Float32 output per dequantizing task: enough rows to keep threads busy, few enough to split."""
MEMORY_HEADROOM = 0.9
"""Refuse a conversion whose result needs more than this share of the machine's memory."""
SKIPPED_TENSORS = frozenset({"rope_freqs", "rope_factors_long", "rope_factors_short"})
"""Tensors llama.cpp precomputes from config values; mlx-lm derives them from ``config.json``."""


def _llama_extra(meta: GgufMeta) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False}


def _qwen3_moe_extra(meta: GgufMeta) -> dict[str, Any]:
    return {
        "num_experts": meta.get("expert_count"),
        "num_experts_per_tok": meta.get("expert_used_count"),
        "moe_intermediate_size": meta.get("expert_feed_forward_length"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def _gemma2_extra(meta: GgufMeta) -> dict[str, Any]:
    return {
        "query_pre_attn_scalar": meta.head_dim,
        "attn_logit_softcapping": meta.get("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": meta.get("final_logit_softcapping", 30.0),
        "sliding_window": meta.get("attention.sliding_window", 4096),
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _gemma3_extra(meta: GgufMeta) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "query_pre_attn_scalar": meta.head_dim,
        "sliding_window": meta.get("attention.sliding_window", 512),
        "rope_local_base_freq": 10000.0,
    }
    factor = meta.get("rope.scaling.factor")
    if factor:
        extra["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return extra


def _phi3_extra(meta: GgufMeta) -> dict[str, Any]:
    rotary = meta.get("rope.dimension_count", meta.head_dim)
    return {
        "partial_rotary_factor": rotary / meta.head_dim,
        "original_max_position_embeddings": meta.get(
            "rope.scaling.original_context_length", meta.get("context_length", 4096)
        ),
    }


@dataclass(frozen=True)
class Architecture:
    """What one GGUF architecture needs to become an mlx-lm model."""

    model_type: str
    hf_class: str
    permuted_qk: bool = False
    """llama.cpp's ``LlamaModel.permute`` reordered Q/K rows (the llama family only)."""
    norm_offset: float = 0.0
    extra: Callable[[GgufMeta], dict[str, Any]] = field(default=lambda meta: {})


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True, extra=_llama_extra),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", extra=_qwen3_moe_extra),
    "gemma2": Architecture(
        "gemma2", "Gemma2ForCausalLM", norm_offset=GEMMA_NORM_OFFSET, extra=_gemma2_extra
    ),
    "gemma3": Architecture(
        "gemma3_text", "Gemma3ForCausalLM", norm_offset=GEMMA_NORM_OFFSET, extra=_gemma3_extra
    ),
    "phi3": Architecture("phi3", "Phi3ForCausalLM", extra=_phi3_extra),
}
"""GGUF ``general.architecture`` -> mlx-lm. Mistral's GGUFs say ``llama``."""


class GgufMeta:
    """The GGUF's key/values as Python values, read lazily from gguf-py's reader."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path
        self.architecture = str(self.key("general.architecture") or "")

    def key(self, name: str, default: Any = None) -> Any:
        found = self.reader.fields.get(name)
        return default if found is None else found.contents()

    def get(self, name: str, default: Any = None) -> Any:
        """An architecture-scoped key: ``get("block_count")`` reads ``qwen3.block_count``."""
        return self.key(f"{self.architecture}.{name}", default)

    @property
    def heads(self) -> int:
        return int(self.get("attention.head_count"))

    @property
    def kv_heads(self) -> int:
        return int(self.get("attention.head_count_kv", self.heads))

    @property
    def adds_bos(self) -> bool:
        """Whether llama.cpp adds BOS to this GGUF's raw prompts (``sources.gguf_adds_bos``)."""
        add_bos, model = self.key("tokenizer.ggml.add_bos_token"), self.key("tokenizer.ggml.model")
        return gguf_adds_bos(add_bos, model)

    @property
    def head_dim(self) -> int:
        return int(self.get("attention.key_length", self.get("embedding_length") // self.heads))


def hf_config(meta: GgufMeta, arch: Architecture, tied: bool, vocab: int) -> dict[str, Any]:
    """``config.json`` for mlx-lm, from the keys llama.cpp's converter wrote."""
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "hidden_size": meta.get("embedding_length"),
        "num_hidden_layers": meta.get("block_count"),
        "intermediate_size": meta.get("feed_forward_length"),
        "num_attention_heads": meta.heads,
        "num_key_value_heads": meta.kv_heads,
        "head_dim": meta.head_dim,
        "rms_norm_eps": meta.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.get("rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get("context_length", 4096),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.key("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.key("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    config.update(arch.extra(meta))
    return config


LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""The constants every Llama 3.x release uses; only the factor (8 or 32) differs."""


def llama3_rope_factors(dims: int, base: float, factor: float) -> np.ndarray:
    """What ``convert_hf_to_gguf.py`` writes to ``rope_freqs`` for Llama 3 rope scaling."""
    low, high = LLAMA3_ROPE["low_freq_factor"], LLAMA3_ROPE["high_freq_factor"]
    old = LLAMA3_ROPE["original_max_position_embeddings"]
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    smooth = (old / wavelens - low) / (high - low)
    return np.where(
        wavelens < old / high,
        1.0,
        np.where(wavelens > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )


def rope_scaling_from_freqs(meta: GgufMeta, freqs: np.ndarray) -> dict[str, Any]:
    """llama.cpp keeps Llama 3's rope scaling only as the computed ``rope_freqs`` tensor; mlx-lm
    wants the parameters. Recover them, and refuse a tensor they do not reproduce."""
    dims = int(meta.get("rope.dimension_count", meta.head_dim))
    base = float(meta.get("rope.freq_base", 10000.0))
    factor = float(freqs.max())
    if not np.allclose(llama3_rope_factors(dims, base, factor), freqs, rtol=1e-3):
        raise UnsupportedArchitectureError(
            "this GGUF's rope_freqs tensor is not Llama 3 rope scaling; it cannot be "
            "expressed for mlx-lm (the model still runs on llama.cpp)"
        )
    return {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE}


def rope_scaling(meta: GgufMeta) -> dict[str, Any] | None:
    """Rope scaling llama.cpp stores as tensors: Llama 3's ``rope_freqs``, Phi-3's LongRoPE
    ``rope_factors_long``/``_short`` (mlx-lm's ``SuScaledRoPE`` takes them as they are)."""
    tensors = {t.name.removesuffix(".weight"): t for t in meta.reader.tensors}
    if "rope_freqs" in tensors:
        return rope_scaling_from_freqs(
            meta, _tensor_values(meta.path, tensors["rope_freqs"]).reshape(-1)
        )
    if "rope_factors_long" in tensors:
        long = _tensor_values(meta.path, tensors["rope_factors_long"]).reshape(-1)
        short = tensors.get("rope_factors_short")
        return {
            "type": "longrope",
            "long_factor": long.tolist(),
            "short_factor": (long if short is None else _tensor_values(meta.path, short))
            .reshape(-1)
            .tolist(),
        }
    return None


def unpermute_rows(array: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (it interleaves the two rotary halves)."""
    rows = array.shape[0]
    rest = array.shape[1:]
    return (
        array.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


MLX_BITS_BY_PREFIX = (
    (("F32", "F16", "BF16"), None),
    (("Q8",), 8),
    (("Q5", "Q6"), 6),
    (("Q3", "IQ3"), 3),
    (("Q2", "IQ2", "IQ1", "TQ"), 2),
)
"""GGUF type -> MLX affine bits (MLX has 2, 3, 4, 5, 6, 8; Q5 rounds up to 6 as its blocks
carry more scale bits); anything else, the 4-bit families and FP4, is 4."""


def mlx_bits(qtype: Any) -> int | None:
    """MLX affine bit width nearest a GGUF type; ``None`` keeps the tensor as floats."""
    for prefixes, bits in MLX_BITS_BY_PREFIX:
        if qtype.name.startswith(prefixes):
            return bits
    return 4


def dequantizable(qtype: Any) -> bool:
    """Whether gguf-py can dequantize ``qtype`` (asked of gguf-py itself, on one zero block)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    _, size = GGML_QUANT_SIZES.get(qtype, (0, 0))
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return size > 0


def check_quantizations(reader: Any) -> None:
    """Refuse up front a file with a tensor type gguf-py cannot dequantize."""
    for qtype in {tensor.tensor_type for tensor in reader.tensors}:
        if not dequantizable(qtype):
            raise UnsupportedQuantizationError(
                f"tensor type {qtype.name} cannot be dequantized for MLX (gguf-py has no "
                "dequantizer for it); the model still runs on llama.cpp",
                quantization=qtype.name,
            )


def mlx_converts(model: LocalModel) -> bool:
    """The MLX runner's ``accepts`` check (``registry.py``): a GGUF runs on MLX when it can
    be converted, and carries no GGUF LoRA (llama.cpp applies those; the converter does not)."""
    return model.adapter is None and mlx_can_convert(model.architecture, model.quantization)


def mlx_can_convert(architecture: str | None, file_type: str | None) -> bool:
    """What the store's metadata says about convertibility, without opening the file: the
    architecture, and the main tensor type of the file type (``Q4_K_M`` -> ``Q4_K``).
    A file mixing in an odd tensor type is still refused, when converted."""
    import gguf

    if architecture not in ARCHITECTURES:
        return False
    names = sorted((q.name for q in gguf.GGMLQuantizationType), key=len, reverse=True)
    main = next((n for n in names if file_type and file_type.startswith(n)), None)
    return main is None or dequantizable(gguf.GGMLQuantizationType[main])


def inverse_name_map(meta: GgufMeta, blocks: int) -> dict[str, list[str]]:
    """GGUF base name -> the HF names gguf-py maps to it, for this architecture."""
    import gguf

    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if meta.architecture not in by_name:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {meta.architecture!r} is unknown to gguf-py"
        )
    forward = gguf.get_tensor_name_map(by_name[meta.architecture], blocks)
    inverse: dict[str, list[str]] = {}
    for hf, (_, gguf_name) in forward.mapping.items():
        inverse.setdefault(gguf_name, []).append(hf)
    return inverse


def model_skeleton(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """mlx-lm's parameter names and shapes for ``config``, and its quantizable module paths.

    The model is built but never evaluated: MLX arrays are lazy, so this allocates nothing.
    """
    from mlx.utils import tree_flatten

    try:
        model_class, args_class = model_classes(config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError) as exc:
        raise UnsupportedArchitectureError(f"mlx-lm cannot build this model: {exc}") from exc
    shapes = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    quantizable = {
        path for path, module in model.named_modules() if hasattr(module, "to_quantized")
    }
    return shapes, quantizable


@dataclass
class PlannedTensor:
    """One GGUF tensor on its way to one (float) or three (quantized) output tensors."""

    path: Path
    source: Any
    name: str
    """The mlx-lm parameter name (``model.layers.0.self_attn.q_proj.weight``)."""
    shape: tuple[int, ...]
    bits: int | None
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def outputs(self, float_dtype: str) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype, shape) of what this tensor becomes."""
        if self.bits is None:
            yield self.name, float_dtype, self.shape
            return
        base = self.name.removesuffix(".weight")
        *lead, cols = self.shape
        yield self.name, "U32", (*lead, cols * self.bits // 32)
        for part in ("scales", "biases"):
            yield f"{base}.{part}", "F16", (*lead, cols // MLX_GROUP_SIZE)


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


def _match(base: str, inverse: dict[str, list[str]], params: dict[str, Any], suffix: str) -> str:
    for candidate in inverse.get(base, ()):
        for name in (candidate, candidate.replace(".experts.", ".switch_mlp.")):
            if f"{name}.{suffix}" in params:
                return f"{name}.{suffix}"
    raise UnsupportedArchitectureError(
        f"GGUF tensor {base}.{suffix} has no place in mlx-lm's model for this architecture"
    )


def plan_tensors(
    meta: GgufMeta, arch: Architecture, config: dict[str, Any], quantize: bool
) -> list[PlannedTensor]:
    """Match every GGUF tensor to an mlx-lm parameter (and check nothing is missing)."""
    shapes, quantizable = model_skeleton(config)
    inverse = inverse_name_map(meta, int(config["num_hidden_layers"]))
    planned: list[PlannedTensor] = []
    for tensor in meta.reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        if base in SKIPPED_TENSORS:
            continue
        name = _match(base, inverse, shapes, suffix)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        expected = shapes[name]
        if shape != expected:
            raise UnsupportedArchitectureError(
                f"GGUF tensor {tensor.name} has shape {shape}; mlx-lm expects {expected}"
            )
        transform = _transform(name, base, suffix, meta, arch)
        bits = mlx_bits(tensor.tensor_type) if quantize else None
        module = name.removesuffix(".weight")
        if bits is not None and (
            suffix != "weight" or module not in quantizable or shape[-1] % MLX_GROUP_SIZE
        ):
            bits = None
        planned.append(PlannedTensor(meta.path, tensor, name, shape, bits, transform))
    missing = set(shapes) - {p.name for p in planned}
    if config["tie_word_embeddings"]:
        missing.discard("lm_head.weight")  # the model's ``sanitize`` ties it on load
    if missing:
        raise UnsupportedArchitectureError(
            f"the GGUF lacks tensors mlx-lm needs: {', '.join(sorted(missing)[:5])}"
        )
    return planned


def _transform(
    name: str, base: str, suffix: str, meta: GgufMeta, arch: Architecture
) -> Callable[[np.ndarray], np.ndarray] | None:
    if arch.permuted_qk and base.endswith(".attn_q"):
        return lambda value: unpermute_rows(value, meta.heads)
    if arch.permuted_qk and base.endswith(".attn_k"):
        return lambda value: unpermute_rows(value, meta.kv_heads)
    if arch.norm_offset and base.endswith("norm") and suffix == "weight":
        return lambda value: value - arch.norm_offset
    return None


def _tensor_values(path: Path, tensor: Any) -> np.ndarray:
    """One tensor as float32, dequantized in row chunks on several threads (numpy releases
    the GIL; gguf-py's K-quant dequantizers are the slow part of a conversion).

    The bytes are read with ``np.fromfile`` rather than through gguf-py's memory map, so the
    GGUF's pages never count toward this process's resident memory: only this tensor does.
    """
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    layout = tensor.data  # a view of the map: its dtype and shape only, never its pages
    raw = np.fromfile(path, dtype=layout.dtype, count=layout.size, offset=tensor.data_offset)
    rows = raw.reshape(-1, layout.shape[-1])
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    step = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * shape[-1]))

    def chunk(start: int) -> None:
        out[start : start + step] = dequantize(rows[start : start + step], tensor.tensor_type)

    starts = range(0, rows.shape[0], step)
    if len(starts) == 1:
        chunk(0)
    else:
        with ThreadPoolExecutor(platform.default_threads()) as pool:
            list(pool.map(chunk, starts))
    return out.reshape(shape)


def _converted(planned: PlannedTensor, float_dtype: str) -> list[np.ndarray]:
    values = _tensor_values(planned.path, planned.source)
    if planned.transform is not None:
        values = planned.transform(values)
    if planned.bits is None:
        return [values.astype(np.float16 if float_dtype == "F16" else np.float32, copy=False)]
    import mlx.core as mx

    weight, scales, biases = mx.quantize(
        mx.array(values, dtype=mx.float16), group_size=MLX_GROUP_SIZE, bits=planned.bits
    )
    return [np.asarray(weight), np.asarray(scales), np.asarray(biases)]


def output_bytes(planned: list[PlannedTensor], float_dtype: str) -> int:
    return sum(
        DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        for p in planned
        for _, dtype, shape in p.outputs(float_dtype)
    )


def require_room(planned: list[PlannedTensor], float_dtype: str, folder: Path) -> int:
    """Refuse before writing anything when the result would not fit in memory or on disk."""
    needed = output_bytes(planned, float_dtype)
    memory = platform.total_memory_bytes()
    if memory and needed > memory * MEMORY_HEADROOM:
        raise OutOfMemoryError(
            f"converted to MLX this model needs {needed / 2**30:.1f} GiB; this machine has "
            f"{memory / 2**30:.1f} GiB (it still runs on llama.cpp: --runner llamacpp)",
            required_bytes=needed,
            total_bytes=memory,
        )
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutOfMemoryError(
            f"converting to MLX needs {needed / 2**30:.1f} GiB of disk in {folder}; "
            f"{free / 2**30:.1f} GiB is free",
            required_bytes=needed,
        )
    return needed


def write_safetensors(
    path: Path,
    planned: list[PlannedTensor],
    float_dtype: str,
    progress: ConvertProgress | None = None,
) -> None:
    """Write the header first (every shape is known), then one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for p in planned:
        for name, dtype, shape in p.outputs(float_dtype):
            size = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % SAFETENSORS_ALIGNMENT)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for p in planned:
            for array in _converted(p, float_dtype):
                handle.write(np.ascontiguousarray(array).tobytes())
            if progress:
                progress(int(p.source.n_bytes))


def build_tokenizer(reader: Any, meta: GgufMeta, folder: Path) -> None:
    """Save an HF fast tokenizer rebuilt from the GGUF vocabulary by transformers' own GGUF
    tokenizer builders (byte-level BPE, SentencePiece, Gemma's and Phi-3's variants).

    transformers' file-level entry (``gguf_file=``) needs torch to read the file, so its
    builder is called on the vocabulary gguf-py already read. Two gaps are filled here: the
    pre-tokenizers llama.cpp splits digits one by one for (SmolLM's, for one), and BOS in front
    of a raw prompt where the GGUF says llama.cpp adds it (the builders leave it out).
    """
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )

        renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import GGUF_TO_TRANSFORMERS_MAPPING
        from transformers.integrations.ggml import convert_gguf_tokenizer as convert

        renames = GGUF_TO_TRANSFORMERS_MAPPING["tokenizer"]

        def convert_gguf_tokenizer(architecture: str, values: dict[str, Any]) -> Any:
            return convert(architecture, values)

    values = {
        renamed: meta.key(f"tokenizer.{key}")
        for key, renamed in renames.items()
        if f"tokenizer.{key}" in reader.fields
    }
    try:
        backend, _ = convert_gguf_tokenizer(meta.architecture, values)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedArchitectureError(
            f"the GGUF tokenizer cannot be rebuilt for MLX: {exc}"
        ) from exc
    if meta.key("tokenizer.ggml.pre") in DIGIT_SPLITTING_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    tokens = values.get("tokens") or []

    def token_text(key: str) -> str | None:
        index = meta.key(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and int(index) < len(tokens) else None

    bos = token_text("bos_token_id")
    if bos is not None and meta.adds_bos and not _puts_bos_first(backend, bos):
        # llama.cpp adds BOS to a raw prompt as the GGUF says; the rebuilt tokenizer must too,
        # or raw completions differ between the runners (Gemma's without ``<bos>``).
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 $B:1",
            special_tokens=[(bos, int(meta.key("tokenizer.ggml.bos_token_id")))],
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_text("bos_token_id"),
        eos_token=token_text("eos_token_id"),
        unk_token=token_text("unknown_token_id"),
        pad_token=token_text("padding_token_id"),
        clean_up_tokenization_spaces=False,
    )
    template = meta.key("tokenizer.chat_template")
    if template:
        wrapped.chat_template = template
    wrapped.save_pretrained(str(folder))


def _puts_bos_first(backend: Any, bos: str) -> bool:
    encoded = backend.encode("a", add_special_tokens=True)
    return bool(encoded.tokens) and encoded.tokens[0] == bos


DIGIT_SPLITTING_PRE_TOKENIZERS = frozenset({"smollm", "codeshell", "exaone", "minerva"})
"""llama.cpp pre-tokenizers that split every digit before GPT-2's regex."""


def open_convertible(gguf_path: Path) -> tuple[Any, GgufMeta, Architecture]:
    """Open the GGUF the one way every GGUF is opened (``modelstore.sources.open_gguf``: the
    bounded header walk, then gguf-py) and refuse what cannot become an mlx-lm model, before
    any work."""
    reader = open_gguf(gguf_path, unreadable=UnsupportedArchitectureError)
    meta = GgufMeta(reader, gguf_path)
    arch = ARCHITECTURES.get(meta.architecture)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {meta.architecture!r} cannot be converted to MLX (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}); the model still runs on llama.cpp",
            architecture=meta.architecture,
        )
    check_quantizations(reader)
    return reader, meta, arch


def plan_conversion(
    gguf_path: Path, *, dequantize: bool
) -> tuple[Any, GgufMeta, dict[str, Any], list[PlannedTensor]]:
    """The conversion's plan, from the header alone: the mlx-lm config and every tensor
    matched to its parameter and shape (a trial load stops here: no tensor is read)."""
    reader, meta, arch = open_convertible(gguf_path)
    names = {tensor.name for tensor in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name} has no tokenizer vocabulary to rebuild for MLX"
        )
    vocab = len(tokens.data)
    config = hf_config(meta, arch, tied="output.weight" not in names, vocab=vocab)
    scaling = rope_scaling(meta)
    if scaling:
        config["rope_scaling"] = scaling
    planned = plan_tensors(meta, arch, config, quantize=not dequantize)
    return reader, meta, config, planned


def convert_gguf(
    gguf_path: Path,
    out: Path,
    *,
    dequantize: bool,
    progress: ConvertProgress | None = None,
) -> Path:
    """Write an MLX model folder for ``gguf_path`` at ``out`` (atomically) and return it."""
    if (out / "config.json").is_file():
        return out
    reader, meta, config, planned = plan_conversion(gguf_path, dequantize=dequantize)
    float_dtype = "F32" if dequantize else "F16"
    out.parent.mkdir(parents=True, exist_ok=True)
    require_room(planned, float_dtype, out.parent)
    layout = {p.name.removesuffix(".weight"): p.bits for p in planned if p.bits}
    if layout:
        common = max(set(layout.values()), key=list(layout.values()).count)
        quantization: dict[str, Any] = {"group_size": MLX_GROUP_SIZE, "bits": common}
        for module, bits in layout.items():
            if bits != common:
                quantization[module] = {"group_size": MLX_GROUP_SIZE, "bits": bits}
        config["quantization"] = quantization
    if float_dtype == "F16":
        config["torch_dtype"] = "float16"
    building = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        write_safetensors(building / "model.safetensors", planned, float_dtype, progress)
        (building / "config.json").write_text(json.dumps(config, indent=1))
        build_tokenizer(reader, meta, building)
        publish_folder(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def conversion_size(gguf_path: Path) -> int:
    """The GGUF bytes a conversion reads: the total for a progress bar."""
    reader, _, _ = open_convertible(gguf_path)
    return sum(int(tensor.n_bytes) for tensor in reader.tensors)
