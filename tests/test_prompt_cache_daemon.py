"""The prompt cache seen from outside: a conversation's next turn on the real daemon reuses
its prefix after an unload, a swap, a ``num_ctx`` reload and a restart, with the answer of a
cold run; each API and the real ``openai`` and ``anthropic`` clients report it; ``mlxctl
cache``, ``rm`` and ``gc`` clear it.

One daemon home for the module, with one model slot (``max_loaded_models`` 1); the tests run
in order, each a step of the same conversation on the default model (llama.cpp).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from modelstore.default_model import DEFAULT_MODEL, ensure_default_model
from modelstore.importer import import_path
from modelstore.store import ModelStore
from tests.cli import mlxctl
from tests.daemon import Daemon

pytestmark = pytest.mark.slow

SYSTEM = " ".join(
    f"Rule {i}: when asked about place number {i}, answer in one short sentence." for i in range(12)
)
QUESTION = "What is the capital of France?"
FOLLOW_UP = "And the capital of Italy?"
REUSED = 0.95
"""The share of the shared prefix a cached turn must reuse."""
ONE_SLOT = {"MLXSERVE_MAX_LOADED_MODELS": "1", "MLXSERVE_KEEP_ALIVE": "-1"}


def post(daemon: Daemon, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{daemon.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def get(daemon: Daemon, path: str) -> bytes:
    with urllib.request.urlopen(f"{daemon.url}{path}", timeout=60) as response:
        return response.read()


def chat(daemon: Daemon, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    body = {
        "model": DEFAULT_MODEL,
        "messages": messages,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 12, **extra.pop("options", {})},
        **extra,
    }
    return post(daemon, "/api/chat", body)


def first_turn() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def second_turn(answer: str) -> list[dict[str, str]]:
    return [
        *first_turn(),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]


@pytest.fixture(scope="module")
def home(default_gguf, tiny_models, tmp_path_factory) -> Path:
    store = ModelStore(tmp_path_factory.mktemp("prompt-cache-daemon") / "home")
    ensure_default_model(store)
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    return store.root


@pytest.fixture(scope="module")
def daemon(home):
    running = Daemon(home, env=ONE_SLOT).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def conversation(home, daemon) -> dict[str, Any]:
    """The first turn, cold, unloaded at once by ``keep_alive: 0`` (its prompt is then on disk
    only); and the second turn's cold answer, from a daemon without a disk tier."""
    first = chat(daemon, first_turn(), keep_alive=0)
    assert first["cached_prompt_tokens"] == 0
    assert json.loads(get(daemon, "/api/ps"))["models"] == []
    cold = Daemon(home, env={**ONE_SLOT, "MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}).start()
    try:
        second = chat(cold, second_turn(first["message"]["content"]))
    finally:
        cold.stop()
    assert second["cached_prompt_tokens"] == 0
    return {
        "answer": first["message"]["content"],
        "shared": first["prompt_eval_count"],
        "second": second["message"]["content"],
        "second_prompt": second["prompt_eval_count"],
    }


def assert_reused(reply: dict[str, Any], conversation: dict[str, Any]) -> None:
    assert reply["cached_prompt_tokens"] >= REUSED * conversation["shared"]
    assert reply["message"]["content"] == conversation["second"]


def test_after_keep_alive_0_the_next_turn_reuses_the_prefix_from_disk(daemon, conversation):
    assert_reused(chat(daemon, second_turn(conversation["answer"])), conversation)


def test_after_a_swap_to_another_model_and_back_the_turn_reuses_the_prefix(daemon, conversation):
    post(daemon, "/api/generate", {"model": "tiny:gguf", "prompt": "hi", "stream": False})
    loaded = [m["name"] for m in json.loads(get(daemon, "/api/ps"))["models"]]
    assert loaded == ["tiny:gguf"]
    assert_reused(chat(daemon, second_turn(conversation["answer"])), conversation)


def test_after_a_num_ctx_reload_the_turn_reuses_the_prefix(daemon, conversation):
    before = json.loads(get(daemon, "/api/ps"))["models"][0]["context_length"]
    reply = chat(daemon, second_turn(conversation["answer"]), options={"num_ctx": 3000})
    assert json.loads(get(daemon, "/api/ps"))["models"][0]["context_length"] == 3000 != before
    assert_reused(reply, conversation)


def test_ps_and_metrics_show_hits_tokens_and_bytes_per_tier(daemon, conversation):
    [model] = json.loads(get(daemon, "/api/ps"))["models"]
    cache = model["prompt_cache"]
    assert cache["disk"]["hits"] == 1
    assert cache["disk"]["tokens"] >= REUSED * conversation["shared"]
    assert cache["ram"]["bytes"] > 0
    metrics = get(daemon, "/metrics").decode()
    assert f'mlxserve_prompt_cache_hits{{model="{DEFAULT_MODEL}",tier="disk"}} 1.0' in metrics
    assert 'mlxserve_prompt_cache_bytes{model="smollm2:135m",tier="ram"}' in metrics


def test_after_a_restart_the_openai_client_reads_the_cached_tokens(home, daemon, conversation):
    daemon.stop()
    daemon.start()
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=second_turn(conversation["answer"]),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=12,
    )
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    cached = completion.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= REUSED * conversation["shared"]
    assert completion.choices[0].message.content == conversation["second"]


def test_the_anthropic_client_counts_cached_tokens_apart_from_input_tokens(daemon, conversation):
    client = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    message = client.messages.create(
        model=DEFAULT_MODEL,
        system=SYSTEM,
        messages=second_turn(conversation["answer"])[1:],  # type: ignore[arg-type]
        max_tokens=12,
        extra_body={"temperature": 0},  # the client no longer names it; the API takes it
    )
    usage = message.usage
    assert usage.cache_read_input_tokens is not None
    assert usage.cache_read_input_tokens >= REUSED * conversation["shared"]
    assert usage.input_tokens + usage.cache_read_input_tokens == conversation["second_prompt"]
    assert message.content[0].text == conversation["second"]  # type: ignore[union-attr]


def test_mlxctl_cache_lists_and_clears_a_models_entries(home, daemon):
    daemon.stop()
    listed = json.loads(mlxctl("cache", "list", "--json", home=home).stdout)["entries"]
    ours = [e for e in listed if DEFAULT_MODEL in e["models"]]
    assert ours and all(e["models"] for e in listed)  # each entry names its model
    assert all(Path(e["path"]).stat().st_mode & 0o777 == 0o600 for e in listed)
    mlxctl("cache", "clear", "tiny:gguf", home=home)
    assert json.loads(mlxctl("cache", "list", "--json", home=home).stdout)["entries"] == ours
    cleared = json.loads(mlxctl("cache", "clear", DEFAULT_MODEL, "--json", home=home).stdout)
    assert cleared["removed"] == len(ours)
    assert json.loads(mlxctl("cache", "list", "--json", home=home).stdout)["entries"] == []
    assert mlxctl("cache", "clear", home=home, check=False).returncode != 0


def test_removing_the_last_model_of_some_weights_removes_their_entries(home, tmp_path):
    store = ModelStore(home)
    weights = next(
        d.removeprefix("sha256:")
        for d in store.resolve(DEFAULT_MODEL).manifest.blob_digests()
        if store.blobs.size(d) > 1_000_000
    )
    entry = store.prompt_cache_dir / weights / "key" / "entry.kv"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x")
    mlxctl("cp", DEFAULT_MODEL, "copy:1", home=home)
    mlxctl("rm", DEFAULT_MODEL, home=home)
    assert entry.exists()  # copy:1 still uses those weights
    mlxctl("rm", "copy:1", home=home)
    assert not entry.exists()
    orphan = store.prompt_cache_dir / ("0" * 64) / "key" / "entry.kv"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    mlxctl("gc", home=home)
    assert not orphan.exists()
