"""``mlxctl`` store and spec commands, run as a user runs them: a real process, real exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelstore.default_model import DEFAULT_SPEC
from modelstore.store import ModelStore
from tests.cli import MLXCTL, mlxctl


def test_import_list_show_cp_rm_gc(store_home, mini_hf_folder):
    out = mlxctl(
        "import", str(mini_hf_folder), "--name", "mini:1", "--link", home=store_home
    ).stdout
    assert "imported mini:1" in out
    assert "hard-linked" in out
    listed = json.loads(mlxctl("list", "--json", home=store_home).stdout)["models"]
    assert [m["name"] for m in listed] == ["mini:1"]
    assert "mini:1" in mlxctl("list", home=store_home).stdout
    shown = json.loads(mlxctl("show", "mini:1", "--json", home=store_home).stdout)
    assert shown["format"] == "mlx"
    storage = {layer["title"]: layer["storage"] for layer in shown["layers"]}
    assert storage["model.safetensors"] == "hardlink"
    assert "STORED AS" in mlxctl("show", "mini:1", home=store_home).stdout
    mlxctl("cp", "mini:1", "mini:2", home=store_home)
    mlxctl("rm", "mini:1", home=store_home)
    gc = json.loads(mlxctl("gc", "--json", home=store_home).stdout)
    assert gc["removed"] == []
    mlxctl("rm", "mini:2", home=store_home)
    assert len(json.loads(mlxctl("gc", "--json", home=store_home).stdout)["removed"]) == 6


def test_errors_carry_a_stable_code_and_exit_1(store_home):
    result = mlxctl("show", "nothing:here", home=store_home, check=False)
    assert result.returncode == 1
    assert "Error [model_not_found]" in result.stderr
    result = mlxctl("rm", "../etc", home=store_home, check=False)
    assert result.returncode == 1
    assert "Error [invalid_reference]" in result.stderr


def test_verify_exits_1_and_names_the_bad_blob(store_home, mini_hf_folder):
    mlxctl("import", str(mini_hf_folder), "--name", "mini:1", "--copy", home=store_home)
    assert json.loads(mlxctl("verify", "--json", home=store_home).stdout)["ok"] is True
    shown = json.loads(mlxctl("show", "mini:1", "--json", home=store_home).stdout)
    config = next(layer for layer in shown["layers"] if layer["title"] == "config.json")
    blob = store_home / "blobs/sha256" / config["digest"].removeprefix("sha256:")
    blob.write_text(blob.read_text().replace("llama", "llamb"))
    result = mlxctl("verify", home=store_home, check=False)
    assert result.returncode == 1
    assert config["digest"] in result.stderr and "mini:1" in result.stderr
    report = json.loads(mlxctl("verify", "--json", home=store_home, check=False).stdout)
    assert report["problems"][0]["digest"] == config["digest"]


def test_spec_validate_prints_each_error_with_its_line(tmp_path, store_home):
    spec = tmp_path / "bad.yaml"
    spec.write_text("from: ./missing\nparameters:\n  top_p: 7\n")
    result = mlxctl("spec", "validate", str(spec), home=store_home, check=False)
    assert result.returncode == 1
    assert f"{spec}:3: /parameters/top_p:" in result.stderr
    report = json.loads(
        mlxctl("spec", "validate", str(spec), "--json", home=store_home, check=False).stdout
    )
    assert report["valid"] is False
    # the schema's error and the semantic one (no such file), in one pass
    assert {e["pointer"] for e in report["errors"]} == {"/parameters/top_p", "/from"}
    good = mlxctl("spec", "validate", str(DEFAULT_SPEC), home=store_home)
    assert "valid" in good.stdout


def test_spec_pack_twice_is_byte_identical_and_imports_back(tmp_path, store_home):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    mlxctl("spec", "pack", str(DEFAULT_SPEC), "-o", str(first), home=store_home)
    mlxctl("spec", "pack", str(DEFAULT_SPEC), "-o", str(second), home=store_home)
    assert first.read_bytes() == second.read_bytes()
    mlxctl("import", str(first), home=store_home)
    listed = json.loads(mlxctl("list", "--json", home=store_home).stdout)["models"]
    assert [m["name"] for m in listed] == ["smollm2:135m"]
    assert mlxctl("verify", home=store_home).returncode == 0


def test_create_builds_from_a_spec(tmp_path, store_home, mini_hf_folder):
    spec = mini_hf_folder.parent / "mini.yaml"
    spec.write_text("from: ./mini-model\nsystem: Hi.\n")
    mlxctl("create", "made:1", "-f", str(spec), home=store_home)
    shown = json.loads(mlxctl("show", "made:1", "--json", home=store_home).stdout)
    assert shown["system"] == "Hi."


@pytest.mark.parametrize("command", ["list", "show", "verify", "import", "gc", "spec", "cache"])
def test_store_commands_never_import_heavy_libraries(command, store_home):
    probe = (
        "import sys\n"
        "from mlxctl.cli import cli\n"
        f"cli.get_command(None, {command!r})\n"
        "heavy = [m for m in ('mlx', 'mlx_lm', 'transformers', 'llama_cpp', 'torch', 'aiohttp')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_help_lists_every_command(store_home):
    out = mlxctl("--help", home=store_home).stdout
    for command in (
        "run",
        "serve",
        "pull",
        "push",
        "list",
        "show",
        "rm",
        "cp",
        "import",
        "verify",
        "ps",
        "stop",
        "create",
        "spec",
        "gc",
    ):
        assert command in out


def test_import_names_a_folder_after_it_when_no_name_is_given(store_home, mini_hf_folder):
    result = mlxctl("import", str(mini_hf_folder), home=store_home, check=False)
    assert result.returncode == 0, result.stderr
    assert ModelStore(store_home).exists("mini-model:latest")
    assert shutil.which(MLXCTL) or Path(MLXCTL).exists()
