"""The MLX embedding runner: sentence-transformers / BERT-family folders through
``mlx-embeddings``' model code (BERT, XLM-RoBERTa, ModernBERT, Qwen3, Gemma 3 text, ...).

Only the architecture classes are used (``mlx_embeddings.utils.load_model`` on the store's
folder): its ``load`` would reach for the hub, and its models pool by mean only, while a model
declares its own pooling and normalisation (``modules.json``, ``1_Pooling/config.json``), which
the store records at import (``modelstore/sources.py``) and ``pooling.pool`` applies. Tokenizing
is the HF tokenizer's own, with its truncation (it keeps ``[SEP]`` when it cuts).
An embedding model cannot generate: ``generate`` refuses with a 400.

A cross-encoder (an HF ``BertForSequenceClassification`` folder, recorded with ``rank``
pooling) runs here too: mlx-embeddings' BERT encoder and pooler under the folder's own
``bert.`` prefix, plus the classifier, loaded by ``mlx_embeddings.utils.load_model`` through
its ``get_model_classes`` hook. Pairs are tokenized by the HF tokenizer as a text pair (token
types included) and cut as sentence-transformers' ``CrossEncoder`` cuts them
(``truncation=True``: the longer text first).
"""

from __future__ import annotations

from typing import Any

from mlxserve.errors import InferenceError, UnsupportedFormatError
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    RerankRequest,
    RerankResult,
    RunnerOptions,
)
from mlxserve.runners.loading import context_length
from mlxserve.runners.mlx.common import MlxRunnerBase, backend_details, import_mlx
from mlxserve.runners.pooling import length_batches, over_limit, padded, pool
from mlxserve.runners.rerank import budget_batches, too_long
from mlxserve.runners.skeleton import EncoderRunnerBase
from modelstore.metadata import RANK_POOLING
from modelstore.model import LocalModel

CROSS_ENCODER_PREFIXES = {"bert": "bert", "xlm-roberta": "roberta", "modernbert": "model"}
"""Architectures whose ``*ForSequenceClassification`` folders run here, and the prefix their
encoder's weights carry in such a folder."""
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
"""transformers' activation names (``ACT2FN``) as ``mlx.nn.GELU``'s ``approx``: ``gelu`` is
the exact (erf) one. A ModernBERT folder asking for another activation is refused rather than
scored wrongly."""
SLIDING = "sliding_attention"


def modernbert_layer_types(config: dict[str, Any]) -> tuple[list[bool], float, float]:
    """Which ModernBERT layers use the sliding window, and the two RoPE bases, from either
    way a config says so: ``layer_types`` / ``rope_parameters`` (as transformers 5 saves it)
    or ``global_attn_every_n_layers`` / ``global_rope_theta`` / ``local_rope_theta`` (the
    Hub's original configs). mlx-embeddings reads only the second."""
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        sliding = [kind == SLIDING for kind in types]
    else:
        every = int(config.get("global_attn_every_n_layers", 3))
        sliding = [index % every != 0 for index in range(layers)]
    rope = config.get("rope_parameters") or {}
    full_theta = (rope.get("full_attention") or {}).get("rope_theta")
    local_theta = (rope.get(SLIDING) or {}).get("rope_theta")
    return (
        sliding,
        float(full_theta or config.get("global_rope_theta", 160_000.0)),
        float(local_theta or config.get("local_rope_theta", 10_000.0)),
    )


