"""The scripted fixture models say their script, on both runners, in their family's format.

Tests of tool calls and thinking (``test_chat_apis.py``) stand on these models, so their
scripts are checked here directly through mlx-lm and llama-cpp-python, independently of the
daemon: greedy decoding gives exactly the script's tokens, mlx-lm picks the family's tool
parser from the template and reads the script's calls as ``Family.calls``, and the project's
template renderer gives the same prompt as transformers'.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from mlxserve.prompts import render_chat
from tests.fixtures.scripted_models import (
    AGENT_TEMPLATE,
    DETOUR_TEXT,
    FAMILIES,
    HERMES,
    PARALLEL,
    SCRIPTED_CALL,
    THINKING,
    THINKING_ANSWER,
    TOOL_FAMILIES,
    Family,
    make_scripted_model,
    script_ids,
    scripted_tokenizer,
)
from tests.fixtures.tiny_models import BOS_TOKEN, EOS_ID, EOS_TOKEN

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
CALLING_FAMILIES = (*TOOL_FAMILIES, PARALLEL)
MAX_TOKENS = 12
"""Longer than every script, so a script that misses EOS shows as a longer output."""


def tools_for(family: Family) -> list[dict[str, Any]] | None:
    return list(family.tools) or None


@functools.cache
def load_mlx(folder: str) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(folder)


@functools.cache
def load_llama(path: str) -> Any:
    from llama_cpp import Llama

    return Llama(path, n_ctx=512, verbose=False)


def mlx_prompt(family: Family, scripted_models, **template_kwargs: Any) -> list[int]:
    _, tokenizer = load_mlx(str(scripted_models[family.name].hf_folder))
    prompt = tokenizer.apply_chat_template(
        MESSAGES,
        tools=tools_for(family),
        add_generation_prompt=True,
        tokenize=False,
        **template_kwargs,
    )
    return tokenizer.encode(prompt, add_special_tokens=False)


def mlx_greedy(
    family: Family, scripted_models, prompt: list[int], banned: int | None = None
) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, _ = load_mlx(str(scripted_models[family.name].hf_folder))

    def ban(_tokens: mx.array, logits: mx.array) -> mx.array:
        return logits if banned is None else logits.at[..., banned].add(-1e9)

    tokens = []
    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=MAX_TOKENS, logits_processors=[ban]
    ):
        tokens.append(int(token))
        if tokens[-1] == EOS_ID:
            break
    return tokens


def llama_greedy(family: Family, scripted_models, prompt: list[int]) -> list[int]:
    llama = load_llama(str(scripted_models[family.name].gguf_path))
    llama.reset()
    tokens = []
    for token in llama.generate(prompt, temp=0.0, reset=True):
        tokens.append(int(token))
        if token == EOS_ID or len(tokens) == MAX_TOKENS:
            break
    return tokens


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_mlx_greedy_output_is_the_script(family, scripted_models):
    tokens = mlx_greedy(family, scripted_models, mlx_prompt(family, scripted_models))
    assert tokens == script_ids(family, scripted_tokenizer(family))
    _, tokenizer = load_mlx(str(scripted_models[family.name].hf_folder))
    assert tokenizer.decode(tokens[:-1]) == family.text


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_llama_cpp_greedy_output_is_the_script(family, scripted_models):
    llama = load_llama(str(scripted_models[family.name].gguf_path))
    prompt = mlx_prompt(family, scripted_models)
    text = load_mlx(str(scripted_models[family.name].hf_folder))[1].decode(prompt)
    assert llama.tokenize(text.encode(), add_bos=False, special=True) == prompt
    tokens = llama_greedy(family, scripted_models, prompt)
    assert tokens == script_ids(family, scripted_tokenizer(family))
    assert llama.detokenize(tokens[:-1], special=True).decode() == family.text


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_projects_renderer_gives_the_same_prompt(family, scripted_models):
    _, tokenizer = load_mlx(str(scripted_models[family.name].hf_folder))
    expected = tokenizer.apply_chat_template(
        MESSAGES, tools=tools_for(family), add_generation_prompt=True, tokenize=False
    )
    rendered = render_chat(
        family.chat_template,
        MESSAGES,
        tools=tools_for(family),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
    )
    assert rendered == expected
    assert rendered.endswith(family.start)


@pytest.mark.parametrize("family", CALLING_FAMILIES, ids=lambda f: f.name)
def test_mlx_lm_parses_the_script_with_the_familys_parser(family, scripted_models):
    _, tokenizer = load_mlx(str(scripted_models[family.name].hf_folder))
    assert tokenizer.tool_call_start == family.script[0]
    first, last = family.tool_section
    inside = family.script[first : last + 1]
    body = "".join(inside).removeprefix(tokenizer.tool_call_start)
    if tokenizer.tool_call_end:
        body = body.removesuffix(tokenizer.tool_call_end)
    parsed = tokenizer.tool_parser(body, list(family.tools))
    assert (parsed if isinstance(parsed, list) else [parsed]) == list(family.calls)


@pytest.mark.parametrize("family", CALLING_FAMILIES, ids=lambda f: f.name)
def test_forbidding_the_tool_call_leaves_the_detour(family, scripted_models):
    tokenizer = scripted_tokenizer(family)
    prompt = mlx_prompt(family, scripted_models)
    tokens = mlx_greedy(family, scripted_models, prompt, banned=script_ids(family, tokenizer)[0])
    assert tokens[-1] == EOS_ID
    assert load_mlx(str(scripted_models[family.name].hf_folder))[1].decode(tokens[:-1]) == (
        DETOUR_TEXT
    )


def test_thinking_model_has_think_tokens_and_no_tool_parser(scripted_models):
    _, tokenizer = load_mlx(str(scripted_models[THINKING.name].hf_folder))
    assert tokenizer.has_thinking
    assert (tokenizer.think_start, tokenizer.think_end) == ("<think>", "</think>")
    assert tokenizer.tool_parser is None


def test_thinking_disabled_answers_without_a_thought(scripted_models):
    prompt = mlx_prompt(THINKING, scripted_models, enable_thinking=False)
    tokens = mlx_greedy(THINKING, scripted_models, prompt)
    _, tokenizer = load_mlx(str(scripted_models[THINKING.name].hf_folder))
    assert tokenizer.decode(tokens[:-1]) == THINKING_ANSWER
    assert llama_greedy(THINKING, scripted_models, prompt) == tokens


ANSWERING = Family(
    name="answering",
    chat_template=AGENT_TEMPLATE,
    start="\n",
    script=HERMES.script,
    answer=("It is sunny", " in Paris today."),
    tools=HERMES.tools,
)
TOOL_ROUND = [
    *MESSAGES,
    {"role": "assistant", "content": "", "tool_calls": [{"function": SCRIPTED_CALL}]},
    {"role": "tool", "content": "sunny"},
]


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory: pytest.TempPathFactory):
    return make_scripted_model(ANSWERING, tmp_path_factory.mktemp("answering"))


@pytest.mark.parametrize("runner", ["mlx", "llama.cpp"])
def test_an_answer_family_calls_first_and_answers_after_the_tool_result(runner, answering_model):
    """``AGENT_TEMPLATE`` cues the answer once a tool result is in the conversation, so one
    model plays a whole tool round trip (``tests/test_agents.py``)."""
    models = {ANSWERING.name: answering_model}
    _, tokenizer = load_mlx(str(answering_model.hf_folder))
    scripted = scripted_tokenizer(ANSWERING)
    for messages, expected in ((MESSAGES, ANSWERING.text), (TOOL_ROUND, ANSWERING.answer_text)):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        if runner == "mlx":
            tokens = mlx_greedy(ANSWERING, models, prompt)
        else:
            tokens = llama_greedy(ANSWERING, models, prompt)
        assert tokens[-1] == EOS_ID
        assert scripted.decode(tokens[:-1], skip_special_tokens=False) == expected
