"""LLM rerankers of the Qwen3-Reranker kind: a causal model asked, through its own chat
template (thinking off), whether a document meets a query; the score is the probability of
"yes" against "no" at the first answer token, as the model's card computes it
(``softmax([logit_no, logit_yes])[1]``).

It runs on either text runner through ``generate`` only (one token, greedy, the two answer
tokens' logprobs), so every runner and the worker proxy serve it as they serve chat; the two
answer tokens get the same large ``logit_bias`` so that they are the top two alternatives
reported, which leaves their difference, and so the score, unchanged. Pairs are scored one
after another, each its own prompt (its prefix is reused from the prompt cache).
"""

from __future__ import annotations

import asyncio
import math

from mlxserve.chat.core import prepare
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest, Message
from mlxserve.errors import InferenceError, InvalidRequestError, UnsupportedFeatureError
from mlxserve.runners.base import RerankRequest, RerankResult
from mlxserve.runners.rerank import CUT_ATTEMPTS, too_long

JUDGE_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
"""Qwen3-Reranker's instruction when the caller gives none."""
ANSWERS = ("yes", "no")
ANSWER_BIAS = 100.0
"""Added to both answer tokens' logits: above any other token's, small enough that float32
keeps their difference to ~1e-5."""


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


def judged(loaded: LoadedModel, query: str, document: str, answers: tuple[int, int]) -> ChatRequest:
    return ChatRequest(
        loaded.model.name,
        messages=[Message("system", JUDGE_SYSTEM), Message("user", pair_text(query, document))],
        think=False if loaded.family.thinks else None,
        sampling={
            "max_tokens": 1,
            "temperature": 0.0,
            "logit_bias": dict.fromkeys(answers, ANSWER_BIAS),
        },
        logprobs=len(ANSWERS),
    )


def fitted(
    loaded: LoadedModel,
    request: RerankRequest,
    index: int,
    answers: tuple[int, int],
    limit: int,
) -> ChatRequest:
    """The pair's request, its document cut from its end so that prompt and answer fit the
    context (or refused with ``truncate`` off)."""
    document = request.documents[index]
    for _ in range(CUT_ATTEMPTS):
        chat = judged(loaded, request.query, document, answers)
        length = len(prepare(loaded, chat).request.prompt_tokens or []) + 1
        if length <= limit:
            return chat
        if not request.truncate:
            raise too_long(index, length, limit)
        tokens = loaded.runner.tokenize(document, add_special_tokens=False)
        room = len(tokens) - (length - limit)
        if room < 1:
            raise InvalidRequestError(
                "the query leaves no room for a document in this model's context of "
                f"{limit} tokens",
                param="query",
            )
        document = loaded.runner.detokenize(tokens[:room])
    raise too_long(index, length, limit)


async def causal_rerank(loaded: LoadedModel, request: RerankRequest) -> RerankResult:
    answers = await asyncio.to_thread(answer_ids, loaded)
    limit = loaded.info.context_length
    scores: list[float] = []
    tokens = 0
    for index in range(len(request.documents)):
        chat = await asyncio.to_thread(fitted, loaded, request, index, answers, limit)
        prepared = await asyncio.to_thread(prepare, loaded, chat)
        tokens += len(prepared.request.prompt_tokens or [])
        top: dict[int, float] = {}
        async for chunk in loaded.runner.generate(prepared.request):
            for entry in chunk.logprobs[:1]:
                top = {token: logprob for token, _, logprob in entry.top}
        if not all(answer in top for answer in answers):
            raise InferenceError(f"{loaded.model.name} did not report the yes/no logprobs")
        yes, no = (top[answer] for answer in answers)
        scores.append(1.0 / (1.0 + math.exp(no - yes)))
    return RerankResult(scores, tokens)
