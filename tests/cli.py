"""Run ``mlxctl`` as a user does: a real process over a given store, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlxctl.names import OLLAMA_LIBRARY_ENV

MLXCTL = str(Path(sys.executable).with_name("mlxctl"))
NO_LIBRARY = "127.0.0.1:9"
"""Where bare names are pulled from in tests (nothing listens there): a test never reaches
Ollama's real library; the tests of name resolution point it at a local registry."""


def mlxctl(
    *args: str,
    home: Path,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "MLXSERVE_HOME": str(home),
        "COLUMNS": "200",
        OLLAMA_LIBRARY_ENV: NO_LIBRARY,
        **(env or {}),
    }
    result = subprocess.run(
        [MLXCTL, *args],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mlxctl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result
