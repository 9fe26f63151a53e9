"""One conformance suite, run against every runner on the tiny fixture models.

Each case is (runner, model): MLX on the HF folder, llama.cpp on the GGUF, and MLX on the GGUF
(through the GGUF -> MLX conversion). The semantics must not depend on the library.
"""

from __future__ import annotations

import pytest

from mlxserve.chat.model import LoadedModel, build_request
from mlxserve.errors import ContextOverflowError, ModelNotLoadedError, UnsupportedFormatError
from mlxserve.runners.base import GenerateChunk, GenerateRequest
from mlxserve.runners.select import choose_runner
from modelstore.runtime import open_model
from tests.chat_helpers import chat_prompt

CASES = [("mlx", "tiny:mlx"), ("llamacpp", "tiny:gguf"), ("mlx", "tiny:gguf")]
NO_SPECIALS = {0: -100.0, 1: -100.0, 2: -100.0}
"""Keeps the random model from ending early or emitting control tokens."""
PROMPT = "The capital of France is"


@pytest.fixture(scope="session", params=CASES, ids=[f"{r}-{m.split(':')[1]}" for r, m in CASES])
async def loaded(request, tiny_store):
    runner, name = request.param
    model = await LoadedModel.load(tiny_store, name, runner)
    yield model
    await model.unload()


def make_request(loaded: LoadedModel, **overrides) -> GenerateRequest:
    values = {"temperature": 0.0, "logit_bias": NO_SPECIALS, **overrides}
    return build_request(loaded.model, values, prompt=PROMPT)


