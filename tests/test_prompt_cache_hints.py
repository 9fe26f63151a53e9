"""Caching hints through the real clients: Anthropic's ``cache_control`` and OpenAI's
``prompt_cache_key`` mark a prompt as one to keep, and the prompt cache's RAM tier keeps a
marked entry when an unmarked one would push it out (docs/API.md, "Prompt caching").

The daemon has one slot (so the live KV holds only the last prompt), the disk tier off, and a
RAM tier that holds one entry of these prompts: whatever survives there is what the hint chose.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from mlxserve.runners.promptcache import BLOCK_TOKENS
from modelstore.default_model import DEFAULT_MODEL, ensure_default_model
from modelstore.store import ModelStore
from tests.daemon import Daemon

pytestmark = pytest.mark.slow

PROMPT_WORDS = 100
"""About 345 tokens with the template: five whole 64-token blocks, a state of about 8 MB on the
default model (23,040 bytes a token)."""
RAM_TIER_BYTES = 12_000_000
"""Room for one such entry, not two."""
MIN_REUSED_TOKENS = 4 * BLOCK_TOKENS


@pytest.fixture(scope="module")
def daemon(default_gguf, tmp_path_factory) -> Iterator[Daemon]:
    store = ModelStore(tmp_path_factory.mktemp("prompt-cache-hints") / "home")
    ensure_default_model(store)
    running = Daemon(
        Path(store.root),
        env={
            "MLXSERVE_NUM_PARALLEL": "1",
            "MLXSERVE_PROMPT_CACHE_BYTES": str(RAM_TIER_BYTES),
            "MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0",
        },
    )
    running.start()
    yield running
    running.stop()


def document(salt: str) -> str:
    return " ".join(f"{salt}{i}" for i in range(PROMPT_WORDS))


def ask_anthropic(daemon: Daemon, salt: str, *, mark: bool) -> int:
    """One request; the cached prompt tokens the client reads."""
    client = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    block: dict = {"type": "text", "text": document(salt)}
    if mark:
        block["cache_control"] = {"type": "ephemeral"}
    message = client.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=2,
        system=[block],
        messages=[{"role": "user", "content": "Summarise."}],
    )
    return message.usage.cache_read_input_tokens or 0


def ask_openai(daemon: Daemon, salt: str, *, key: str | None) -> int:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    extra = {"prompt_cache_key": key} if key else {}
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        max_tokens=2,
        temperature=0,
        messages=[
            {"role": "system", "content": document(salt)},
            {"role": "user", "content": "Summarise."},
        ],
        **extra,
    )
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    return completion.usage.prompt_tokens_details.cached_tokens or 0


def test_without_a_hint_the_ram_tier_keeps_the_latest_prompt(daemon):
    """The baseline the hints change: least recently used goes first."""
    ask_anthropic(daemon, "a", mark=False)
    ask_anthropic(daemon, "b", mark=False)
    assert ask_anthropic(daemon, "a", mark=False) < BLOCK_TOKENS  # the template's first tokens


def test_a_cache_control_breakpoint_keeps_its_prompt_in_the_ram_tier(daemon):
    ask_anthropic(daemon, "c", mark=True)
    ask_anthropic(daemon, "d", mark=False)
    assert ask_anthropic(daemon, "c", mark=True) >= MIN_REUSED_TOKENS


def test_a_prompt_cache_key_keeps_its_prompt_in_the_ram_tier(daemon):
    ask_openai(daemon, "e", key="session-e")
    ask_openai(daemon, "f", key=None)
    assert ask_openai(daemon, "e", key="session-e") >= MIN_REUSED_TOKENS


def test_a_prompt_cache_key_that_is_not_a_string_is_refused(daemon):
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            max_tokens=1,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"prompt_cache_key": 7},
        )
