"""What each KV cache type means to each runner, and what it costs per token.

``kv_cache_type`` (``modelstore.model.KV_CACHE_TYPES``) names the type the way Ollama does; this
module is the one place that translates a name into mlx-lm's quantized cache (``kv_bits`` and a
group size) or llama.cpp's ``type_k``/``type_v``, and that estimates the bytes a cache of that
type holds, for admission (``loading.require_memory``) and ``/api/ps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from modelstore.model import KV_CACHE_TYPES

MLX_GROUP_SIZES = (64, 32)
"""Group sizes ``mx.quantize`` accepts that a head may be split into, largest (cheapest) first."""
MLX_SCALE_AND_BIAS = 2
"""mlx-lm's quantized cache keeps a scale and a bias per group, in the activations' float type."""


@dataclass(frozen=True)
class KvCacheType:
    name: str
    mlx_bits: int | None
    """``kv_bits`` for mlx-lm; ``None``: the ordinary float cache."""
    ggml_type: int
    """llama.cpp's ``GGML_TYPE_*`` number, for ``type_k`` and ``type_v``."""
    ggml_bytes_per_value: float
    """llama.cpp's block layout: q8_0 packs 32 values in 34 bytes, q4_0 in 18."""

    @property
    def quantized(self) -> bool:
        return self.mlx_bits is not None


KV_CACHE = {
    "f16": KvCacheType("f16", None, 1, 2.0),
    "q8_0": KvCacheType("q8_0", 8, 8, 34 / 32),
    "q4_0": KvCacheType("q4_0", 4, 2, 18 / 32),
}
assert tuple(KV_CACHE) == KV_CACHE_TYPES


def kv_cache_type(name: str | None) -> KvCacheType:
    """The type called ``name`` (``None``: the default, ``f16``); an unknown name is the
    caller's mistake, reported with the names there are."""
    if name is None:
        return KV_CACHE["f16"]
    if name not in KV_CACHE:
        raise InvalidRequestError(
            f"unknown kv_cache_type {name!r}; use one of {', '.join(KV_CACHE_TYPES)}",
            param="kv_cache_type",
        )
    return KV_CACHE[name]


def mlx_group_size(cache: KvCacheType, head_dim: int) -> int:
    """The quantization group for a head of ``head_dim`` values: ``mx.quantize`` needs the
    head to split into whole groups of 32, 64 or 128."""
    for group in MLX_GROUP_SIZES:
        if head_dim % group == 0:
            return group
    raise UnsupportedFeatureError(
        f"kv_cache_type {cache.name} needs heads of a multiple of 32 values; "
        f"this model's have {head_dim}"
    )


def mlx_bytes_per_token(
    cache: KvCacheType, layers: int, kv_heads: int, head_dim: int, float_bytes: int
) -> int:
    """Keys and values of one token in mlx-lm's cache (``KVCache`` or ``QuantizedKVCache``)."""
    values = 2 * layers * kv_heads * head_dim
    if cache.mlx_bits is None:
        return values * float_bytes
    group = mlx_group_size(cache, head_dim)
    return int(values * (cache.mlx_bits / 8 + MLX_SCALE_AND_BIAS * float_bytes / group))


GGML_BLOCK = 32
"""q8_0 and q4_0 quantize blocks of 32 values; llama.cpp needs heads of whole blocks."""


def ggml_check(cache: KvCacheType, head_dim: int) -> None:
    """Refuse, with the reason, what llama.cpp would fail to build a context for."""
    if cache.quantized and head_dim % GGML_BLOCK:
        raise UnsupportedFeatureError(
            f"kv_cache_type {cache.name} needs heads of a multiple of {GGML_BLOCK} values; "
            f"this model's have {head_dim}"
        )


def ggml_bytes_per_token(cache: KvCacheType, layers: int, kv_width: int) -> int:
    """Keys and values of one token in llama.cpp's cache (``kv_width``: KV heads × head size)."""
    return int(2 * layers * kv_width * cache.ggml_bytes_per_value)