async def collect(loaded: LoadedModel, request: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in loaded.generate(request)]


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def tokens_of(chunks: list[GenerateChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def test_streams_token_chunks_and_ends_with_stats(loaded):
    chunks = await collect(loaded, make_request(loaded, max_tokens=8))
    assert [c.done for c in chunks] == [False] * 8 + [True]
    final = chunks[-1]
    assert final.done_reason == "length"
    assert final.stats.eval_count == 8 == len(tokens_of(chunks))
    assert final.stats.prompt_eval_count == len(loaded.runner.tokenize(PROMPT))
    assert final.stats.prompt_eval_duration > 0 and final.stats.eval_duration > 0
    assert final.stats.total_duration >= final.stats.eval_duration


async def test_end_of_sequence_ends_with_reason_stop(loaded):
    chunks = await collect(loaded, make_request(loaded, logit_bias={2: 100.0}))
    assert chunks[-1].done_reason == "stop"
    assert chunks[-1].stats.eval_count == 0
    assert text_of(chunks) == ""


async def test_max_tokens_caps_the_answer(loaded):
    chunks = await collect(loaded, make_request(loaded, max_tokens=3))
    assert len(tokens_of(chunks)) == 3
    assert chunks[-1].done_reason == "length"


async def test_stop_string_spanning_tokens_never_leaks(loaded):
    reference = await collect(loaded, make_request(loaded, max_tokens=16))
    pieces = [c.text for c in reference[:-1]]
    full = "".join(pieces)
    ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    start, end = ends[3] - 1, ends[5] + 1
    stop = full[start:end]
    assert len(stop) >= 3
    chunks = await collect(loaded, make_request(loaded, max_tokens=16, stop=[stop]))
    answer = text_of(chunks)
    assert answer == full[: full.find(stop)]
    assert stop not in answer
    assert chunks[-1].done_reason == "stop"


async def test_several_stop_strings_the_earliest_wins(loaded):
    reference = text_of(await collect(loaded, make_request(loaded, max_tokens=16)))
    early, late = reference[4:6], reference[10:13]
    chunks = await collect(loaded, make_request(loaded, max_tokens=16, stop=[late, early]))
    cut = min(reference.find(early), reference.find(late))
    assert text_of(chunks) == reference[:cut]


async def test_same_seed_gives_the_same_tokens(loaded):
    def sampled(seed: int) -> GenerateRequest:
        return make_request(loaded, temperature=1.5, seed=seed, max_tokens=24)

    first = tokens_of(await collect(loaded, sampled(7)))
    second = tokens_of(await collect(loaded, sampled(7)))
    other = tokens_of(await collect(loaded, sampled(8)))
    assert first == second
    assert first != other


async def test_cancellation_stops_within_one_token_and_frees_the_runner(loaded):
    request = make_request(loaded, max_tokens=400)
    steps = []

    def cancel_at_third_step(_tokens, logits):
        """Runs on the generation thread, once per token: cancels exactly at token 3."""
        steps.append(1)
        if len(steps) == 3:
            request.cancel.cancel()
        return logits

    request.logits_processors.append(cancel_at_third_step)
    chunks = await collect(loaded, request)
    assert chunks[-1].done_reason == "cancelled"
    assert chunks[-1].stats.eval_count <= 3
    again = await collect(loaded, make_request(loaded, max_tokens=2))
    assert again[-1].done_reason == "length"


async def test_a_client_that_goes_away_frees_the_runner(loaded):
    request = make_request(loaded, max_tokens=400)
    stream = loaded.generate(request)
    async for _ in stream:
        break
    await stream.aclose()
    assert request.cancel.cancelled
    chunks = await collect(loaded, make_request(loaded, max_tokens=2))
    assert chunks[-1].done_reason == "length"


@pytest.mark.parametrize(
    "penalty",
    [{"repetition_penalty": 3.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}],
    ids=["repetition", "presence", "frequency"],
)
async def test_penalties_change_greedy_output(loaded, penalty):
    plain = tokens_of(await collect(loaded, make_request(loaded, max_tokens=40)))
    penalised = tokens_of(await collect(loaded, make_request(loaded, max_tokens=40, **penalty)))
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


async def test_a_penalty_window_of_zero_turns_the_penalties_off(loaded):
    """Ollama's ``repeat_last_n: 0``, as llama.cpp reads it (mlx-lm alone would read every
    token: ``tokens[-0:]``)."""
    plain = tokens_of(await collect(loaded, make_request(loaded, max_tokens=40)))
    windowless = make_request(
        loaded,
        max_tokens=40,
        repetition_penalty=3.0,
        presence_penalty=2.0,
        repetition_context_size=0,
    )
    assert tokens_of(await collect(loaded, windowless)) == plain


@pytest.mark.parametrize("seed", [None, 7])
async def test_top_p_zero_keeps_the_top_token_alone(loaded, seed):
    """The nucleus of probability 0 is the most likely token, as llama.cpp draws it (mlx-lm
    alone would read 0 as "no top_p" and sample from every token)."""
    greedy = tokens_of(await collect(loaded, make_request(loaded, max_tokens=12)))
    nucleus = make_request(loaded, max_tokens=12, temperature=1.5, top_p=0.0, seed=seed)
    assert tokens_of(await collect(loaded, nucleus)) == greedy


async def test_logit_bias_forces_a_token(loaded):
    chunks = await collect(loaded, make_request(loaded, max_tokens=4, logit_bias={100: 100.0}))
    assert tokens_of(chunks) == [100] * 4


async def test_logprobs_report_the_chosen_token_and_top_alternatives(loaded):
    chunks = await collect(loaded, make_request(loaded, max_tokens=4, logprobs=3))
    for chunk in chunks[:-1]:
        (entry,) = chunk.logprobs
        assert entry.token_id == chunk.token_ids[0]
        assert len(entry.top) == 3
        values = [value for _, _, value in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0][0] == entry.token_id
        assert entry.logprob == pytest.approx(values[0], abs=1e-3)
        assert entry.logprob <= 0


async def test_follow_up_prompt_reuses_the_cached_prefix(loaded):
    first = build_request(
        loaded.model,
        {"temperature": 0.0, "max_tokens": 2},
        prompt="Once upon a time there was a small model",
    )
    await collect(loaded, first)
    follow = build_request(
        loaded.model,
        {"temperature": 0.0, "max_tokens": 2},
        prompt="Once upon a time there was a small model that generated",
    )
    chunks = await collect(loaded, follow)
    assert chunks[-1].stats.cached_prompt_tokens >= 5


async def test_chat_template_renders_the_same_prompt_on_every_runner(loaded):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert chat_prompt(loaded, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nCapital of France?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_a_prompt_longer_than_the_context_is_a_typed_error(loaded):
    request = make_request(loaded)
    request.prompt_tokens = [5] * (loaded.info.context_length + 10)
    with pytest.raises(ContextOverflowError) as info:
        async for _ in loaded.generate(request):
            pass
    assert info.value.code == "context_overflow"


async def test_greedy_decoding_agrees_across_runners(tiny_store):
    results = []
    for runner, name in (("mlx", "tiny:mlx"), ("llamacpp", "tiny:gguf")):
        model = await LoadedModel.load(tiny_store, name, runner)
        try:
            results.append(tokens_of(await collect(model, make_request(model, max_tokens=8))))
        finally:
            await model.unload()
    assert results[0] == results[1]


def test_a_runner_that_cannot_run_the_format_is_refused(tiny_store):
    with pytest.raises(UnsupportedFormatError):
        choose_runner(open_model(tiny_store, "tiny:mlx"), "llamacpp")


def test_an_unloaded_runner_says_so():
    from mlxserve.runners.llamacpp.runner import LlamaCppRunner
    from mlxserve.runners.mlx.runner import MlxRunner

    for runner in (MlxRunner(), LlamaCppRunner()):
        with pytest.raises(ModelNotLoadedError):
            runner.tokenize("x")


async def test_mlx_batches_concurrent_requests_and_keeps_seeded_output(tiny_store):
    import asyncio

    model = await LoadedModel.load(tiny_store, "tiny:mlx", "mlx")
    try:
        order: list[int] = []

        def tagged(tag: int, seed: int) -> GenerateRequest:
            request = make_request(model, temperature=1.0, seed=seed, max_tokens=12)

            def record(_tokens, logits):
                order.append(tag)
                return logits

            request.logits_processors.append(record)
            return request

        alone = tokens_of(await collect(model, tagged(0, 11)))
        order.clear()
        together = await asyncio.gather(*(collect(model, tagged(i, 11 + i)) for i in range(3)))
        assert tokens_of(together[0]) == alone
        first_done = max(i for i, tag in enumerate(order) if tag == 0)
        assert {1, 2} <= set(order[:first_done])
    finally:
        await model.unload()


async def test_mlx_json_constraint_batches_with_free_requests(tiny_store):
    import asyncio
    import json

    model = await LoadedModel.load(tiny_store, "tiny:mlx", "mlx")
    try:
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        constrained = make_request(
            model,
            max_tokens=30,
            logit_bias={},
            response_format={"type": "json_schema", "schema": schema},
        )
        free = make_request(model, max_tokens=30)
        results = await asyncio.gather(collect(model, constrained), collect(model, free))
        assert json.loads(text_of(results[0])) in ({"ok": True}, {"ok": False})
        assert results[0][-1].done_reason == "stop"
        assert len(tokens_of(results[1])) == 30
    finally:
        await model.unload()
