"""Quantize on create: a model's float weights become new, quantized weight layers.

Both formats use their own library's quantizer, never ours: MLX models go through mlx-lm's
``quantize_model`` (affine 4/6/8-bit, or one of its mixed recipes), GGUF models through
llama.cpp's ``llama_model_quantize`` (as ``llama-quantize`` does). Every other layer (tokenizer,
template, parameters) is kept as it was, and the config records the recipe and the digests of
the weights it started from; both quantizers are deterministic, so the same spec and recipe
give the same manifest digest every time. The heavy libraries are imported only here, and only
when a model is quantized.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelstore import mediatypes
from modelstore.blobs import hash_file
from modelstore.draft import LayerSource, ModelDraft
from modelstore.errors import QuantizeError

MLX_BITS = {"Q4": 4, "Q6": 6, "Q8": 8}
"""MLX affine recipes: bits per weight, in groups of ``MLX_GROUP_SIZE``."""
MLX_MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
"""mlx-lm's mixed recipes (``mlx_lm.convert --quant-predicate``)."""
MLX_GROUP_SIZE = 64
GGUF_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
"""llama.cpp file types we offer, named as ``llama-quantize`` and Ollama name them."""
FLOAT_QUANTIZATIONS = frozenset({None, "F32", "ALL_F32", "F16", "BF16"})
"""What a source may be: re-quantizing quantized weights compounds the error, so we refuse."""
MEMORY_HEADROOM = 1.5
"""MLX holds the float weights and the quantized ones at once while it quantizes."""

REWRITTEN_TYPES = {
    mediatypes.WEIGHTS_SAFETENSORS,
    mediatypes.WEIGHTS_INDEX,
    mediatypes.HF_CONFIG,
    mediatypes.WEIGHTS_GGUF,
}
"""The layers a quantized model replaces (``config.json`` says how the weights are quantized)."""


def recipe_name(draft: ModelDraft, requested: str) -> str:
    """``requested`` in its canonical spelling for this model's format, or a clear refusal."""
    if draft.config.format == "gguf":
        known = {name.lower(): name for name in GGUF_TYPES}
    else:
        known = {name.lower(): name for name in (*MLX_BITS, *MLX_MIXED)}
    name = known.get(requested.strip().lower())
    if name is None:
        raise QuantizeError(
            f"cannot quantize a {draft.config.format} model to {requested!r}; "
            f"choose one of {', '.join(known.values())}"
        )
    return name


def _weights(draft: ModelDraft) -> list[LayerSource]:
    return [layer for layer in draft.layers if layer.media_type in REWRITTEN_TYPES and layer.path]


def _refuse_unless_it_fits(draft: ModelDraft, work: Path) -> None:
    """Up front, not after minutes of work: a float source, the disk for the output (at most
    the source's size), and for MLX the memory to hold both."""
    if draft.config.quantization not in FLOAT_QUANTIZATIONS:
        raise QuantizeError(
            f"the source is already quantized ({draft.config.quantization}); "
            "quantize from float weights"
        )
    needed = sum(layer.path.stat().st_size for layer in _weights(draft) if layer.path)
    free = shutil.disk_usage(work).free
    if needed > free:
        raise QuantizeError(
            f"quantizing needs up to {needed / 1e9:.1f} GB of disk; {free / 1e9:.1f} GB is free"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if draft.config.format == "mlx" and needed * MEMORY_HEADROOM > memory:
        raise QuantizeError(
            f"quantizing needs about {needed * MEMORY_HEADROOM / 1e9:.1f} GB of memory; "
            f"this machine has {memory / 1e9:.1f} GB"
        )


def rewrite_mlx_weights(
    draft: ModelDraft,
    work: Path,
    transform: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]],
    adapter: Path | None = None,
) -> list[LayerSource]:
    """New weight layers for an MLX ``draft``: mlx-lm loads it (with ``adapter`` applied, if
    given), ``transform`` changes the model and its ``config.json``, mlx-lm saves the result.
    Quantizing and fusing an adapter both work this way."""
    import mlx.core as mx
    from mlx_lm.utils import load, save_config, save_model

    source = work / "source"
    source.mkdir(parents=True)
    for layer in draft.layers:
        if layer.path:
            (source / layer.title).symlink_to(layer.path.resolve())
    adapter_path = str(adapter) if adapter else None
    model, _, config = load(str(source), adapter_path=adapter_path, lazy=True, return_config=True)
    model, config = transform(model, config)
    out = work / "rewritten"
    save_model(out, model, donate_model=True)
    save_config(config, config_path=out / "config.json")
    mx.clear_cache()
    return [
        LayerSource(_kind_of(path.name), path.name, path=path) for path in sorted(out.iterdir())
    ]


def _quantize_mlx(draft: ModelDraft, recipe: str, work: Path) -> list[LayerSource]:
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    def quantize(model: Any, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        bits = MLX_BITS.get(recipe)
        predicate = None
        if bits is None:
            predicate = mixed_quant_predicate_builder(recipe, model, MLX_GROUP_SIZE)
        return quantize_model(model, config, MLX_GROUP_SIZE, bits, quant_predicate=predicate)

    return rewrite_mlx_weights(draft, work, quantize)


def _kind_of(name: str) -> str:
    """The media type of a file ``save_model`` / ``save_config`` wrote."""
    if name == "config.json":
        return mediatypes.HF_CONFIG
    if name.endswith(".index.json"):
        return mediatypes.WEIGHTS_INDEX
    return mediatypes.WEIGHTS_SAFETENSORS


def _quantize_gguf(draft: ModelDraft, recipe: str, work: Path) -> list[LayerSource]:
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    (weights,) = [layer for layer in draft.layers if layer.media_type == mediatypes.WEIGHTS_GGUF]
    assert weights.path is not None
    title = f"{Path(weights.title).stem.split('.')[0]}.{recipe}.gguf"
    out = work / title
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{recipe}")
    _logger.set_verbose(False)  # llama.cpp logs every tensor; the CLI shows its own progress
    failed = llama_cpp.llama_model_quantize(
        str(weights.path).encode(), str(out).encode(), ctypes.byref(params)
    )
    if failed:
        raise QuantizeError(f"llama.cpp could not quantize {weights.title} to {recipe}")
    return [LayerSource(mediatypes.WEIGHTS_GGUF, title, path=out)]


def quantize_draft(draft: ModelDraft, requested: str, work: Path) -> ModelDraft:
    """``draft`` with quantized weights (written under ``work``, which the caller removes once
    the model is committed)."""
    recipe = recipe_name(draft, requested)
    work.mkdir(parents=True, exist_ok=True)
    _refuse_unless_it_fits(draft, work)
    sources = sorted(
        hash_file(layer.path)[0]
        for layer in _weights(draft)
        if layer.path and layer.media_type in mediatypes.WEIGHT_TYPES
    )
    if draft.config.format == "gguf":
        new = _quantize_gguf(draft, recipe, work)
    else:
        new = _quantize_mlx(draft, recipe, work)
    layers = [layer for layer in draft.layers if layer.media_type not in REWRITTEN_TYPES]
    config = dataclasses.replace(
        draft.config,
        quantization=recipe,
        source={
            **draft.config.source,
            "quantized_from": ",".join(sources),
            "quantize_recipe": recipe,
        },
    )
    return ModelDraft(config, new + layers)