def modernbert_cross_encoder(config: dict[str, Any]) -> tuple[Any, Any, None, None]:
    """``ModernBertForSequenceClassification`` as transformers computes it, from
    mlx-embeddings' ModernBERT encoder and prediction head: pooled (``[CLS]`` or a masked
    mean, the config's ``classifier_pooling``), the head (dense, GELU, norm), then the one-label
    classifier, whose raw logit is the score. mlx-embeddings' own classification model cannot
    be used as is: it applies a sigmoid to a one-label logit, its GELUs are the tanh
    approximation where transformers' ``gelu`` is exact (scores then differ by ~5e-4), and its
    layer pattern and RoPE bases ignore the ``layer_types`` / ``rope_parameters`` a
    transformers-5 config holds; all three are set here."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_embeddings.models import modernbert as arch
    from mlx_embeddings.models.base import mean_pooling

    hidden_act = config.get("hidden_activation", "gelu")
    head_act = config.get("classifier_activation", "gelu")
    if not {hidden_act, head_act} <= GELU_APPROXIMATIONS.keys():
        raise ValueError(f"no ModernBERT cross-encoder with activations {hidden_act}, {head_act}")
    sliding, full_theta, local_theta = modernbert_layer_types(config)
    pooling = config.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"no ModernBERT classifier_pooling {pooling!r}")

    class ModernBertCrossEncoder(nn.Module):
        def __init__(self, args: Any) -> None:
            super().__init__()
            args.classifier_bias = bool(config.get("classifier_bias", False))
            self.model = arch.ModernBertModel(args)
            for layer, local in zip(self.model.layers, sliding, strict=True):
                window = args.local_attention // 2
                layer.attn.local_attention = (window, window) if local else (-1, -1)
                theta = local_theta if local else full_theta
                layer.attn.rotary_emb = nn.RoPE(dims=layer.attn.head_dim, base=theta)
                layer.mlp.act = nn.GELU(approx=GELU_APPROXIMATIONS[hidden_act])
            self.head = arch.ModernBertPredictionHead(args)
            self.head.act = nn.GELU(approx=GELU_APPROXIMATIONS[head_act])
            self.classifier = nn.Linear(args.hidden_size, 1)

        def __call__(self, input_ids: Any, token_type_ids: Any, attention_mask: Any) -> Any:
            mask = attention_mask.astype(mx.float32)
            hidden = self.model(input_ids, attention_mask=mask)["last_hidden_state"]
            pooled = hidden[:, 0] if pooling == "cls" else mean_pooling(hidden, mask)
            return self.classifier(self.head(pooled))[:, 0]

    return ModernBertCrossEncoder, arch.ModelArgs, None, None


def cross_encoder_classes(config: dict[str, Any]) -> tuple[Any, Any, None, None]:
    """``load_model``'s hook: the architecture's mlx-embeddings model under its folder prefix,
    with the classification head beside it, as the HF classes lay them out: BERT's classifier
    (``Linear(hidden, 1)``) over its pooler; RoBERTa's head (``dense``, tanh, ``out_proj``)
    over the first token's state, with no pooler; ModernBERT's in
    ``modernbert_cross_encoder``."""
    import importlib

    import mlx.core as mx
    import mlx.nn as nn

    model_type = config.get("model_type")
    if model_type not in CROSS_ENCODER_PREFIXES:
        raise ValueError(f"no cross-encoder for the {model_type!r} architecture")
    if model_type == "modernbert":
        return modernbert_cross_encoder(config)
    arch = importlib.import_module(f"mlx_embeddings.models.{model_type.replace('-', '_')}")
    prefix = CROSS_ENCODER_PREFIXES[model_type]
    pooled = model_type == "bert"

    class RobertaHead(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, hidden)
            self.out_proj = nn.Linear(hidden, 1)

        def __call__(self, first: Any) -> Any:
            return self.out_proj(mx.tanh(self.dense(first)))

    class CrossEncoder(nn.Module):
        def __init__(self, args: Any) -> None:
            super().__init__()
            if not pooled:
                args.add_pooling_layer = False
            setattr(self, prefix, arch.Model(args))
            hidden = args.hidden_size
            self.classifier = nn.Linear(hidden, 1) if pooled else RobertaHead(hidden)

        def __call__(self, input_ids: Any, token_type_ids: Any, attention_mask: Any) -> Any:
            encoder = getattr(self, prefix)
            output = encoder(
                input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            )
            if pooled:
                return self.classifier(output.pooler_output)[:, 0]
            return self.classifier(output.last_hidden_state[:, 0])[:, 0]

        def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
            return {key: value for key, value in weights.items() if "position_ids" not in key}

    return CrossEncoder, arch.ModelArgs, None, None


class MlxEmbeddingRunner(MlxRunnerBase, EncoderRunnerBase):
    """Sentence-transformers folders (and cross-encoders) on mlx-embeddings' model code."""

    name = "mlx-embeddings"

    def __init__(self) -> None:
        super().__init__()
        self._tokenizer: Any = None
        self._record: dict[str, Any] = {}
        self._limit = 0

    def _require(self) -> tuple[Any, Any]:
        return self._loaded(self._model), self._tokenizer

    @property
    def _ranks(self) -> bool:
        return self._record.get("pooling") == RANK_POOLING

    async def _load(self, model: LocalModel, options: RunnerOptions) -> dict[str, Any]:
        if model.format != "mlx" or model.embedding is None:
            raise UnsupportedFormatError(
                f"the {self.name} runner runs HF-folder embedding models; {model.name} is not one"
            )
        mx, embeddings_utils, transformers = import_mlx(
            self.name, "mlx_embeddings.utils", "transformers"
        )
        record = model.embedding
        ranks = record.get("pooling") == RANK_POOLING
        classes = {"get_model_classes": cross_encoder_classes} if ranks else {}

        def build() -> None:
            loaded = embeddings_utils.load_model(model.path, **classes)
            mx.eval(loaded.parameters())
            self._model = loaded
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(model.path))

        await self._build(model, build)
        self._record, self._model_name = record, model.name
        limit = context_length(model, options)
        self._limit = min(limit, record.get("max_tokens") or limit)
        details = {
            "pooling": record.get("pooling"),
            "normalize": record.get("normalize"),
            **backend_details(),
        }
        return {**self._measured(), "context_length": self._limit, "details": details}

    def _drop(self) -> None:
        self._model = self._tokenizer = None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require()[1].encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require()[1].decode(token_ids)

    async def _rank(self, request: RerankRequest) -> RerankResult:
        model, tokenizer = self._require()
        limit = self._limit

        def run() -> RerankResult:
            import mlx.core as mx

            queries = [request.query] * len(request.documents)
            encoded = tokenizer(queries, request.documents)
            ids = encoded["input_ids"]
            types = encoded.get("token_type_ids") or [[0] * len(t) for t in ids]
            over = [index for index, tokens in enumerate(ids) if len(tokens) > limit]
            if over and not request.truncate:
                raise too_long(over[0], len(ids[over[0]]), limit)
            if over:
                cut = tokenizer(
                    [request.query] * len(over),
                    [request.documents[i] for i in over],
                    truncation=True,
                    max_length=limit,
                )
                cut_types = cut.get("token_type_ids")
                for place, index in enumerate(over):
                    ids[index] = cut["input_ids"][place]
                    types[index] = cut_types[place] if cut_types else [0] * len(ids[index])
            scores = [0.0] * len(ids)
            pad = tokenizer.pad_token_id or 0
            for batch in budget_batches([len(t) for t in ids]):
                input_ids, mask = padded([ids[i] for i in batch], pad)
                token_types, _ = padded([types[i] for i in batch], 0)
                try:
                    logits = model(input_ids, token_types, mask)
                except (ValueError, RuntimeError) as exc:
                    raise InferenceError(f"mlx-embeddings failed: {exc}") from exc
                mx.eval(logits)
                for index, score in zip(batch, logits.tolist(), strict=True):
                    scores[index] = float(score)
            return RerankResult(scores, sum(len(t) for t in ids))

        return await self._engine.call(run)

    async def _embed(self, request: EmbedRequest) -> EmbedResult:
        model, tokenizer = self._require()
        mode = self._record.get("pooling", "mean")
        normalize = bool(self._record.get("normalize", True))

        def run() -> EmbedResult:
            import mlx.core as mx

            ids = tokenizer(request.inputs)["input_ids"]
            over = over_limit([len(t) for t in ids], self._limit, request.truncate)
            if over:
                cut = tokenizer(
                    [request.inputs[i] for i in over], truncation=True, max_length=self._limit
                )["input_ids"]
                for index, tokens in zip(over, cut, strict=True):
                    ids[index] = tokens
            vectors: list[list[float]] = [[] for _ in ids]
            pad = tokenizer.pad_token_id or 0
            for batch in length_batches([len(t) for t in ids]):
                input_ids, mask = padded([ids[i] for i in batch], pad)
                try:
                    hidden = model(input_ids, attention_mask=mask).last_hidden_state
                except (ValueError, RuntimeError) as exc:
                    raise InferenceError(f"mlx-embeddings failed: {exc}") from exc
                pooled = pool(hidden, mask, mode, normalize)
                mx.eval(pooled)
                for index, vector in zip(batch, pooled.tolist(), strict=True):
                    vectors[index] = vector
            return EmbedResult(vectors, sum(len(t) for t in ids))

        return await self._engine.call(run)
