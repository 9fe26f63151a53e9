"""Run ``mlxctl`` as a user does: a real process over a given store, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MLXCTL = str(Path(sys.executable).with_name("mlxctl"))


def mlxctl(
    *args: str,
    home: Path,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MLXSERVE_HOME": str(home), "COLUMNS": "200", **(env or {})}
    result = subprocess.run(
        [MLXCTL, *args],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mlxctl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result
