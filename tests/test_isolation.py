"""Each loaded model runs in its own worker process (``mlxserve/runners/isolated.py``): a model
that aborts its library, a worker killed or hung, ends its own requests with ``model_crashed``
while the daemon and its other models keep answering; a model that keeps crashing is refused.
A model that cannot load is refused before that, at create and import, by a trial load in a
throwaway process (``mlxserve/runners/trial.py``).

The crash cases are real: GGUFs whose metadata lies in ways that make llama.cpp abort the
process (``FACTS.md``), and real signals sent to the worker. The lying GGUFs reach the worker
by being in the store already (imported by ``modelstore`` alone, as a store written before
trial loads existed, or by another tool): through create or import they are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cli import mlxctl
from tests.conftest import populated_store
from tests.daemon import Daemon
from tests.fixtures.gguf_models import Lie

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the workers and their maps in /proc"
)

LIES: dict[str, dict[str, Lie]] = {
    "block_count": {"llama.block_count": 10000},
    "expert_count": {"llama.expert_count": 4},
    "nan_epsilon": {"llama.attention.layer_norm_rms_epsilon": float("nan")},
}
"""Metadata lies that pass the import's checks and abort llama.cpp (SIGABRT) at load or at the
first decode: a block count the tensors do not have, experts on a dense model, and a NaN norm
epsilon (two threads assert at once)."""
REFUSALS: dict[str, tuple[dict[str, Lie], str]] = {
    "block_count": (LIES["block_count"], "GGML_ASSERT(hparams.n_layer_all > 0"),
    "block_count_0": ({"llama.block_count": 0}, "GGML_ASSERT(hparams.n_layer_all > 0"),
    "expert_count": (LIES["expert_count"], "GGML_ASSERT(n_expert_used_max > 0)"),
    "nan_epsilon": (LIES["nan_epsilon"], "GGML_ASSERT(eps >= 0.0f)"),
    "head_count_0": ({"llama.attention.head_count": 0}, "'blk.0.attn_q.weight' has wrong shape"),
    "architecture": ({"general.architecture": "nonsense"}, "unknown model architecture"),
    "short_vocabulary": (
        {"tokenizer.ggml.tokens": [f"t{i}" for i in range(200)]},
        "'token_embd.weight' has wrong shape",
    ),
}
"""Every lie, and the library's words its refusal at create carries: the aborts above, and
models llama.cpp refuses to load (no head, an unknown architecture, fewer tokens than the
embedding has rows), which were accepted and then failed every chat."""
STALL_S = 30.0
"""The daemon's ``runner_stall_timeout_s`` here (a load has its own, longer deadline): long
enough for a cold prefill on this shared 2-core machine at its busiest (15 s was not), short
enough for the hang test."""
CRASH_ANSWER_S = 30.0
"""A crash is answered within seconds (the worker starts, loads and aborts on a busy CPU)."""
VERSION_ANSWER_S = 1.0
STREAM = {"prompt": "Tell a story", "stream": True, "options": {"num_predict": 100000}}


@pytest.fixture(scope="module")
def lying_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.fixtures.gguf_models import write_f32_gguf

    root = tmp_path_factory.mktemp("lying")
    return {
        name: write_f32_gguf("llama", root / f"{name}.gguf", lies)
        for name, (lies, _) in REFUSALS.items()
    }


@pytest.fixture
def crash_daemon(tiny_models, default_gguf, lying_ggufs, tmp_path):
    """The tiny models, the default model as ``slow:gguf`` (a stream that lasts seconds), and
    each lie that aborts llama.cpp as ``liar:<lie>``, stored without a trial."""
    from modelstore.importer import import_path

    store = populated_store(tmp_path / "home", tiny_models)
    import_path(store, default_gguf, "slow:gguf")
    for lie in LIES:
        import_path(store, lying_ggufs[lie], f"liar:{lie}")
    daemon = Daemon(store.root, env={"MLXSERVE_RUNNER_STALL_TIMEOUT_S": str(STALL_S)}).start()
    yield daemon
    daemon.stop()


def workers(daemon: Daemon) -> set[int]:
    """The daemon's child processes: its models' workers."""
    assert daemon.process is not None
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == daemon.process.pid and fields[0] != "Z":
                found.add(int(stat.parent.name))
    return found


async def new_worker(daemon: Daemon, before: set[int]) -> int:
    deadline = time.monotonic() + CRASH_ANSWER_S
    while time.monotonic() < deadline:
        started = workers(daemon) - before
        if started:
            return started.pop()
        await asyncio.sleep(0.05)
    raise AssertionError("no worker started")


async def chat(session: aiohttp.ClientSession, daemon: Daemon, model: str) -> tuple[int, Any]:
    async with session.post(
        f"{daemon.url}/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
              "options": {"num_predict": 4}},
    ) as response:  # fmt: skip
        return response.status, await response.json()


@contextlib.asynccontextmanager
async def version_probe(
    session: aiohttp.ClientSession, daemon: Daemon
) -> AsyncIterator[list[float]]:
    """``/api/version``, asked over and over while the body runs: its answer times."""
    times: list[float] = []

    async def probe() -> None:
        while True:
            started = time.monotonic()
            async with session.get(f"{daemon.url}/api/version") as response:
                assert response.status == 200
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(probe())
    try:
        yield times
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def create_from_file(
    session: aiohttp.ClientSession, daemon: Daemon, path: Path, name: str
) -> tuple[int, Any]:
    from modelstore.blobs import hash_file

    digest, _ = hash_file(path)
    uploaded = await session.post(f"{daemon.url}/api/blobs/{digest}", data=path.read_bytes())
    assert uploaded.status in (200, 201)
    async with session.post(
        f"{daemon.url}/api/create",
        json={"model": name, "files": {"model.gguf": digest}, "stream": False},
    ) as response:
        return response.status, await response.json()


async def assert_serving(session: aiohttp.ClientSession, daemon: Daemon, model: str) -> None:
    status, body = await chat(session, daemon, model)
    assert status == 200, body
    assert daemon.process is not None and daemon.process.poll() is None


@pytest.mark.parametrize("lie", REFUSALS)
async def test_a_gguf_that_cannot_load_is_refused_at_create_with_the_reason(
    crash_daemon, lying_ggufs, lie
):
    daemon = crash_daemon
    async with aiohttp.ClientSession() as session:
        await assert_serving(session, daemon, "tiny:gguf")
        (other,) = workers(daemon)
        async with version_probe(session, daemon) as answers:
            status, body = await create_from_file(session, daemon, lying_ggufs[lie], "refused:1")
        assert status == 400, body
        assert body["code"] == "model_unloadable"
        assert REFUSALS[lie][1] in body["error"], body
        assert answers and max(answers) < VERSION_ANSWER_S
        async with session.post(f"{daemon.url}/api/show", json={"model": "refused:1"}) as shown:
            assert shown.status == 404  # never stored under its name
        assert workers(daemon) == {other}  # the trial's process is gone; the other model serves
        await assert_serving(session, daemon, "tiny:gguf")


async def test_a_streamed_create_ends_with_the_refusal_and_its_request_id(
    crash_daemon, lying_ggufs
):
    from modelstore.blobs import hash_file

    daemon = crash_daemon
    path = lying_ggufs["block_count"]
    digest, _ = hash_file(path)
    async with aiohttp.ClientSession() as session:
        await session.post(f"{daemon.url}/api/blobs/{digest}", data=path.read_bytes())
        async with session.post(
            f"{daemon.url}/api/create",
            json={"model": "refused:1", "files": {"model.gguf": digest}},
        ) as response:
            assert response.status == 200  # the progress stream began before the trial
            lines = [json.loads(line) async for line in response.content if line.strip()]
            header = response.headers["X-Request-Id"]
    assert lines[-1]["code"] == "model_unloadable", lines
    assert lines[-1]["request_id"] == header
    assert all(line.get("status") != "success" for line in lines)


@pytest.mark.parametrize("command", ["import", "create"])
@pytest.mark.parametrize("lie", ["block_count", "nan_epsilon", "architecture"])
def test_the_cli_refuses_a_gguf_that_cannot_load_with_the_reason(
    lying_ggufs, tmp_path, command, lie
):
    home = tmp_path / "home"
    if command == "import":
        args = ["import", str(lying_ggufs[lie]), "--name", "refused:1"]
    else:
        spec = tmp_path / "refused.modelspec.yaml"
        spec.write_text(f"from: {lying_ggufs[lie]}\n")
        args = ["create", "refused:1", "-f", str(spec)]
    result = mlxctl(*args, home=home, check=False)
    assert result.returncode == 1, result.stdout
    assert "[model_unloadable]" in result.stderr
    assert REFUSALS[lie][1] in result.stderr
    assert "refused:1" not in mlxctl("list", home=home).stdout


def test_a_gguf_that_loads_passes_its_trial(default_gguf, tmp_path):
    home = tmp_path / "home"
    mlxctl("import", str(default_gguf), "--name", "fine:1", home=home)
    assert "fine:1" in mlxctl("list", home=home).stdout


@pytest.mark.parametrize("lie", LIES)
async def test_a_stored_gguf_whose_metadata_aborts_llama_cpp_crashes_its_worker_only(
    crash_daemon, lie
):
    daemon = crash_daemon
    liar = f"liar:{lie}"
    async with aiohttp.ClientSession() as session:
        await assert_serving(session, daemon, "tiny:gguf")
        (other,) = workers(daemon)
        for _ in range(2):
            started = time.monotonic()
            async with version_probe(session, daemon) as answers:
                status, body = await chat(session, daemon, liar)
            assert status == 500, body
            assert body["code"] == "model_crashed"
            assert "SIGABRT" in body["error"] or "no progress" in body["error"]
            assert time.monotonic() - started < CRASH_ANSWER_S
            assert answers and max(answers) < VERSION_ANSWER_S
            assert workers(daemon) == {other}  # its memory is returned: the worker is gone
        status, body = await chat(session, daemon, liar)
        assert status == 500, body
        assert body["code"] == "model_crash_loop"
        assert "crashed 2 times in a row" in body["error"]
        await assert_serving(session, daemon, "tiny:gguf")
        assert workers(daemon) == {other}  # the other model never stopped


async def stream_until_crash(
    session: aiohttp.ClientSession, daemon: Daemon, hurt: signal.Signals
) -> tuple[dict[str, Any], float]:
    """Start a stream on ``slow:gguf``, send its worker ``hurt`` after the first token: the
    stream's last line, and how long it took to come after the signal."""
    before = workers(daemon)
    async with session.post(
        f"{daemon.url}/api/generate", json={**STREAM, "model": "slow:gguf"}
    ) as (response):
        assert response.status == 200
        first = json.loads(await response.content.readline())
        assert first["done"] is False
        worker = await new_worker(daemon, before)
        os.kill(worker, hurt)
        hurt_at = time.monotonic()
        lines = [json.loads(line) async for line in response.content if line.strip()]
    return lines[-1], time.monotonic() - hurt_at


