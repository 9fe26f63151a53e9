"""Installed like a tool: an sdist and the wheel built from it carry what ``mlxctl`` reads at
run time (the ModelSpec schema, the default ModelSpec, the OpenAPI document), so ``mlxctl run``
and ``mlxctl spec validate`` work from a venv outside the checkout.

The fresh venv reuses this venv's site-packages through a ``.pth`` line (``--no-deps``: nothing
heavy is installed twice); this checkout's own editable install is not on that path, so the
product imported there is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
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
def installed(tmp_path_factory) -> Path:
    """A venv holding the wheel that ``python -m build`` made from the sdist it made from this
    checkout (as ``pipx install`` / ``uv tool install`` of a release would get)."""
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
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "shared-site-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
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
    )
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
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
    assert result.stdout.startswith(str(installed)), result.stdout


@pytest.mark.slow
def test_spec_validate_works_from_the_wheel(installed, tmp_path):
    spec = tmp_path / "mine.modelspec.yaml"
    spec.write_text((ROOT / "modelstore" / "data" / "smollm2-135m.modelspec.yaml").read_text())
    result = _run(installed, "mlxctl", "spec", "validate", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_works_from_the_wheel(installed, tmp_path):
    result = _run(
        installed,
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
