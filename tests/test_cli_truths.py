"""The CLI's small truths (issue 23): aliases, tables that are never cut when piped, ``ps`` and
``stop`` with ``--host`` and an honest ``UNTIL``, ``stop`` of a model not loaded, ``spec
validate`` of several files with every error in one pass, ``verify`` naming the bad file and
the fix, and an overflow error that says how to raise the context."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from mlxctl.daemon_commands import FOREVER, until
from mlxctl.output import human_size
from mlxserve.errors import ContextOverflowError
from mlxserve.runners.base import GenerateRequest
from mlxserve.runners.decode import generation_budget
from modelstore import mediatypes
from modelstore.default_model import DEFAULT_SPEC
from modelstore.importer import import_path
from modelstore.store import ModelStore
from tests.cli import mlxctl

LONG_NAME = "team/" + "a-rather-long-model-name-that-a-table-would-cut" + ":some-long-tag-too"


def test_ls_and_help_are_aliases(tiny_store):
    assert mlxctl("ls", home=tiny_store.root).stdout == mlxctl("list", home=tiny_store.root).stdout
    assert "Usage: mlxctl list" in mlxctl("help", "list", home=tiny_store.root).stdout
    assert "Commands:" in mlxctl("help", home=tiny_store.root).stdout


def test_list_into_a_pipe_is_never_cut(store_home, mini_hf_folder):
    import_path(ModelStore(store_home), mini_hf_folder, LONG_NAME)
    out = mlxctl("list", home=store_home, env={"COLUMNS": "40"}).stdout
    assert LONG_NAME in out and "…" not in out


def test_until_reads_as_relative_time():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = (now + timedelta(minutes=4, seconds=30)).isoformat().replace("+00:00", "Z")
    assert until(later, now) == "4 minutes from now"
    assert until(FOREVER, now) == "Forever"


def test_ps_and_stop_take_host_and_stop_refuses_what_is_not_loaded(daemon, tmp_path):
    host = f"127.0.0.1:{daemon.port}"
    elsewhere = {"MLXSERVE_HOST": "127.0.0.1:1"}  # --host must win over the environment
    mlxctl("run", "--host", host, "tiny:gguf", "Hi", "--max-tokens", "1", home=daemon.home)
    ps = mlxctl("ps", "--host", host, home=tmp_path, env=elsewhere).stdout
    assert "tiny:gguf" in ps and "from now" in ps
    assert not re.search(r"\d{4}-\d\d-\d\dT", ps), "UNTIL is a relative time, not a timestamp"
    refused = mlxctl("stop", "--host", host, "tiny:mlx", home=tmp_path, env=elsewhere, check=False)
    assert refused.returncode == 1 and "is not loaded" in refused.stderr
    assert "tiny:gguf" in refused.stderr, "the error lists what is loaded"
    stopped = mlxctl("stop", "--host", host, "tiny:gguf", home=tmp_path, env=elsewhere)
    assert "stopped tiny:gguf" in stopped.stdout
    after = json.loads(mlxctl("ps", "--host", host, "--json", home=tmp_path).stdout)
    assert after["models"] == []


def test_ps_shows_the_memory_a_model_holds_beside_its_file_size(daemon, tmp_path):
    host = f"127.0.0.1:{daemon.port}"
    mlxctl("run", "--host", host, "tiny:gguf", "Hi", "--max-tokens", "1", home=daemon.home)
    models = json.loads(mlxctl("ps", "--host", host, "--json", home=tmp_path).stdout)["models"]
    (entry,) = [model for model in models if model["name"] == "tiny:gguf"]
    assert entry["memory_bytes"] > entry["kv_cache_bytes"] > 0, "weights and KV cache"
    assert entry["memory_bytes"] != entry["size"], "memory is not the file size"
    table = mlxctl("ps", "--host", host, home=tmp_path).stdout
    header, *rows = [line.strip() for line in table.splitlines()]
    assert header.split()[2:4] == ["SIZE", "MEMORY"]
    (row,) = [line for line in rows if line.startswith("tiny:gguf")]
    assert row.split()[2:6] == [
        *human_size(entry["size"]).split(),
        *human_size(entry["memory_bytes"]).split(),
    ]


def test_spec_validate_reports_every_error_of_every_file_in_one_pass(tmp_path, store_home):
    good = tmp_path / "good.yaml"
    good.write_text(DEFAULT_SPEC.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("from: ./nowhere.gguf\nparameters:\n  temperature: -1\n")
    result = mlxctl("spec", "validate", str(good), str(bad), home=store_home, check=False)
    assert result.returncode == 1
    assert f"{good}: valid" in result.stdout
    assert "/parameters/temperature" in result.stderr, "the range error"
    assert "nowhere.gguf: no such file" in result.stderr, "the semantic error, same pass"
    assert f"{bad}: 2 error(s)" in result.stderr
    both = json.loads(
        mlxctl(
            "spec", "validate", str(good), str(bad), "--json", home=store_home, check=False
        ).stdout
    )
    assert [report["valid"] for report in both] == [True, False]


def test_verify_names_the_bad_file_and_the_fix(store_home, mini_hf_folder):
    store = ModelStore(store_home)
    model = import_path(store, mini_hf_folder, "mini:1").models[0]
    (weights,) = model.manifest.layers_of(mediatypes.WEIGHTS_SAFETENSORS)
    blob = store.blobs.path(weights.digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    result = mlxctl("verify", home=store_home, check=False)
    assert result.returncode == 1
    assert str(blob) in result.stderr and "model.safetensors of mini:1" in result.stderr
    assert "Fix: mlxctl rm mini:1, then import or pull it again" in result.stderr


def test_the_overflow_error_says_how_to_raise_the_context():
    with pytest.raises(ContextOverflowError) as info:
        generation_budget(GenerateRequest(prompt="x"), prompt_tokens=10, context=8)
    assert "num_ctx" in info.value.message and "context_length" in info.value.message


def test_verbose_through_the_daemon_shows_the_load_time(daemon, tmp_path):
    host = f"127.0.0.1:{daemon.port}"
    loaded = json.loads(mlxctl("ps", "--host", host, "--json", home=tmp_path).stdout)["models"]
    if any(model["name"] == "tiny:gguf" for model in loaded):
        mlxctl("stop", "--host", host, "tiny:gguf", home=tmp_path)
    result = mlxctl(
        "run", "--verbose", "--host", host, "tiny:gguf", "Hi", "--max-tokens", "1", home=daemon.home
    )
    seconds = float(re.search(r"load duration:\s+([\d.]+)s", result.stderr).group(1))
    assert seconds > 0, "the load happened before the answer, and counts"