async def test_a_worker_killed_mid_stream_ends_the_stream_and_then_is_refused(crash_daemon):
    daemon = crash_daemon
    async with aiohttp.ClientSession() as session:
        await assert_serving(session, daemon, "tiny:gguf")
        (other,) = workers(daemon)
        for _ in range(2):
            async with version_probe(session, daemon) as answers:
                last, after = await stream_until_crash(session, daemon, signal.SIGKILL)
            assert last["code"] == "model_crashed", last
            assert "SIGKILL" in last["error"]
            assert after < CRASH_ANSWER_S
            assert answers and max(answers) < VERSION_ANSWER_S
            assert workers(daemon) == {other}
        status, body = await chat(session, daemon, "slow:gguf")
        assert status == 500
        assert body["code"] == "model_crash_loop", body
        await assert_serving(session, daemon, "tiny:gguf")


STORY = [{"role": "user", "content": "Tell a story"}]
CRASH_STREAMS: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any]]] = {
    "native": ("/api/generate", STREAM, lambda line: line.get("request_id")),
    "openai": (
        "/v1/chat/completions",
        {"messages": STORY, "stream": True, "max_tokens": 4096},
        lambda event: (event.get("error") or {}).get("request_id"),
    ),
    "responses": (
        "/v1/responses",
        {"input": "Tell a story", "stream": True, "max_output_tokens": 4096},
        lambda event: event.get("request_id") if event.get("type") == "error" else None,
    ),
    "anthropic": (
        "/v1/messages",
        {"messages": STORY, "stream": True, "max_tokens": 4096},
        lambda event: event.get("request_id") if event.get("type") == "error" else None,
    ),
}
"""Each API's stream, and where its error message carries the request id (None elsewhere)."""


