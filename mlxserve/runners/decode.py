"""The per-request decode loop both runners share: tokens in, ``GenerateChunk``s out.

A runner supplies an iterator of sampled tokens (its library does the sampling); this loop
applies the semantics that must be identical on every runner: end-of-sequence, ``max_tokens``,
stop strings that never leak, UTF-8 that is never split, cancellation within one token, and
the Ollama stats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mlxserve.runners.base import (
    CancelToken,
    DoneReason,
    GenerateChunk,
    GenerationStats,
    TokenLogprob,
)
from mlxserve.runners.textstream import TextStream

DEFAULT_MAX_TOKENS = 512


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


def decode_loop(
    tokens: Iterator[SampledToken],
    *,
    text: TextStream,
    is_end_of_sequence: Callable[[int], bool],
    max_tokens: int,
    cancel: CancelToken,
    prompt_tokens: int,
    cached_prompt_tokens: int = 0,
    load_duration_ns: int = 0,
) -> Iterator[GenerateChunk]:
    started = time.perf_counter_ns()
    first_token_at = started
    count = 0
    reason: DoneReason = "length"
    for sampled in tokens:
        if count == 0:
            first_token_at = time.perf_counter_ns()
        if cancel.cancelled:
            reason = "cancelled"
            break
        if is_end_of_sequence(sampled.token_id):
            reason = "stop"
            break
        count += 1
        piece, stopped = text.push(sampled.token_id)
        logprobs = [sampled.logprob] if sampled.logprob else []
        if stopped:
            yield GenerateChunk(piece, [sampled.token_id], logprobs)
            reason = "stop"
            break
        yield GenerateChunk(piece, [sampled.token_id], logprobs)
        if count >= max_tokens:
            reason = "length"
            break
        if cancel.cancelled:
            reason = "cancelled"
            break
    tail = "" if reason == "stop" and text.stopped else text.finish()
    finished = time.perf_counter_ns()
    stats = GenerationStats(
        prompt_eval_count=prompt_tokens,
        prompt_eval_duration=first_token_at - started,
        eval_count=count,
        eval_duration=finished - first_token_at,
        load_duration=load_duration_ns,
        total_duration=finished - started + load_duration_ns,
        cached_prompt_tokens=cached_prompt_tokens,
        time_to_first_token=first_token_at - started,
    )
    yield GenerateChunk(tail, done=True, done_reason=reason, stats=stats)
