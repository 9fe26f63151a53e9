"""Runners are plugins: found through the ``mlxserve.runners`` entry-point group, so a package
outside this repository adds one by installing itself (here: a real ``.dist-info`` on
``sys.path``, read by ``importlib.metadata`` like any installed package)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mlxserve.errors import UnsupportedFormatError
from mlxserve.runners.registry import ENTRY_POINT_GROUP, plugins
from mlxserve.runners.select import choose_runner, make_runner
from modelstore.runtime import open_model

ECHO_PACKAGE = """
from mlxserve.runners.registry import RunnerPlugin

PLUGIN = RunnerPlugin(
    name="echo",
    factory="echo_runner.runner:EchoRunner",
    formats=("gguf",),
    capabilities=("completion",),
    requires=("echo_runner",),
    install_hint="pip install echo-runner",
)
"""


def install_package(site: Path, name: str, entry_points: str, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(textwrap.dedent(text))
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages folder on ``sys.path``; the registry is re-read with it, then without."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    plugins.cache_clear()
    yield folder
    plugins.cache_clear()


def test_built_in_runners_are_registered_through_entry_points():
    assert {"mlx", "llamacpp", "mlx-embeddings", "llamacpp-embeddings"} <= set(plugins())


def test_an_installed_package_adds_a_runner(site, tiny_store):
    install_package(
        site,
        "echo_runner",
        "echo = echo_runner:PLUGIN",
        {
            "echo_runner/__init__.py": ECHO_PACKAGE,
            "echo_runner/runner.py": "class EchoRunner:\n    name = 'echo'\n",
        },
    )
    model = open_model(tiny_store, "tiny:gguf")
    assert plugins()["echo"].install_hint == "pip install echo-runner"
    assert choose_runner(model, "echo") == "echo"
    assert make_runner("echo").name == "echo"
    assert choose_runner(model) in {"mlx", "llamacpp"}, "the platform's runners come first"


def test_a_broken_plugin_is_skipped_and_the_others_still_load(site):
    install_package(
        site,
        "broken_runner",
        "broken = broken_runner:PLUGIN",
        {"broken_runner/__init__.py": "raise ImportError('missing dependency')\n"},
    )
    assert "broken" not in plugins()
    assert "mlx" in plugins()


def test_a_runner_that_cannot_run_the_model_is_refused_by_name(tiny_store):
    model = open_model(tiny_store, "tiny:mlx")
    with pytest.raises(UnsupportedFormatError, match="llamacpp runner cannot run"):
        choose_runner(model, "llamacpp")
    with pytest.raises(UnsupportedFormatError, match="mlx-embeddings runner cannot run"):
        choose_runner(model, "mlx-embeddings")