def stream_messages(line: bytes) -> list[dict[str, Any]]:
    """The JSON message a line of NDJSON or SSE holds (none for SSE's other lines)."""
    text = line.decode().strip()
    if text.startswith("data:"):
        text = text.removeprefix("data:").strip()
    elif text.startswith(("event:", ":")):
        return []
    return [json.loads(text)] if text.startswith("{") else []


async def test_a_streams_crash_error_carries_its_request_id_on_every_api(crash_daemon):
    """The stream's headers went out before the crash, and a client reading events sees the
    body only: the error message names the request, as the ``X-Request-Id`` header did."""
    daemon = crash_daemon
    async with aiohttp.ClientSession() as session:
        for api, (path, body, request_id_of) in CRASH_STREAMS.items():
            await assert_serving(session, daemon, "slow:gguf")  # served: no crash loop
            async with session.post(
                f"{daemon.url}{path}", json={**body, "model": "slow:gguf"}
            ) as response:
                assert response.status == 200, api
                header = response.headers["X-Request-Id"]
                messages: list[dict[str, Any]] = []
                while not messages:
                    messages += stream_messages(await response.content.readline())
                (worker,) = workers(daemon)
                os.kill(worker, signal.SIGKILL)
                async for line in response.content:
                    messages += stream_messages(line)
            ids = [request_id_of(message) for message in messages]
            assert ids[-1] == header, (api, messages[-1])
            assert "model_crashed" in json.dumps(messages[-1]), api
            assert ids[:-1] == [None] * (len(ids) - 1), api  # only the error carries it


