"""What every embedding runner decides the same way: which inputs are too long, how inputs are
grouped into padded batches, and how token states become one vector (MLX runners)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError

EMBED_BATCH_SIZE = 32
"""Inputs per forward pass: large enough to amortise the call, small enough that one long
input does not make 31 short ones pad to its length for long."""


def refuse_generation(model_name: str) -> UnsupportedFeatureError:
    """The one error an embedding-only model answers to chat and generate requests."""
    return UnsupportedFeatureError(
        f"{model_name} is an embedding model: it does not generate text; "
        "use /api/embed or /v1/embeddings"
    )


def over_limit(lengths: Sequence[int], limit: int, truncate: bool) -> list[int]:
    """Indices of the inputs longer than ``limit`` tokens, which the runner then cuts; with
    ``truncate`` off, the first one is refused instead (Ollama's ``truncate: false``). An input
    with no tokens at all (an empty text, for a tokenizer that adds none) has nothing to pool
    and is refused too."""
    if 0 in lengths:
        index = list(lengths).index(0)
        raise InvalidRequestError(
            f"input {index} has no tokens to embed", param="input", index=index
        )
    over = [index for index, length in enumerate(lengths) if length > limit]
    if over and not truncate:
        index = over[0]
        raise InvalidRequestError(
            f"input {index} has {lengths[index]} tokens, more than this model's limit of "
            f"{limit}; shorten it or send truncate: true to cut it",
            param="input",
            index=index,
        )
    return over


def length_batches(lengths: Sequence[int], size: int = EMBED_BATCH_SIZE) -> list[list[int]]:
    """Input indices grouped for padded batches, similar lengths together so little padding
    is computed; callers put each vector back at its input's index."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [order[start : start + size] for start in range(0, len(order), size)]


def padded(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """Right-padded ``input_ids`` and the 0/1 ``attention_mask`` for one batch, as MLX arrays.

    Right padding also suits a causal decoder: a real token never attends to the pads after it,
    so its state is the same as unpadded."""
    import mlx.core as mx

    width = max(len(tokens) for tokens in token_lists)
    ids = [list(tokens) + [pad_id] * (width - len(tokens)) for tokens in token_lists]
    mask = [[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in token_lists]
    return mx.array(ids), mx.array(mask)


def pool(hidden: Any, mask: Any, mode: str, normalize: bool) -> Any:
    """One vector per row of ``hidden`` (batch, tokens, dims) over its unmasked tokens, as
    sentence-transformers' ``Pooling`` module computes it; then L2-normalised if asked.
    mlx-embeddings' models pool by mean only, so the modes models declare live here."""
    import mlx.core as mx

    weights = mask[..., None].astype(hidden.dtype)
    counts = mx.maximum(weights.sum(axis=1), 1.0)
    if mode == "mean":
        vectors = (hidden * weights).sum(axis=1) / counts
    elif mode == "mean_sqrt_len":
        vectors = (hidden * weights).sum(axis=1) / mx.sqrt(counts)
    elif mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = mx.where(weights > 0, hidden, mx.array(-mx.inf, hidden.dtype)).max(axis=1)
    elif mode == "last":
        last = mask.sum(axis=1).astype(mx.int32) - 1
        vectors = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    else:
        raise UnsupportedFeatureError(f"pooling mode {mode!r} is not supported")
    vectors = vectors.astype(mx.float32)
    if normalize:
        norms = mx.linalg.norm(vectors, axis=-1, keepdims=True)
        vectors = vectors / mx.maximum(norms, 1e-12)
    return vectors
