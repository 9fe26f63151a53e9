"""What every reranker decides the same way: which pairs are too long and how they are cut,
and how pairs are grouped into forward passes within a token budget.

A reranker scores (query, document) pairs: a cross-encoder (an HF ``*ForSequenceClassification``
folder on MLX, ``mlx/embeddings.py``; a GGUF with rank pooling on llama.cpp, ``llamacpp/embed.py``)
reads both texts in one sequence and its classification head gives one logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError

RERANK_TOKEN_BUDGET = 8192
"""Tokens per forward pass (padding included): many short pairs share a pass, while one
request of 10,000 documents still runs in bounded memory."""
MAX_PADDING_SHARE = 0.1
"""At most this share of a padded pass's tokens may be padding: a longer pair starts a new pass
instead. Padding is computed like real tokens, and the token budget alone let 10 pairs of 20
tokens share a pass with 5 of 400, padding 4,400 tokens for 2,200 real ones. Pairs of similar
length (the bench's 17-20 tokens: 8.8 % padding in one pass) still share one."""
CUT_ATTEMPTS = 3
"""Re-tokenizing a cut document may move its boundary by a token; cut again at most so."""


def reranker_only(model_name: str) -> UnsupportedFeatureError:
    """What a cross-encoder answers to embedding, chat and generate requests: its head makes
    one score per pair, neither a vector nor text."""
    return UnsupportedFeatureError(
        f"{model_name} is a reranker: it only scores (query, document) pairs; use /v1/rerank"
    )


def refuse_rerank(model_name: str) -> UnsupportedFeatureError:
    """What a model without a reranking head or template answers to ``/v1/rerank``."""
    return UnsupportedFeatureError(
        f"{model_name} cannot rerank: it is not a reranker (a cross-encoder or a GGUF with rank "
        "pooling)"
    )


def too_long(index: int, length: int, limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"document {index} makes a pair of {length} tokens with the query, more than this "
        f"model's limit of {limit}; shorten it or send truncate: true to cut it",
        param="documents",
        index=index,
    )


def fit_document(
    document: str,
    index: int,
    limit: int,
    truncate: bool,
    *,
    prompt: Callable[[str], list[int]],
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[list[int]], str],
) -> list[int]:
    """The prompt a causal reranker scores for ``document`` (``prompt`` makes it: a template
    filled in, or the chat path's own), its document cut from its end until the prompt fits in
    ``limit`` tokens, or refused with ``truncate`` off. Re-tokenizing may move the boundary by
    a token, hence the few attempts."""
    for _ in range(CUT_ATTEMPTS):
        tokens = prompt(document)
        if len(tokens) <= limit:
            return tokens
        if not truncate:
            raise too_long(index, len(tokens), limit)
        own = tokenize(document)
        room = len(own) - (len(tokens) - limit)
        if room < 1:
            raise InvalidRequestError(
                f"the query leaves no room for a document in this model's context of {limit} "
                "tokens",
                param="query",
            )
        document = detokenize(own[:room])
    raise too_long(index, len(tokens), limit)


def cut_pair(
    query: Sequence[int],
    document: Sequence[int],
    special: int,
    limit: int,
    truncate: bool,
    index: int,
) -> tuple[list[int], list[int]]:
    """``query`` and ``document`` (without specials) fitted into ``limit`` tokens with the
    ``special`` tokens the pair format adds: the document is cut from its end, as
    sentence-transformers' cross-encoders cut the longer text first; a query that leaves no
    room for any document token is refused."""
    length = len(query) + len(document) + special
    if length <= limit:
        return list(query), list(document)
    if not truncate:
        raise too_long(index, length, limit)
    room = limit - special - len(query)
    if room < 1:
        raise InvalidRequestError(
            f"the query has {len(query)} tokens, leaving no room for a document in this "
            f"model's limit of {limit}",
            param="query",
        )
    return list(query), list(document[:room])


def budget_batches(
    lengths: Sequence[int], budget: int = RERANK_TOKEN_BUDGET, *, padded: bool = True
) -> list[list[int]]:
    """Pair indices grouped into passes of at most ``budget`` tokens, similar lengths together;
    ``padded`` counts every row at the batch's longest (a padded MLX batch) rather than its
    own length (llama.cpp packs sequences unpadded), and keeps a pass's padding within
    ``MAX_PADDING_SHARE``. A pair longer than the budget runs alone. Callers put each score
    back at its pair's index."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = lengths[index]
        cost = length * (len(current) + 1) if padded else used + length
        padding = cost - used - length
        if current and (cost > budget or padding > MAX_PADDING_SHARE * cost):
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        batches.append(current)
    return batches