@pytest.mark.slow
async def test_a_hung_worker_is_killed_at_its_deadline_and_the_next_request_restarts_it(
    crash_daemon,
):
    daemon = crash_daemon
    async with aiohttp.ClientSession() as session:
        last, after = await stream_until_crash(session, daemon, signal.SIGSTOP)
        assert last["code"] == "model_crashed", last
        assert f"no progress for {STALL_S:g} s" in last["error"]
        assert STALL_S - 1 < after < STALL_S + 10
        assert workers(daemon) == set()
        await assert_serving(session, daemon, "slow:gguf")  # a new worker, from the start


async def test_the_daemon_maps_no_weights_its_worker_does(crash_daemon):
    daemon = crash_daemon
    assert daemon.process is not None
    async with aiohttp.ClientSession() as session:
        await assert_serving(session, daemon, "slow:gguf")
    (worker,) = workers(daemon)
    blobs = str(daemon.home / "blobs")
    assert blobs not in Path(f"/proc/{daemon.process.pid}/maps").read_text()
    assert blobs in Path(f"/proc/{worker}/maps").read_text()


async def test_a_worker_over_its_memory_limit_is_killed_with_that_reason(tiny_models, tmp_path):
    """A limit below what a worker with llama.cpp loaded holds: killed, reported, not retried
    forever."""
    store = populated_store(tmp_path / "home", tiny_models)
    daemon = Daemon(store.root, env={"MLXSERVE_RUNNER_MEMORY_LIMIT_BYTES": str(20 << 20)}).start()
    try:
        async with aiohttp.ClientSession() as session:
            status, body = await chat(session, daemon, "tiny:gguf")
            assert status == 500, body
            assert body["code"] == "model_crashed"
            assert "over its limit" in body["error"]
            assert workers(daemon) == set()
    finally:
        daemon.stop()


@pytest.mark.parametrize(("value", "isolated"), [("0", False), ("false", False), ("1", True)])
def test_isolation_is_a_setting(monkeypatch, tmp_path, value, isolated):
    from mlxserve.server.config import load_settings

    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("MLXSERVE_ISOLATE_RUNNERS", value)
    assert load_settings().isolate_runners is isolated


def test_a_setting_that_is_not_a_boolean_is_refused(monkeypatch, tmp_path):
    from mlxserve.server.config import ConfigError, load_settings

    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("MLXSERVE_ISOLATE_RUNNERS", "sometimes")
    with pytest.raises(ConfigError, match="isolate_runners"):
        load_settings()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
async def test_a_hung_worker_dies_with_a_daemon_killed_under_it(tiny_models, tmp_path):
    """SIGKILL gives the daemon no chance to stop its workers, and a worker hung inside its
    library never reads its socket again: it must still go (``platform.die_with_parent``)."""
    store = populated_store(tmp_path / "home", tiny_models)
    daemon = Daemon(store.root).start()
    try:
        async with aiohttp.ClientSession() as session:
            await assert_serving(session, daemon, "tiny:gguf")
        (worker,) = workers(daemon)
        os.kill(worker, signal.SIGSTOP)  # hung: it will never see the socket close
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":  # dead, waiting for its new parent to reap it
                break
            await asyncio.sleep(0.05)
        else:
            assert not Path(f"/proc/{worker}").exists(), "the worker outlived its daemon"
    finally:
        daemon.stop()


