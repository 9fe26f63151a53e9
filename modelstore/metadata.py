"""What a model is, read once at import and kept in its config: Ollama's ``model_info``, the
capabilities its vocabulary implies (thinking, fill-in-the-middle), and the chat template to
use when the model ships none (``modelstore.templates``).

``/api/show`` used to re-parse a GGUF's metadata on every call (about 10 s for a model with a
262k vocabulary); everything it needs is now in the config blob, written once by ``sources``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from modelstore import mediatypes
from modelstore.draft import TEMPLATE_TITLE, ModelDraft
from modelstore.templates import MARKER_TOKENS, UNKNOWN_SOURCE, infer_template

THINK_TOKENS: Final = ("<think>", "</think>")
FIM_TOKEN_SETS: Final = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ("[PREFIX]", "[SUFFIX]", "[MIDDLE]"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
)
"""Qwen2.5-Coder, StarCoder/SmolLM, DeepSeek-Coder, Codestral and Code Llama spell them so."""
INTERESTING_TOKENS: Final = frozenset(
    {*MARKER_TOKENS, *THINK_TOKENS, *(token for tokens in FIM_TOKEN_SETS for token in tokens)}
)
"""The only tokens an import looks for in a vocabulary (a set lookup per token)."""
EMBEDDING_ARCHITECTURES: Final = frozenset(
    {"bert", "nomic-bert", "nomic_bert", "jina-bert-v2", "xlm-roberta", "modernbert", "new", "gte"}
)
CROSS_ENCODER_ARCHITECTURES: Final = frozenset({"bert", "xlm-roberta", "modernbert"})
"""HF ``model_type``s whose ``*ForSequenceClassification`` folders are stored as rerankers."""
RANK_POOLING: Final = "rank"
"""The pooling name of a reranker (a cross-encoder's classification head, llama.cpp's
``LLAMA_POOLING_TYPE_RANK``): one relevance score per (query, document) pair, not a vector."""
RANKING_PIPELINE_TAG: Final = "text-ranking"
"""An HF model card's ``pipeline_tag`` for rerankers: on a causal model it marks an LLM
reranker of the Qwen3-Reranker kind (a yes/no question through its template)."""
MATRYOSHKA_WORD: Final = "matryoshka"
RERANKER_NAME_WORD: Final = "reranker"
"""What a GGUF of such a model says in its name (``general.name`` / ``general.basename``,
written from the model card by ``convert_hf_to_gguf.py``)."""
HF_MODEL_INFO: Final = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
    "rope.freq_base": "rope_theta",
}
"""Ollama's ``<arch>.*`` model_info keys and the ``config.json`` keys that hold them."""
MAX_LIST_IN_INFO: Final = 1024
"""model_info keeps short lists (per-layer head counts) and drops vocab-sized ones."""


def card_pipeline_tag(card: str) -> str | None:
    """The ``pipeline_tag`` of an HF model card's YAML front matter (``README.md``)."""
    if not card.startswith("---"):
        return None
    front, _, _ = card[3:].partition("\n---")
    for line in front.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "pipeline_tag":
            return value.strip().strip("'\"") or None
    return None


def card_allows_matryoshka(card: str) -> bool:
    """Whether an embedding model's card says it was trained to be shortened (Matryoshka
    representation learning: the ``matryoshka`` tag, or sentence-transformers'
    ``MatryoshkaLoss`` in its training details)."""
    return MATRYOSHKA_WORD in card.lower()


def gguf_names_a_reranker(values: dict[str, Any]) -> bool:
    names = (values.get("general.name"), values.get("general.basename"))
    return any(isinstance(n, str) and RERANKER_NAME_WORD in n.lower() for n in names)


def interesting_tokens(tokens: Iterable[str]) -> set[str]:
    return {token for token in tokens if token in INTERESTING_TOKENS}


def fim_tokens(present: set[str]) -> dict[str, str]:
    for prefix, suffix, middle in FIM_TOKEN_SETS:
        if {prefix, suffix, middle} <= present:
            return {"prefix": prefix, "suffix": suffix, "middle": middle}
    return {}


def features(
    present: set[str],
    *,
    embedding: bool,
    vision: bool,
    fim: dict[str, str],
    rerank: bool = False,
) -> list[str]:
    """Ollama's capabilities beyond ``completion``; a reranker (an embedding record with rank
    pooling) is listed as ``rerank``, not ``embedding``: it makes scores, not vectors. A model
    that only embeds or scores does not generate, so think or FIM tokens in its vocabulary
    (Qwen3-Embedding's, Qwen3-Reranker's) make it neither ``thinking`` nor ``insert``."""
    found = []
    if set(THINK_TOKENS) <= present and not embedding:
        found.append("thinking")
    if fim and not embedding:
        found.append("insert")
    if rerank:
        found.append("rerank")
    elif embedding:
        found.append("embedding")
    if vision:
        found.append("vision")
    return found


def hf_model_info(hf_config: dict[str, Any], parameter_count: int | None) -> dict[str, Any]:
    """Ollama's model_info keys from an HF ``config.json`` (text config for multimodal ones)."""
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    arch = hf_config.get("model_type") or "unknown"
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": parameter_count,
    }
    for key, source in HF_MODEL_INFO.items():
        value = hf_config.get(source, text.get(source))
        if isinstance(value, int | float) and not isinstance(value, bool):
            info[f"{arch}.{key}"] = value
    if f"{arch}.attention.head_count_kv" not in info and f"{arch}.attention.head_count" in info:
        info[f"{arch}.attention.head_count_kv"] = info[f"{arch}.attention.head_count"]
    return {k: v for k, v in info.items() if v is not None}


def json_value(value: Any) -> Any:
    """A GGUF field value as plain JSON (numpy scalars and short lists); ``None`` to drop it."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, list):
        if len(value) > MAX_LIST_IN_INFO:
            return None
        return [json_value(item) for item in value]
    if isinstance(value, str | int | float | bool):
        return value
    return None


def gguf_model_info(
    values: dict[str, Any], vocab_size: int | None, parameter_count: int | None
) -> dict[str, Any]:
    """The GGUF's own scalar keys (``general.*``, ``<arch>.*``, tokenizer scalars), as Ollama
    shows them, plus the parameter count and vocabulary size it computes."""
    arch = values.get("general.architecture") or "unknown"
    info: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith(("general.", f"{arch}.", "tokenizer.ggml.")) and key != (
            "tokenizer.chat_template"
        ):
            converted = json_value(value)
            if converted is not None:
                info[key] = converted
    info["general.architecture"] = arch
    if parameter_count:
        info["general.parameter_count"] = parameter_count
    if vocab_size and f"{arch}.vocab_size" not in info:
        info[f"{arch}.vocab_size"] = vocab_size
    return info


def apply_template_inference(
    draft: ModelDraft,
    own_template: str | None,
    present: set[str],
    adds_bos: bool,
) -> None:
    """A model without a template gets the inferred one as its template layer (marked so in
    its config), or is marked as having none (``UNKNOWN_SOURCE``)."""
    if own_template:
        return
    inferred = infer_template(draft.config.architecture, present, adds_bos)
    if inferred is None:
        draft.config.template_source = UNKNOWN_SOURCE
        return
    draft.replace_layer(mediatypes.CHAT_TEMPLATE, TEMPLATE_TITLE, inferred.template.encode())
    draft.config.template_source = inferred.source
