"""The names people type (``mlxctl/names.py``): a bare name from Ollama's library, ``org/repo``
from the Hugging Face hub, a path imported on the fly; a miss names every source tried.

A local ``docker-registry`` holding Ollama-shaped manifests stands in for Ollama's library
(``MLXSERVE_OLLAMA_REGISTRY``), and a Hugging Face cache in the hub's real layout with
``HF_HUB_OFFLINE=1`` for the hub, so nothing here touches the network.
"""

from __future__ import annotations

import json
import shutil

import pytest

from modelstore.store import ModelStore
from tests.cli import mlxctl
from tests.registry import Registry, registry_binary
from tests.test_hf_cache import build_hf_cache
from tests.test_ollama_pull import push_ollama_shaped

NO_DAEMON = {"MLXSERVE_PORT": "1"}
ANSWER = ("--local", "--max-tokens", "2", "--temperature", "0")
needs_registry = pytest.mark.skipif(
    registry_binary() is None,
    reason="docker-registry is not installed (scripts/install-system-deps.sh installs it)",
)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_models):
    """Ollama's library: ``library/tiny:q8``, ``library/tiny:latest``, ``team/tiny:latest``."""
    running = Registry(tmp_path_factory.mktemp("library")).start()
    for repository, tag in [
        ("library/tiny", "q8"),
        ("library/tiny", "latest"),
        ("team/tiny", "latest"),
    ]:
        push_ollama_shaped(running.host, repository, tag, tiny_models.gguf_path)
    yield running
    running.stop()


@pytest.fixture
def env(library, tmp_path, mini_hf_folder) -> dict[str, str]:
    cache = tmp_path / "hf" / "hub"
    build_hf_cache(cache, "TestOrg/Mini-Model", mini_hf_folder)
    return {
        "MLXSERVE_OLLAMA_REGISTRY": library.host,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        **NO_DAEMON,
    }


def pulled(home, *args, env) -> dict:
    return json.loads(mlxctl("pull", "--insecure", "--json", *args, home=home, env=env).stdout)


@needs_registry
def test_a_bare_name_is_pulled_from_ollamas_library(store_home, env):
    assert pulled(store_home, "tiny:q8", env=env)["name"] == "tiny:q8"
    assert pulled(store_home, "tiny", env=env)["name"] == "tiny:latest"


@needs_registry
def test_run_pulls_a_bare_name_first_then_uses_the_stored_one(store_home, env):
    first = mlxctl("run", "--insecure", *ANSWER, "tiny:q8", "Hi", home=store_home, env=env)
    assert first.stdout.strip()
    assert ModelStore(store_home).exists("tiny:q8")
    offline = {**env, "MLXSERVE_OLLAMA_REGISTRY": "127.0.0.1:9"}
    again = mlxctl("run", *ANSWER, "tiny:q8", "Hi", home=store_home, env=offline)
    assert again.stdout.strip(), "a stored model is run without asking any registry"


@needs_registry
def test_org_repo_comes_from_the_hugging_face_hub(store_home, env):
    assert pulled(store_home, "TestOrg/Mini-Model", env=env)["name"] == (
        "hf.co/testorg/mini-model:latest"
    )


@needs_registry
def test_a_lower_case_org_repo_missing_on_the_hub_falls_back_to_ollama(store_home, env):
    assert pulled(store_home, "team/tiny", env=env)["name"] == "team/tiny:latest"


@needs_registry
def test_a_miss_names_every_source_tried_and_the_command_for_each(store_home, env):
    result = mlxctl("pull", "--insecure", "someone/absent", home=store_home, env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Error [model_not_found]" in result.stderr
    assert "Hugging Face (hf://someone/absent)" in result.stderr
    assert f"Ollama's library (ollama://{env['MLXSERVE_OLLAMA_REGISTRY']}/someone/absent)" in (
        result.stderr
    )
    assert "mlxctl pull hf://someone/absent" in result.stderr
    assert "mlxctl import PATH" in result.stderr


@needs_registry
def test_run_with_an_upper_case_hub_id_is_a_model_not_a_prompt(store_home, env):
    result = mlxctl(
        "run", "--insecure", "Absent-Org/Qwen3-0.6B-4bit", home=store_home, env=env, check=False
    )
    assert result.returncode == 1
    assert "mlxctl pull hf://Absent-Org/Qwen3-0.6B-4bit" in result.stderr
    assert "name the registry" not in result.stderr


def test_run_imports_a_path_on_the_fly_under_a_derived_name(store_home, tiny_models, tmp_path):
    model = tmp_path / "My_Tiny.Q8_0.gguf"
    shutil.copyfile(tiny_models.gguf_path, model)
    result = mlxctl("run", *ANSWER, str(model), "Hi", home=store_home, env=NO_DAEMON)
    assert result.stdout.strip()
    assert "imported" in result.stderr and "my_tiny.q8_0:latest" in result.stderr
    folder = tmp_path / "Tiny-Model"
    shutil.copytree(tiny_models.hf_folder, folder)
    relative = mlxctl(
        "run", *ANSWER, "./Tiny-Model", "Hi", home=store_home, env=NO_DAEMON, cwd=tmp_path
    )
    assert relative.stdout.strip()
    assert ModelStore(store_home).exists("tiny-model")


def test_import_derives_the_name_when_none_is_given(store_home, tiny_models):
    out = json.loads(mlxctl("import", str(tiny_models.hf_folder), "--json", home=store_home).stdout)
    assert out[0]["name"] == f"{tiny_models.hf_folder.name.lower()}:latest"


def test_a_hub_repo_of_ggufs_gives_one_file_and_gguf_wins_off_apple_silicon(
    store_home, tiny_models, mini_hf_folder, tmp_path
):
    from mlxserve.platform import is_apple_silicon
    from modelstore.hfhub import choose_gguf

    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    for quant in ("Q8_0", "Q4_K_M"):
        shutil.copyfile(tiny_models.gguf_path, ggufs / f"Tiny-{quant}.gguf")
    both = tmp_path / "both"
    shutil.copytree(mini_hf_folder, both)
    shutil.copyfile(tiny_models.gguf_path, both / "tiny-Q8_0.gguf")
    cache = tmp_path / "hf" / "hub"
    build_hf_cache(cache, "TestOrg/Tiny-GGUF", ggufs)
    build_hf_cache(cache, "TestOrg/Both", both)
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    assert choose_gguf(["a-Q8_0.gguf", "a-Q4_K_M.gguf", "mmproj-a-F16.gguf"]) == "a-Q4_K_M.gguf"
    name = pulled(store_home, "TestOrg/Tiny-GGUF", env=env)["name"]
    shown = json.loads(mlxctl("show", name, "--json", home=store_home).stdout)
    assert shown["format"] == "gguf"
    assert [layer["title"] for layer in shown["layers"] if layer["title"].endswith(".gguf")] == [
        "Tiny-Q4_K_M.gguf"
    ]
    name = pulled(store_home, "TestOrg/Both", env=env)["name"]
    shown = json.loads(mlxctl("show", name, "--json", home=store_home).stdout)
    assert shown["format"] == ("mlx" if is_apple_silicon() else "gguf")
