"""One model sharded over two ranks on this machine: mlx's ring backend over loopback.

Two real ``mlxserve --distributed`` processes (rank 0 serves HTTP, rank 1 only follows), each
with its own store, serving the tiny llama fixture (4 heads, 2 KV heads: tensor parallel splits
them evenly), checked against the same model in one ordinary daemon. The test that kills rank 1
runs last on the module's group, since it breaks it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cli import mlxctl
from tests.conftest import populated_store
from tests.daemon import MLXSERVE, Daemon, free_port, free_ring_port

PROMPTS = ["The capital of France", "Hello world! How are", "Once upon a time there", "The cat"]
GREEDY = {"temperature": 0, "num_predict": 24}
STEP_TIMEOUT_S = "5"
"""Short, so a rank that is killed mid-step is noticed within seconds however the ring fails."""
FAILURE_BOUND_S = 15.0
"""How long a client may wait for its error once rank 1 dies (the step timeout plus slack for
a loaded machine); without failure detection it would wait forever."""
HOSTS = ("rank0-host", "rank1-host")


def write_hostfile(path: Path) -> Path:
    """mlx's hostfile format (as ``mlx.distributed_config`` writes it), both ranks on loopback."""
    hosts = [{"ssh": name, "ips": ["127.0.0.1"], "rdma": []} for name in HOSTS]
    path.write_text(json.dumps({"backend": "ring", "envs": [], "hosts": hosts}))
    return path


def start_follower(home: Path, hostfile: Path, ring_port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            MLXSERVE,
            "--distributed",
            str(hostfile),
            "--model",
            "tiny:mlx",
            "--rank",
            "1",
            "--ring-port",
            str(ring_port),
        ],
        env={**os.environ, "MLXSERVE_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )


def group_flags(hostfile: Path, ring_port: int) -> list[str]:
    return [
        "--distributed",
        str(hostfile),
        "--model",
        "tiny:mlx",
        "--rank",
        "0",
        "--ring-port",
        str(ring_port),
    ]


def start_group(
    root: Path, tiny_models, step_timeout: str = STEP_TIMEOUT_S
) -> tuple[Daemon, subprocess.Popen]:
    """Rank 1 (follower) and rank 0 (the daemon) over two stores holding the same model,
    started back to back: mlx's ring gives up on a peer that is not there within ~30 s."""
    hostfile = write_hostfile(root / "hosts.json")
    ring_port = free_ring_port()
    homes = [populated_store(root / f"home{rank}", tiny_models).root for rank in (0, 1)]
    follower = start_follower(homes[1], hostfile, ring_port, root / "rank1.log")
    leader = Daemon(
        homes[0],
        group_flags(hostfile, ring_port),
        {"MLXSERVE_GROUP_STEP_TIMEOUT_S": step_timeout},
    )
    try:
        leader.start()
    except RuntimeError:
        follower.kill()
        raise
    return leader, follower


def stop_group(leader: Daemon, follower: subprocess.Popen) -> None:
    leader.stop()
    if follower.poll() is None:
        follower.kill()
    follower.wait()


@pytest.fixture(scope="module")
def group(tiny_models, tmp_path_factory):
    leader, follower = start_group(tmp_path_factory.mktemp("group"), tiny_models)
    yield leader, follower
    stop_group(leader, follower)


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data), timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def greedy_answers(url: str, concurrently: bool) -> list[tuple[str, int]]:
    def ask(prompt: str) -> tuple[str, int]:
        status, _, body = call(
            url,
            "/api/generate",
            {"model": "tiny:mlx", "prompt": prompt, "stream": False, "options": GREEDY},
        )
        assert status == 200, body
        return body["response"], body["eval_count"]

    if not concurrently:
        return [ask(prompt) for prompt in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(ask, PROMPTS))


def test_sharded_greedy_tokens_match_one_process(group, daemon):
    leader, _ = group
    assert greedy_answers(leader.url, False) == greedy_answers(daemon.url, False)


def test_batched_concurrent_requests_match_one_process(group, daemon):
    leader, _ = group
    sharded = greedy_answers(leader.url, True)
    assert sharded == greedy_answers(daemon.url, True)
    assert len(set(sharded)) == len(PROMPTS)


@pytest.mark.parametrize(
    "extra",
    [
        {"options": {"temperature": 0.9, "seed": 7, "num_predict": 24}},
        {"format": "json", "options": {"temperature": 0, "num_predict": 40}},
    ],
    ids=["seeded-sampling", "json-grammar"],
)
def test_sampling_and_grammars_run_on_rank_0_and_match_one_process(group, daemon, extra):
    leader, _ = group
    body = {"model": "tiny:mlx", "prompt": PROMPTS[0], "stream": False, **extra}
    answers = [call(url, "/api/generate", body)[2]["response"] for url in (leader.url, daemon.url)]
    assert answers[0] == answers[1]
    if "format" in extra:
        assert answers[0].startswith("{")  # the grammar, applied on rank 0 only, took effect


