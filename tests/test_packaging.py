"""Installed like a tool: an sdist and the wheel built from it carry what ``mlxctl`` reads at
run time (the ModelSpec schema, the default ModelSpec, the OpenAPI document), so ``mlxctl run``
and ``mlxctl spec validate`` work from a venv outside the checkout: one made with ``pip``, and
the ones ``pipx install`` and ``uv tool install`` make (in their own homes under tmp).

Each such venv reuses this venv's site-packages through a ``.pth`` line appended to its path
(nothing heavy is installed twice, and llama-cpp-python, compiled from source, is never built
again); this checkout's own editable install is not on that path, so the product imported there
is the wheel's. pip and uv install the wheel alone, offline (uv drops the wheel's dependencies
by overrides that never apply); pipx reads every dependency's metadata after installing, so it
installs the wheel's dependencies (not its extras) from the package index, through pip's cache,
and the test skips where no index can be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache")
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
"""The build backend's wheels (pyproject.toml's ``build-system``), put there by ``make install``,
so ``python -m build`` runs offline in its isolated env."""
BACKEND = ("setuptools>=84.2.1", "wheel>=0.48")
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 240
TOOL_INSTALL_TIMEOUT_S = 240
TOOLS_BIN = Path(sys.executable).parent
"""pipx and uv come with the dev extra, next to this venv's python."""
NEVER = "; sys_platform == 'never'"
"""A marker no platform has: an override that removes a dependency (uv's documented way)."""


def _wheelhouse() -> Path:
    if not any(WHEELHOUSE.glob("setuptools-*.whl")):
        fetched = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--dest",
                str(WHEELHOUSE),
                *BACKEND,
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if fetched.returncode != 0:
            pytest.skip(f"the package index cannot be reached to fetch {BACKEND}")
    return WHEELHOUSE


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel that ``python -m build`` made from the sdist it made from this checkout (what
    ``pipx install`` / ``uv tool install`` of a release get)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    offline = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(_wheelhouse()),
    }
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env=offline,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = (work / "dist").glob("*.tar.gz")
    (wheel,) = (work / "dist").glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    for data in ("modelstore/data/modelspec.schema.json", "mlxserve/server/openapi.yaml"):
        assert any(name.endswith(data) for name in names), data
    return wheel


def share_site_packages(venv: Path) -> None:
    """Append this venv's site-packages to ``venv``'s path (after its own packages)."""
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "shared-site-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (pip, offline); returns its ``bin``."""
    venv = tmp_path_factory.mktemp("pip") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    share_site_packages(venv)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=BUILD_TIMEOUT_S,
        env=_without_pythonpath(),
    )
    return venv / "bin"


def _without_pythonpath() -> dict[str, str]:
    """A checkout on ``PYTHONPATH`` (with its ``.egg-info``) would look installed to pip."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (the dev extra has it)")
    return str(path)


@pytest.fixture(scope="module")
def pipx_installed(wheel, tmp_path_factory) -> Path:
    """``pipx install WHEEL`` with its home, venvs and bin under tmp; returns the bin."""
    home = tmp_path_factory.mktemp("pipx")
    environment = {
        **_without_pythonpath(),
        "PIPX_HOME": str(home / "home"),
        "PIPX_BIN_DIR": str(home / "bin"),
        "PIPX_MAN_DIR": str(home / "man"),
    }
    result = subprocess.run(
        [_tool("pipx"), "install", "--python", sys.executable, str(wheel)],
        capture_output=True,
        text=True,
        timeout=TOOL_INSTALL_TIMEOUT_S,
        env=environment,
    )
    if result.returncode != 0 and "No matching distribution" in result.stdout + result.stderr:
        pytest.skip("pipx installs the wheel's dependencies, and no package index answers")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    share_site_packages(home / "home" / "venvs" / "mlxserve")  # llama-cpp-python, the model
    return home / "bin"


@pytest.fixture(scope="module")
def uv_installed(wheel, tmp_path_factory) -> Path:
    """``uv tool install WHEEL`` offline, with its tool dir, bin and cache under tmp."""
    home = tmp_path_factory.mktemp("uv")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    requires = [
        line.split(":", 1)[1].split(";")[0] for line in lines if line.startswith("Requires-Dist:")
    ]
    names = {re.split(r"[\s\[<>=!~]", spec.strip(), maxsplit=1)[0] for spec in requires}
    overrides = home / "no-dependencies.txt"
    overrides.write_text("".join(f"{name}{NEVER}\n" for name in sorted(names)))
    environment = {
        **_without_pythonpath(),
        "UV_TOOL_DIR": str(home / "tools"),
        "UV_TOOL_BIN_DIR": str(home / "bin"),
        "UV_CACHE_DIR": str(home / "cache"),
    }
    command = [_tool("uv"), "tool", "install", "--offline", "--no-index"]
    subprocess.run(
        [*command, "--overrides", str(overrides), "--python", sys.executable, str(wheel)],
        check=True,
        capture_output=True,
        timeout=TOOL_INSTALL_TIMEOUT_S,
        env=environment,
    )
    share_site_packages(home / "tools" / "mlxserve")
    return home / "bin"


@pytest.fixture(params=["pip", "pipx", "uv"])
def tool_bin(request) -> Path:
    """Where each installer put ``mlxctl``."""
    return request.getfixturevalue(
        {"pip": "installed", "pipx": "pipx_installed", "uv": "uv_installed"}[request.param]
    )


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(cwd),
        "MLXSERVE_HOME": str(cwd / "store"),
        "MLXSERVE_PORT": "9",  # no daemon there: mlxctl run works in-process
    }
    return subprocess.run(
        list(args), cwd=cwd, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


@pytest.mark.slow
def test_the_wheel_imports_from_its_own_venv(installed, tmp_path):
    result = _run(
        installed,
        "python",
        "-c",
        "import mlxctl, mlxserve, modelstore; print(modelstore.__file__)",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed.parent)), result.stdout


@pytest.mark.slow
def test_spec_validate_works_from_the_wheel(tool_bin, tmp_path):
    spec = tmp_path / "mine.modelspec.yaml"
    spec.write_text((ROOT / "modelstore" / "data" / "smollm2-135m.modelspec.yaml").read_text())
    result = _run(tool_bin, "mlxctl", "spec", "validate", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_works_from_the_wheel(tool_bin, tmp_path):
    result = _run(
        tool_bin,
        "mlxctl",
        "run",
        "The capital of France is",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
