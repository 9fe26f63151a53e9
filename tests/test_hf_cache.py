"""``mlxctl import --from-hf-cache`` and ``mlxctl pull hf://`` over a Hugging Face cache that the
test builds in the hub's real layout (``models--ORG--REPO/{blobs,refs,snapshots}``), with
``HF_HUB_OFFLINE=1``: nothing may touch the network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from modelstore.hfhub import HubModel
from tests.cli import mlxctl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder``'s files out as ``huggingface_hub`` would after a download."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return repo_dir


@pytest.fixture
def hf_env(tmp_path: Path, mini_hf_folder: Path) -> dict[str, str]:
    cache = tmp_path / "hf" / "hub"
    build_hf_cache(cache, "TestOrg/Mini-Model", mini_hf_folder)
    return {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_lists_what_the_cache_holds(store_home, hf_env):
    listed = json.loads(
        mlxctl("import", "--from-hf-cache", "--json", home=store_home, env=hf_env).stdout
    )
    assert [(m["repo_id"], m["revision"], m["refs"]) for m in listed] == [
        ("TestOrg/Mini-Model", COMMIT, ["main"])
    ]
    assert listed[0]["name"] == "hf.co/testorg/mini-model:main"
    table = mlxctl("import", "--from-hf-cache", home=store_home, env=hf_env).stdout
    assert "TestOrg/Mini-Model" in table and "IMPORTS AS" in table


def test_imports_from_the_cache_with_hard_links(store_home, hf_env, mini_hf_folder):
    out = json.loads(
        mlxctl(
            "import", "--from-hf-cache", "TestOrg/Mini-Model", "--json", home=store_home, env=hf_env
        ).stdout
    )
    assert out[0]["name"] == "hf.co/testorg/mini-model:main"
    assert out[0]["files"]["model.safetensors"] == "hardlink"
    cache = Path(hf_env["HF_HUB_CACHE"])
    weights = hashlib.sha256((mini_hf_folder / "model.safetensors").read_bytes()).hexdigest()
    cached_blob = cache / "models--TestOrg--Mini-Model" / "blobs" / weights
    assert cached_blob.stat().st_nlink == 2, "the store keeps a second copy of the weights"
    shown = json.loads(mlxctl("show", out[0]["name"], "--json", home=store_home).stdout)
    assert shown["format"] == "mlx"


def test_pull_hf_uses_the_cache_without_network(store_home, hf_env):
    pulled = json.loads(
        mlxctl("pull", "hf://TestOrg/Mini-Model", "--json", home=store_home, env=hf_env).stdout
    )
    imported = json.loads(
        mlxctl(
            "import",
            "--from-hf-cache",
            "TestOrg/Mini-Model@main",
            "--name",
            "again:1",
            "--json",
            home=store_home,
            env=hf_env,
        ).stdout
    )
    assert pulled["name"] == "hf.co/testorg/mini-model:latest"
    assert pulled["digest"] == imported[0]["digest"]
    named = json.loads(
        mlxctl(
            "pull",
            f"hf://TestOrg/Mini-Model@{COMMIT}",
            "--name",
            "mini:hf",
            "--json",
            home=store_home,
            env=hf_env,
        ).stdout
    )
    assert named["name"] == "mini:hf" and named["digest"] == pulled["digest"]


def test_missing_repo_offline_is_a_clear_error(store_home, hf_env):
    missing = mlxctl("pull", "hf://TestOrg/Absent", home=store_home, env=hf_env, check=False)
    assert missing.returncode == 1
    assert "Error [model_not_found]" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    cached = mlxctl(
        "import", "--from-hf-cache", "TestOrg/Absent", home=store_home, env=hf_env, check=False
    )
    assert cached.returncode == 1 and "Error [model_not_found]" in cached.stderr
    bad = mlxctl("pull", "hf://../etc", home=store_home, env=hf_env, check=False)
    assert bad.returncode == 1 and "Error [invalid_reference]" in bad.stderr


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (
            "hf://mlx-community/SmolLM2-135M-Instruct",
            "hf.co/mlx-community/smollm2-135m-instruct:latest",
        ),
        ("Qwen/Qwen2.5_0.5B@v1.0", "hf.co/qwen/qwen2-5-0-5b:v1.0"),
    ],
)
def test_hub_names_fold_into_the_reference_grammar(text, name):
    assert HubModel.parse(text).store_name() == name