def test_ps_shows_the_group(group):
    leader, _ = group
    _, _, body = call(leader.url, "/api/ps")
    (model,) = body["models"]
    distributed = model["distributed"]
    assert distributed["backend"] == "ring"
    assert distributed["status"] == "ok"
    assert [(r["rank"], r["host"]) for r in distributed["ranks"]] == list(enumerate(HOSTS))
    assert all(r["memory_bytes"] > 0 for r in distributed["ranks"])
    shown = mlxctl("ps", home=leader.home, env={"MLXSERVE_PORT": str(leader.port)}).stdout
    assert "2 ranks, ring backend, tensor parallel, ok" in shown
    assert "rank 1  rank1-host" in shown


def test_a_mismatched_store_on_rank_1_is_refused_naming_the_host(tiny_models, tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts.json")
    ring_port = free_ring_port()
    other = populated_store(tmp_path / "home1", tiny_models)
    other.remove("tiny:mlx")
    other.copy("tiny:gguf", "tiny:mlx")  # the same name for a different model
    home = populated_store(tmp_path / "home0", tiny_models).root
    follower = start_follower(other.root, hostfile, ring_port, tmp_path / "rank1.log")
    leader = subprocess.run(
        [MLXSERVE, "--port", str(free_port()), *group_flags(hostfile, ring_port)],
        env={**os.environ, "MLXSERVE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    follower.wait(timeout=60)
    assert leader.returncode == 1
    assert "distributed_error" in leader.stderr
    assert "rank 1 (rank1-host)" in leader.stderr
    assert "serving tiny:mlx" not in leader.stderr


@pytest.mark.parametrize(
    ("hosts", "flags", "message"),
    [
        ([{"ssh": "a", "ips": ["127.0.0.1"]}], ["--model", "tiny:mlx"], "at least two hosts"),
        (HOSTS, ["--model", "tiny:mlx", "--rank", "5"], "rank 5 is not in the hostfile"),
        (HOSTS, [], "--distributed needs --model"),
    ],
    ids=["one-host", "rank-out-of-range", "no-model"],
)
def test_a_group_that_cannot_start_is_a_clear_error(tmp_path, hosts, flags, message):
    hostfile = tmp_path / "hosts.json"
    entries = [h if isinstance(h, dict) else {"ssh": h, "ips": ["127.0.0.1"]} for h in hosts]
    hostfile.write_text(json.dumps({"hosts": entries}))
    result = subprocess.run(
        [MLXSERVE, "--distributed", str(hostfile), *flags],
        env={**os.environ, "MLXSERVE_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def fail_rank_1_mid_generation(leader: Daemon, follower: subprocess.Popen, how: int) -> float:
    """Stream a long answer, send ``how`` to rank 1 after a few tokens, and return how long the
    client then waited for its error (the test fails on a hang: no error within 60 s)."""
    request = urllib.request.Request(
        leader.url + "/api/generate",
        json.dumps(
            {
                "model": "tiny:mlx",
                "prompt": "Hi",
                "options": {"temperature": 0, "num_predict": 1800},
            }
        ).encode(),
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = iter(response)
        for _ in range(3):
            assert "error" not in json.loads(next(lines))
        follower.send_signal(how)
        failed_at = time.monotonic()
        last = {}
        for line in lines:
            last = json.loads(line)
            if "error" in last or last.get("done"):
                break
        waited = time.monotonic() - failed_at
    assert last.get("code") == "model_unavailable", last
    return waited


def assert_unavailable_but_serving_others(leader: Daemon) -> None:
    status, headers, body = call(
        leader.url, "/api/generate", {"model": "tiny:mlx", "prompt": "Hi", "stream": False}
    )
    assert (status, body["code"]) == (503, "model_unavailable")
    assert headers["Retry-After"]
    _, _, ps = call(leader.url, "/api/ps")
    (distributed,) = [m["distributed"] for m in ps["models"] if "distributed" in m]
    assert distributed["status"] == "unavailable"
    status, _, body = call(
        leader.url,
        "/api/generate",
        {"model": "tiny:gguf", "prompt": "Hi", "stream": False, "options": GREEDY},
    )
    assert status == 200, body


def test_killing_rank_1_mid_generation_fails_the_client_within_seconds(group):
    """Runs last: it breaks the module's group."""
    leader, follower = group
    assert fail_rank_1_mid_generation(leader, follower, signal.SIGKILL) < FAILURE_BOUND_S
    assert_unavailable_but_serving_others(leader)


@pytest.mark.slow
def test_a_hung_rank_1_is_noticed_within_the_step_timeout(tiny_models, tmp_path):
    leader, follower = start_group(tmp_path, tiny_models)
    try:
        assert fail_rank_1_mid_generation(leader, follower, signal.SIGSTOP) < FAILURE_BOUND_S
        assert_unavailable_but_serving_others(leader)
    finally:
        stop_group(leader, follower)


def test_pipeline_on_an_architecture_without_it_is_a_clear_error(tiny_models):
    """mlx-lm 0.32's llama has no ``pipeline``: ``--pipeline`` names the fix, not a ValueError."""
    import mlx.core as mx

    from mlxserve.distributed.group import Group, GroupPlan
    from mlxserve.distributed.runner import _ShardedRunner
    from mlxserve.errors import DistributedError

    group = Group(mx.distributed.init(), GroupPlan(hosts=["localhost"], rank=0, backend="ring"))
    runner = _ShardedRunner(group, pipeline=True)
    with pytest.raises(DistributedError, match="--pipeline is not supported"):
        runner._load_weights(Path(tiny_models.hf_folder))


@pytest.mark.parametrize("feature", ["draft", "kv_cache_type"])
def test_features_that_run_one_sequence_in_one_process_are_refused_for_a_group(
    tiny_models, tmp_path, feature
):
    """Drafts and quantized KV caches run solo on mlx-lm's loop in one process, which the
    other ranks would never follow: refused when the group starts, not hung on at a step."""
    import dataclasses

    from mlxserve.distributed.runner import refuse_solo_features
    from mlxserve.errors import UnsupportedFeatureError
    from mlxserve.runners.base import RunnerOptions
    from modelstore.runtime import open_model

    model = open_model(populated_store(tmp_path / "home", tiny_models), "tiny:mlx")
    refuse_solo_features(model, RunnerOptions())
    if feature == "draft":
        model = dataclasses.replace(model, draft=model)
    else:
        model = dataclasses.replace(model, parameters={"kv_cache_type": "q8_0"})
    with pytest.raises(UnsupportedFeatureError, match="distributed group"):
        refuse_solo_features(model, RunnerOptions())


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(int(os.environ.get("MLXSERVE_REPEAT_FAILOVER", "1"))))
def test_another_mlx_model_on_rank_0_still_answers_after_rank_1_dies(
    tiny_models, tmp_path, attempt
):
    """After rank 1 dies mid-step, a non-distributed MLX model on rank 0 (the same weights
    under another name, so its own runner and engine thread) must answer within a bound:
    a collective left pending in mlx must not stall the rest of the process."""
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    leader, follower = start_group(tmp_path, tiny_models)
    try:
        import_path(ModelStore(leader.home), tiny_models.hf_folder, "other:mlx")
        fail_rank_1_mid_generation(leader, follower, signal.SIGKILL)
        started = time.monotonic()
        status, _, body = call(
            leader.url,
            "/api/generate",
            {"model": "other:mlx", "prompt": "Hi", "stream": False, "options": GREEDY},
        )
        assert status == 200, body
        assert time.monotonic() - started < FAILURE_BOUND_S
    finally:
        stop_group(leader, follower)


def test_another_mlx_model_answers_while_a_group_collective_is_pending(tiny_models, tmp_path):
    """The stall above, made certain: rank 1 stopped mid-generation leaves rank 0's step
    pending in mlx (for the whole, long step timeout). Off Metal, ``mx.clear_cache`` (which
    mlx-lm calls during every prefill) would wait for that step holding the GIL, so the other
    model, and the daemon with it, stalled past the client's 60 s (``hold_mlx_cache``). A new
    prompt: one the other model's prompt cache holds would skip the prefill."""
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    leader, follower = start_group(tmp_path, tiny_models, step_timeout="40")
    other = {"model": "other:mlx", "prompt": "Hi", "stream": False, "options": GREEDY}
    try:
        import_path(ModelStore(leader.home), tiny_models.hf_folder, "other:mlx")
        assert call(leader.url, "/api/generate", other)[0] == 200  # loaded before the stop
        body = {"model": "tiny:mlx", "prompt": "Hi", "options": {"num_predict": 1800}}
        request = urllib.request.Request(leader.url + "/api/generate", json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            lines = iter(response)
            for _ in range(3):
                assert "error" not in json.loads(next(lines))
            follower.send_signal(signal.SIGSTOP)
            time.sleep(0.5)  # rank 0's next step is now waiting on rank 1
            started = time.monotonic()
            again = {**other, "prompt": "The capital of France is a long way from"}
            status, _, answer = call(leader.url, "/api/generate", again)
            assert status == 200, answer
            assert time.monotonic() - started < FAILURE_BOUND_S
    finally:
        follower.send_signal(signal.SIGCONT)
        stop_group(leader, follower)
