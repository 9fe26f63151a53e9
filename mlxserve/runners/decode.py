"""Per-request decode semantics both runners share: tokens in, ``GenerateChunk``s out.

A runner's library samples the tokens; ``DecodeState`` applies what must be identical on
every runner: end-of-sequence, ``max_tokens``, stop strings that never leak, UTF-8 that is
never split, cancellation within one token, and the Ollama stats. llama.cpp pulls tokens from
an iterator (``decode_loop``); the batched MLX engine pushes them as each batch step lands.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mlxserve.errors import ContextOverflowError, InvalidRequestError
from mlxserve.runners.base import (
    CancelToken,
    DoneReason,
    GenerateChunk,
    GenerateRequest,
    GenerationStats,
    TokenLogprob,
)
from mlxserve.runners.textstream import TextStream


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(kw_only=True, eq=False)
class DecodeState:
    """One request's progress; ``push`` returns the chunk to emit, ``done`` tells when to end."""

    text: TextStream
    is_end_of_sequence: Callable[[int], bool]
    max_tokens: int
    cancel: CancelToken
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    started: int = field(default_factory=time.perf_counter_ns)
    first_token_at: int | None = None
    count: int = 0
    draft_tokens: int = 0
    """Of ``count``, how many a draft model proposed (speculative decoding)."""
    reason: DoneReason | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, sampled: SampledToken) -> GenerateChunk | None:
        """Account for one sampled token; ``None`` when it ends the answer unseen (EOS)."""
        first = self.first_token_at is None
        if first:
            self.first_token_at = time.perf_counter_ns()
        if self.cancel.cancelled:
            self.reason = "cancelled"
            return None
        if self.is_end_of_sequence(sampled.token_id):
            self.reason = "stop"
            return None
        self.count += 1
        piece, stopped = self.text.push(sampled.token_id)
        if stopped:
            self.reason = "stop"
        elif self.count >= self.max_tokens:
            self.reason = "length"
        elif self.cancel.cancelled:
            self.reason = "cancelled"
        logprobs = [sampled.logprob] if sampled.logprob else []
        chunk = GenerateChunk(piece, [sampled.token_id], logprobs)
        if first:
            chunk.cached_prompt_tokens = self.cached_prompt_tokens
        return chunk

    def finish(self, reason: DoneReason | None = None) -> GenerateChunk:
        """The last chunk: any held-back text and the stats."""
        self.reason = self.reason or reason or "length"
        tail = "" if self.text.stopped else self.text.finish()
        finished = time.perf_counter_ns()
        first = self.first_token_at or finished
        stats = GenerationStats(
            prompt_eval_count=self.prompt_tokens,
            prompt_eval_duration=first - self.started,
            eval_count=self.count,
            eval_duration=finished - first,
            total_duration=finished - self.started,
            cached_prompt_tokens=self.cached_prompt_tokens,
            time_to_first_token=first - self.started,
            draft_tokens=self.draft_tokens,
        )
        return GenerateChunk(
            tail,
            done=True,
            done_reason=self.reason,
            stats=stats,
            stop_sequence=self.text.matched_stop,
        )


def prompt_and_budget(
    request: GenerateRequest,
    tokenize: Callable[[str, bool], list[int]],
    empty_prompt: list[int],
    context: int,
) -> tuple[list[int], int]:
    """The prompt's tokens and how many may be generated after them; a prompt that leaves no
    room is refused (never truncated). An empty prompt becomes ``empty_prompt`` (BOS)."""
    prompt = request.prompt_tokens
    if prompt is None:
        prompt = tokenize(request.prompt or "", request.add_special_tokens)
    if not prompt:
        prompt = empty_prompt
    return list(prompt), generation_budget(request, len(prompt), context)


def generation_budget(
    request: GenerateRequest, prompt_tokens: int, context: int, what: str = "the prompt"
) -> int:
    """How many tokens may follow a prompt of ``prompt_tokens`` (images included, for vision
    models): ``max_tokens``, or without it what the context has left (no silent cap: the model
    stops, or the context is full, as the real services and Ollama do); a prompt that leaves
    no room is refused, never truncated."""
    if prompt_tokens >= context:
        raise ContextOverflowError(
            f"{what} has {prompt_tokens} tokens; the context holds {context}: shorten it or "
            f"raise the context (options.num_ctx, `/set parameter num_ctx N` in mlxctl run, "
            f"or context_length in a ModelSpec)",
            prompt_tokens=prompt_tokens,
            context_length=context,
        )
    room = context - prompt_tokens
    return min(request.max_tokens or room, room)


def check_token_ids(request: GenerateRequest, vocabulary: int) -> None:
    """Token ids a request names (``logit_bias``, ``context``) must exist: neither MLX's scatter
    nor a numpy index into the logits checks them, so one past the vocabulary would be a crash
    or a 500.
    A ``top_k`` of the whole vocabulary or more keeps every token, which is what 0 says to
    both libraries (mlx-lm refuses the first spelling, llama.cpp's C ``int`` a huge one): the
    same meaning, not a clamp (``modelstore/parameters.py`` refuses what is out of range)."""
    if request.top_k >= vocabulary:
        request.top_k = 0
    if any(not 0 <= token < vocabulary for token in request.logit_bias or {}):
        raise InvalidRequestError(
            f"logit_bias token ids must be between 0 and {vocabulary - 1}", param="logit_bias"
        )
    if any(not 0 <= token < vocabulary for token in request.prompt_tokens or ()):
        # Only ``/api/generate``'s ``context`` can carry ids the tokenizer did not make.
        raise InvalidRequestError(
            f"context token ids must be between 0 and {vocabulary - 1}", param="context"
        )


def decode_loop(tokens: Iterator[SampledToken], state: DecodeState) -> Iterator[GenerateChunk]:
    """Drive ``state`` from an iterator of sampled tokens (the llama.cpp runner)."""
    for sampled in tokens:
        chunk = state.push(sampled)
        if chunk is not None:
            yield chunk
        if state.done:
            break
    yield state.finish()