@pytest.mark.parametrize("source", ["ollama", "lmstudio"])
def test_a_lying_gguf_in_another_apps_store_is_refused_at_import(lying_ggufs, tmp_path, source):
    """``--from-ollama`` / ``--from-lmstudio`` try the model as ``import PATH`` does;
    ``--no-trial`` stores it untried."""
    from tests.fixtures.ollama_store import add_ollama_model

    home, root = tmp_path / "home", tmp_path / source
    if source == "ollama":
        add_ollama_model(root, "liar", "latest", lying_ggufs["block_count"])
        args, env = ["liar:latest"], {"OLLAMA_MODELS": str(root)}
    else:
        folder = root / "someone" / "liar-GGUF"
        folder.mkdir(parents=True)
        shutil.copyfile(lying_ggufs["block_count"], folder / "liar.gguf")
        args, env = ["someone/liar-GGUF"], {"LMSTUDIO_MODELS": str(root)}
    command = ["import", f"--from-{source}", *args, "--name", "liar:1"]
    result = mlxctl(*command, home=home, check=False, env=env)
    assert result.returncode == 1 and "[model_unloadable]" in result.stderr, result.stderr
    assert REFUSALS["block_count"][1] in result.stderr
    assert "liar:1" not in mlxctl("list", home=home).stdout
    mlxctl(*command, "--no-trial", home=home, env=env)
    assert "liar:1" in mlxctl("list", home=home).stdout


async def test_a_batch_steps_chunks_cross_to_the_daemon_in_one_frame(tiny_store, monkeypatch):
    """The worker sends what one batch step made for every request as one frame (one pickle,
    write and read per step, not per token), and the answers are the ones each request gets
    alone."""
    from mlxserve.chat.model import LoadedModel
    from mlxserve.runners import isolated
    from mlxserve.runners.base import RunnerOptions
    from tests.chat_helpers import chat_request

    items_per_frame: list[int] = []
    received = isolated.WorkerRunner._frames

    def counted(self: isolated.WorkerRunner, messages: list[Any]) -> None:
        items_per_frame.append(sum(kind == "item" for kind, _, _ in messages))
        received(self, messages)

    monkeypatch.setattr(isolated.WorkerRunner, "_frames", counted)
    loaded = await LoadedModel.load(
        tiny_store, "tiny:gguf", options=RunnerOptions(max_parallel=4), make=isolated.WorkerRunner
    )

    async def answer(index: int) -> list[int]:
        messages = [{"role": "user", "content": f"Count to {index + 5}."}]
        request = chat_request(loaded, messages, {"temperature": 0, "max_tokens": 24})
        return [token async for chunk in loaded.generate(request) for token in chunk.token_ids]

    try:
        alone = [await answer(index) for index in range(4)]
        items_per_frame.clear()
        together = await asyncio.gather(*(answer(index) for index in range(4)))
    finally:
        await loaded.unload()
    assert together == alone
    with_items = [count for count in items_per_frame if count]
    assert sum(with_items) >= sum(len(tokens) for tokens in alone)
    assert len(with_items) <= sum(with_items) / 2


LOAD_AND_LOOK = """
import asyncio, sys
from pathlib import Path
from mlxserve.chat.model import LoadedModel
from mlxserve.runners.isolated import WorkerRunner
from modelstore.store import ModelStore

async def main():
    before = "mlx_lm.tool_parsers" in sys.modules
    loaded = await LoadedModel.load(ModelStore(Path(sys.argv[1])), "tiny:gguf", make=WorkerRunner)
    after = "mlx_lm.tool_parsers" in sys.modules
    await loaded.unload()
    print(before, after)

asyncio.run(main())
"""


def test_a_chat_models_load_imports_what_its_first_request_needs(tiny_store):
    """The chat core detects a model's family with mlx-lm's code, whose first import in a
    process takes seconds: a daemon pays it while the model loads (beside the worker's own
    load), not in its first request's time to first token (the agent's first turn after a
    restart, ``bench/agent.py``)."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_LOOK, str(tiny_store.root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == ["False", "True"]
