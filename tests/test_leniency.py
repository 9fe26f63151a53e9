"""The leniency policy (docs/API.md, "Leniency"): one table of rules, each run through the four
chat APIs on the real daemon.

A rule is a change to a plain request, written per API as the agents send it on the wire
(Claude Code's system messages, beta headers and fields; Codex's deferred and hosted tools;
aider's ``num_ctx``), and what must hold of the answer: still answered, and the prompt it
became (counted in the API's own usage field) either the plain request's (the field changed
nothing) or longer (its text reached the model). An API with no way to say a rule's request is
skipped, with that reason. Every answer also says the context it was made in
(``X-Mlxserve-Context``), and the ``num_ctx`` it was asked when that was clamped. The models
are ``tests/conftest.py``'s ``chat_daemon`` fixtures: ``scripted-plain`` says its script
whatever it is asked; ``scripted-mistral``'s template refuses a system message anywhere but
first; ``scripted-thinking`` thinks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from mlxserve.server.middleware import CONTEXT_HEADER
from tests.fixtures.scripted_models import MISTRAL, PLAIN, THINKING, model_name

TIMEOUT_S = 120.0
APIS = ("native", "openai", "responses", "anthropic")
PLAIN_MODEL = model_name(PLAIN, "gguf")
EXTRA = "Remember: answer in French."
"""Text a lenient rule must bring into the prompt."""


@dataclass
class Request:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


def plain(api: str, model: str = PLAIN_MODEL) -> Request:
    """Say hello, in each API's own shape, with a token limit."""
    user = {"role": "user", "content": "Say hello."}
    if api == "native":
        body = {"model": model, "messages": [user], "stream": False}
        return Request("/api/chat", {**body, "options": {"num_predict": 8}}, {})
    if api == "openai":
        return Request(
            "/v1/chat/completions", {"model": model, "messages": [user], "max_tokens": 8}, {}
        )
    if api == "responses":
        return Request(
            "/v1/responses", {"model": model, "input": [user], "max_output_tokens": 8}, {}
        )
    return Request("/v1/messages", {"model": model, "messages": [user], "max_tokens": 8}, {})


def send(daemon: Any, request: Request) -> httpx.Response:
    return httpx.post(
        f"{daemon.url}{request.path}",
        json=request.body,
        headers=request.headers,
        timeout=TIMEOUT_S,
    )


def prompt_tokens(api: str, answer: dict[str, Any]) -> int:
    if api == "native":
        return answer["prompt_eval_count"]
    if api == "openai":
        return answer["usage"]["prompt_tokens"]
    usage = answer["usage"]
    if api == "anthropic":  # input_tokens is the uncached part; clients add the cache reads
        return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    return usage["input_tokens"]


def has_thinking(api: str, answer: dict[str, Any]) -> bool:
    if api == "native":
        return bool(answer["message"].get("thinking"))
    if api == "openai":
        return bool(answer["choices"][0]["message"].get("reasoning_content"))
    if api == "responses":
        return any(item["type"] == "reasoning" for item in answer["output"])
    return any(block["type"] == "thinking" for block in answer["content"])


class NotInThisApi(Exception):
    """The API has no way to say this rule's request."""


# --- The changes, per API --------------------------------------------------------------------


def late_system(api: str, model: str = PLAIN_MODEL) -> Request:
    """A system (OpenAI: developer) message after the first turn."""
    request = plain(api, model)
    late = {"role": "developer" if api in ("openai", "responses") else "system", "content": EXTRA}
    key = "input" if api == "responses" else "messages"
    request.body[key] = [
        *request.body[key],
        {"role": "assistant", "content": "Hi."},
        late,
        {"role": "user", "content": "Again."},
    ]
    return request


def late_system_refused_by_template(api: str) -> Request:
    return late_system(api, model_name(MISTRAL, "gguf"))


def late_system_baseline(api: str, model: str = PLAIN_MODEL) -> Request:
    request = late_system(api, model)
    key = "input" if api == "responses" else "messages"
    request.body[key] = [m for m in request.body[key] if m["content"] != EXTRA]
    return request


def unknown_fields_and_beta_headers(api: str) -> Request:
    request = plain(api)
    request.body.update(
        future_field={"anything": 1}, metadata={"user_id": "u1"}, prompt_cache_key="k"
    )
    request.headers.update(
        {
            "anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27",
            "anthropic-version": "2023-06-01",
            "OpenAI-Beta": "responses=experimental",
            "x-stainless-helper-method": "stream",
        }
    )
    return request


def block(api: str, part: dict[str, Any]) -> Request:
    """A user message with ``part`` after its text."""
    if api == "native":
        raise NotInThisApi("Ollama's content is a string: it has no blocks")
    request = plain(api)
    key = "input" if api == "responses" else "messages"
    text = {"type": "input_text" if api == "responses" else "text", "text": "Say hello."}
    request.body[key] = [{"role": "user", "content": [text, part]}]
    return request


def unknown_block_with_text(api: str) -> Request:
    return block(api, {"type": "future_block", "text": EXTRA})


def unknown_block_without_text(api: str) -> Request:
    return block(api, {"type": "future_block", "data": {"blob": "AAAA"}})


def beta_query(api: str) -> Request:
    if api != "anthropic":
        raise NotInThisApi("Claude Code's ?beta=true is the Messages API's")
    request = plain(api)
    request.path += "?beta=true"
    return request


def adaptive_thinking(api: str, model: str = PLAIN_MODEL) -> Request:
    if api != "anthropic":
        raise NotInThisApi("thinking.type adaptive and output_config.effort are Anthropic's")
    request = plain(api, model)
    request.body.update(
        thinking={"type": "adaptive", "display": "omitted"}, output_config={"effort": "medium"}
    )
    request.body["max_tokens"] = 64
    return request


