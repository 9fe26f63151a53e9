"""What the store hands to whoever runs a model: files under their source names, plus metadata.

A runner never reads blobs by digest: the store materialises a model as a folder of hard links
(or symlinks) named as in the source (``config.json``, ``model.safetensors``, ``x.gguf``) so that
``mlx_lm.load`` and ``llama_cpp.Llama`` open it as they would any local model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelstore.parameters import SPEC_PARAMETERS, api_names

ModelFormat = Literal["mlx", "gguf"]

GENERATION_PARAMETERS = SPEC_PARAMETERS
"""Default generation parameters a ModelSpec may set; a request overrides each."""

RUNNER_PARAMETERS = (
    "context_length",
    "n_gpu_layers",
    "n_threads",
    "max_parallel",
    "kv_cache_type",
    "num_draft_tokens",
)
"""Load-time parameters a ModelSpec may set (``RunnerOptions``)."""

OLLAMA_LOAD_NAMES = {
    "num_ctx": "context_length",
    "num_gpu": "n_gpu_layers",
    "num_thread": "n_threads",
}
OLLAMA_PARAMETER_NAMES = {
    **{wire: name for wire, (name, _) in api_names("ollama").items() if wire != name},
    **OLLAMA_LOAD_NAMES,
}
"""Ollama's names (Modelfile ``PARAMETER``, ``/api/create`` ``parameters``) for ModelSpec
parameters whose names differ (``num_predict``, ``repeat_penalty``, ``num_ctx``...): sampling
ones from ``parameters.Sampling``, load-time ones here."""
MODELSPEC_TO_OLLAMA = {spec: ollama for ollama, spec in OLLAMA_PARAMETER_NAMES.items()}

KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
"""What the KV cache may hold, in Ollama's names (``OLLAMA_KV_CACHE_TYPE``); ``f16`` means the
model's own float type, unquantized."""


@dataclass
class LocalModel:
    """A stored model, verified and materialised for a runner.

    ``path`` is the folder (HF layout for MLX models); ``weights`` lists the weight files in it
    (the single ``.gguf`` for GGUF models). ``chat_template`` is the ModelSpec's override, or
    ``None`` to use the tokenizer's own.
    """

    name: str
    manifest_digest: str
    path: Path
    format: ModelFormat
    weights: list[Path]
    architecture: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    """What the model was trained for; runners default to at most this."""
    model_info: dict[str, Any] = field(default_factory=dict)
    """Ollama's ``model_info`` kept at import: layer and head counts size the KV cache."""
    parameters: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    system: str | None = None
    license: str | None = None
    description: str | None = None
    size_bytes: int = 0
    blob_digests: list[str] = field(default_factory=list)
    derived_dir: Path | None = None
    """Where runners may cache what they derive from this model (a GGUF converted to MLX)."""
    embedding: dict[str, Any] | None = None
    """The store's record of an embedding model (``ModelConfig.embedding``); ``None`` for a
    generative model."""
    vision: dict[str, Any] | None = None
    """The store's record of a vision-language model (``ModelConfig.vision``)."""
    projector: Path | None = None
    """A GGUF vision model's multimodal projector (``mmproj``), which libmtmd loads."""
    draft: LocalModel | None = None
    """The ModelSpec's draft model for speculative decoding (same tokenizer), if any."""
    adapter: Path | None = None
    """The LoRA adapter, if any (``adapters.py``): for an MLX model a folder as mlx-lm reads
    it, for a GGUF model the GGUF LoRA file llama.cpp applies."""
