"""``mlxctl`` with a daemon up: ``run`` goes through it, ``ps`` and ``stop`` manage it."""

from __future__ import annotations

import json
import subprocess

from tests.cli import mlxctl as run_mlxctl


def mlxctl(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``mlxctl`` pointed at this daemon (its store and its port)."""
    return run_mlxctl(
        *args, home=daemon.home, check=False, timeout=120, env={"MLXSERVE_PORT": str(daemon.port)}
    )


def test_run_uses_the_daemon_when_it_is_up(daemon):
    before = daemon.log().count("/api/generate")
    result = mlxctl(daemon, "run", "tiny:gguf", "Hello", "--max-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 4
    assert daemon.log().count("/api/generate") > before


def test_local_flag_runs_in_process(daemon):
    before = daemon.log().count("/api/generate")
    result = mlxctl(daemon, "run", "--local", "tiny:gguf", "Hello", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert daemon.log().count("/api/generate") == before


def test_ps_and_stop(daemon):
    mlxctl(daemon, "run", "tiny:gguf", "Hi", "--max-tokens", "1")
    listed = json.loads(mlxctl(daemon, "ps", "--json").stdout)["models"]
    assert "tiny:gguf" in {m["name"] for m in listed}
    assert "tiny:gguf" in mlxctl(daemon, "ps").stdout
    assert mlxctl(daemon, "stop", "tiny:gguf").returncode == 0
    listed = json.loads(mlxctl(daemon, "ps", "--json").stdout)["models"]
    assert "tiny:gguf" not in {m["name"] for m in listed}


def test_ps_without_a_daemon_says_so(tmp_path):
    result = run_mlxctl("ps", home=tmp_path, check=False, env={"MLXSERVE_PORT": "1"})
    assert result.returncode == 1
    assert "daemon_unavailable" in result.stderr