def cache_control(api: str) -> Request:
    if api != "anthropic":
        raise NotInThisApi("cache_control is Anthropic's")
    request = plain(api)
    marker = {"type": "ephemeral", "ttl": "5m"}
    request.body["system"] = [{"type": "text", "text": "Be brief.", "cache_control": marker}]
    request.body["messages"] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say hello.", "cache_control": marker}],
        }
    ]
    return request


def cache_control_baseline(api: str) -> Request:
    request = plain(api)
    request.body["system"] = "Be brief."
    return request


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def tools_that_stay_out(api: str) -> Request:
    """A tool marked ``defer_loading`` (Claude Code, Codex: loaded later by a search tool) and a
    hosted tool the daemon cannot run."""
    request = plain(api)
    if api == "anthropic":
        request.body["tools"] = [
            {"name": WEATHER["name"], "input_schema": WEATHER["parameters"], "defer_loading": True},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        ]
    elif api == "responses":
        request.body["tools"] = [
            {"type": "function", **WEATHER, "defer_loading": True},
            {"type": "web_search", "search_context_size": "low"},
        ]
    else:
        request.body["tools"] = [{"type": "function", "function": WEATHER, "defer_loading": True}]
    return request


HUGE_NUM_CTX = 1_000_000


def num_ctx_over_the_trained_context(api: str) -> Request:
    if api != "native":
        raise NotInThisApi("num_ctx is Ollama's option")
    request = plain(api)
    request.body["options"]["num_ctx"] = HUGE_NUM_CTX
    return request


def think_without_thinking(api: str) -> Request:
    request = plain(api)
    if api == "native":
        request.body["think"] = True
    elif api == "openai":
        request.body["reasoning_effort"] = "high"
    elif api == "responses":
        request.body["reasoning"] = {"effort": "high"}
    else:
        request.body["thinking"] = {"type": "enabled", "budget_tokens": 31999}
        request.body["max_tokens"] = 32000
    return request


def context_said(answer: httpx.Response) -> tuple[int, int | None]:
    """``X-Mlxserve-Context``: the loaded context, and the ``num_ctx`` asked if clamped."""
    said = answer.headers[CONTEXT_HEADER]
    context, _, requested = said.partition("; requested=")
    return int(context), int(requested) if requested else None


# --- The table -------------------------------------------------------------------------------

Check = Callable[[str, dict[str, Any], dict[str, Any]], None]
"""``(api, answer, baseline answer)``: what must hold."""


def same_prompt(api: str, answer: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert prompt_tokens(api, answer) == prompt_tokens(api, baseline)


def longer_prompt(api: str, answer: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert prompt_tokens(api, answer) > prompt_tokens(api, baseline) + 3


def answered_without_thinking(api: str, answer: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert not has_thinking(api, answer), answer


@dataclass(frozen=True)
class Rule:
    id: str
    change: Callable[[str], Request]
    check: Check
    baseline: Callable[[str], Request] = plain
    status: dict[str, int] | None = None
    """APIs where the request is refused, with the status (the answer would be wrong)."""
    clamps: int | None = None
    """The ``num_ctx`` the answer says was clamped (``X-Mlxserve-Context: N; requested=M``)."""


RULES = (
    Rule("system-messages-anywhere", late_system, longer_prompt, late_system_baseline),
    Rule(
        "system-messages-folded-where-the-template-refuses-them",
        late_system_refused_by_template,
        longer_prompt,
        lambda api: late_system_baseline(api, model_name(MISTRAL, "gguf")),
    ),
    Rule("unknown-fields-and-beta-headers-ignored", unknown_fields_and_beta_headers, same_prompt),
    Rule("unknown-block-with-text-kept-as-text", unknown_block_with_text, longer_prompt),
    Rule("unknown-block-without-text-dropped", unknown_block_without_text, same_prompt),
    Rule("beta-query-accepted", beta_query, same_prompt),
    Rule("adaptive-thinking-and-effort-accepted", adaptive_thinking, same_prompt),
    Rule(
        "thinking-display-omitted-sends-no-thinking",
        lambda api: adaptive_thinking(api, model_name(THINKING, "gguf")),
        answered_without_thinking,
    ),
    Rule("cache-control-accepted", cache_control, same_prompt, cache_control_baseline),
    Rule("deferred-and-hosted-tools-stay-out-of-the-prompt", tools_that_stay_out, same_prompt),
    Rule(
        "num-ctx-over-the-trained-context-clamped",
        num_ctx_over_the_trained_context,
        same_prompt,
        clamps=HUGE_NUM_CTX,
    ),
    Rule(
        "thinking-asked-of-a-model-without-it",
        think_without_thinking,
        answered_without_thinking,
        status={"native": 400},
    ),
)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("rule", RULES, ids=[rule.id for rule in RULES])
def test_leniency(rule: Rule, api: str, chat_daemon) -> None:
    try:
        request = rule.change(api)
    except NotInThisApi as exc:
        pytest.skip(str(exc))
    answer = send(chat_daemon, copy.deepcopy(request))
    expected = (rule.status or {}).get(api, 200)
    assert answer.status_code == expected, f"{answer.text}\n{chat_daemon.log()[-2000:]}"
    if expected != 200:
        return
    context, requested = context_said(answer)
    assert requested == rule.clamps and context < (rule.clamps or context + 1), answer.headers
    baseline = send(chat_daemon, rule.baseline(api))
    assert baseline.status_code == 200, baseline.text
    rule.check(api, answer.json(), baseline.json())
