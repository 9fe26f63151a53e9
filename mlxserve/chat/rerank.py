"""LLM rerankers of the Qwen3-Reranker kind: a causal model asked, through its own chat
template (thinking off), whether a document meets a query; the score is the probability of
"yes" against "no" at the first answer token, as the model's card computes it
(``softmax([logit_no, logit_yes])[1]``).

The prompts are made here, each through ``prepare`` as a chat request would be (so the
template, its thinking switch and the context check are the chat path's own); the runner then
scores them several per forward pass within a token budget (``score``: the MLX runner in
right-padded batches, the llama.cpp runner packed into one decode over its twin context) and
reads only the two answer tokens' logits at each prompt's end.
"""

from __future__ import annotations

import asyncio

from mlxserve.chat.core import prepare
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest, Message
from mlxserve.errors import UnsupportedFeatureError
from mlxserve.runners.base import RerankRequest, RerankResult, ScoreRequest
from mlxserve.runners.rerank import fit_document

JUDGE_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
"""Qwen3-Reranker's instruction when the caller gives none."""
ANSWERS = ("yes", "no")


def pair_text(query: str, document: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def answer_ids(loaded: LoadedModel) -> tuple[int, int]:
    ids = [loaded.runner.tokenize(word, add_special_tokens=False) for word in ANSWERS]
    if any(len(found) != 1 for found in ids):
        raise UnsupportedFeatureError(
            f"{loaded.model.name} cannot rerank: 'yes' and 'no' are not single tokens in its "
            "vocabulary"
        )
    return ids[0][0], ids[1][0]


def judged(loaded: LoadedModel, query: str, document: str) -> ChatRequest:
    return ChatRequest(
        loaded.model.name,
        messages=[Message("system", JUDGE_SYSTEM), Message("user", pair_text(query, document))],
        think=False if loaded.family.thinks else None,
    )


def fitted(loaded: LoadedModel, request: RerankRequest, index: int, limit: int) -> list[int]:
    """The pair's prompt tokens, through the chat path's ``prepare``, its document cut from its
    end so that the prompt fits the context (or refused with ``truncate`` off)."""

    def prompt(document: str) -> list[int]:
        tokens = prepare(loaded, judged(loaded, request.query, document)).request.prompt_tokens
        assert tokens is not None
        return tokens

    return fit_document(
        request.documents[index],
        index,
        limit,
        request.truncate,
        prompt=prompt,
        tokenize=lambda text: loaded.runner.tokenize(text, add_special_tokens=False),
        detokenize=loaded.runner.detokenize,
    )


async def causal_rerank(loaded: LoadedModel, request: RerankRequest) -> RerankResult:
    score = getattr(loaded.runner, "score", None)
    if score is None:
        raise UnsupportedFeatureError(
            f"{loaded.model.name} cannot rerank on the {loaded.info.runner} runner"
        )
    answers = await asyncio.to_thread(answer_ids, loaded)
    limit = loaded.info.context_length

    def prompts() -> list[list[int]]:
        return [fitted(loaded, request, index, limit) for index in range(len(request.documents))]

    return await score(ScoreRequest(await asyncio.to_thread(prompts), answers))
