"""The store is never quietly empty: a home that is not a folder, cannot be read or written, or
sits on a full disk is one line (the path, what is wrong, what to do) from every command that
uses the store and from the daemon at start; never a traceback, never an empty list.

Read-only and full disks are real file systems (a read-only and a 1 MiB tmpfs), which needs
root; a permission problem is a real other user (``setpriv`` to ``nobody``) when run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxctl.cli import STORE_ACCESS
from modelstore.default_model import DEFAULT_SPEC
from tests.cli import MLXCTL, mlxctl
from tests.daemon import MLXSERVE

ARGUMENTS = {
    "import": ["/nonexistent-model"],
    "show": ["x:1"],
    "rm": ["x:1"],
    "cp": ["x:1", "y:1"],
    "create": ["x:1", "-f", str(DEFAULT_SPEC)],
    "run": ["x:1", "hi"],
    "pull": ["x:1"],
    "push": ["x:1", "127.0.0.1:9/x:1"],
}
NO_DAEMON = {"MLXSERVE_PORT": "1"}
NOBODY = 65534


def _others_can_run(path: Path) -> bool:
    """Whether a user who is neither the owner nor in the group reaches ``path``: every folder
    above it searchable by others (``mktemp -d`` makes a 0700 folder, and a checkout inside one
    is root's alone)."""
    return all(folder.stat().st_mode & 0o001 for folder in path.resolve().parents)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error [store_unusable]: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", sorted(STORE_ACCESS))
def test_a_home_that_is_a_file_is_one_line_from_every_store_command(tmp_path, command):
    home = tmp_path / "home"
    home.write_text("not a store")
    result = mlxctl(command, *ARGUMENTS.get(command, []), home=home, check=False, env=NO_DAEMON)
    one_line_error(result, str(home), "not a folder", "MLXSERVE_HOME")


def test_a_home_under_a_file_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = mlxctl("pull", "x:1", home=blocker / "home", check=False)
    one_line_error(result, str(blocker / "home"), "cannot be created")


def test_a_missing_home_lists_as_empty_and_says_where_it_looked(tmp_path):
    result = mlxctl("list", home=tmp_path / "fresh", check=False)
    assert result.returncode == 0
    assert str(tmp_path / "fresh") in result.stderr and "holds no models" in result.stderr


def test_the_daemon_refuses_to_start_on_a_bad_home(tmp_path):
    home = tmp_path / "home"
    home.write_text("")
    result = subprocess.run(
        [MLXSERVE, "--port", "9"],
        env={**os.environ, "MLXSERVE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(result, str(home), "not a folder")
    assert "listening" not in result.stderr


@pytest.fixture
def mounted(tmp_path):
    """Mount a tmpfs (root only); yields a function taking mount options."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    points: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)])
        if done.returncode != 0:
            pytest.skip("this machine does not let root mount a tmpfs")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def test_a_read_only_home_lists_but_refuses_writes_in_one_line(mounted, tmp_path):
    home = mounted("size=1m")
    (home / "manifests").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    assert mlxctl("list", home=home, check=False).returncode == 0
    result = mlxctl("import", str(tmp_path), home=home, check=False)
    one_line_error(result, str(home), "read-only")


def test_a_full_disk_refuses_writes_and_the_daemon_in_one_line(mounted, tmp_path):
    home = mounted("size=1m")
    with open(home / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass
    result = mlxctl("import", str(tmp_path), home=home, check=False)
    one_line_error(result, str(home), "full disk")
    daemon = subprocess.run(
        [MLXSERVE, "--port", "9"],
        env={**os.environ, "MLXSERVE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(daemon, str(home), "full disk")


def test_a_home_this_user_cannot_read_is_one_line(tmp_path):
    home = tmp_path / "home"
    (home / "manifests").mkdir(parents=True)
    home.chmod(0o700)
    command = [MLXCTL, "list"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as another user needs setpriv")
        if not _others_can_run(Path(MLXCTL)):
            pytest.skip(f"{MLXCTL} is in a folder other users cannot enter (a 0700 checkout)")
        tmp_path.chmod(0o755)
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    else:
        home.chmod(0)
    result = subprocess.run(
        command,
        env={**os.environ, "MLXSERVE_HOME": str(home), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    home.chmod(0o700)
    one_line_error(result, str(home), "permission denied")


def test_the_cli_reports_a_disk_that_fills_mid_write_in_one_line():
    """The safety net in ``mlxctl/errors.py``: ENOSPC raised inside a command."""
    code = (
        "import click, errno, sys\n"
        "from mlxctl.errors import run_cli\n"
        "@click.command()\n"
        "def fill():\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', '/store/blobs/tmp/x')\n"
        "sys.exit(run_cli(fill))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    one_line_error(result, "/store/blobs/tmp/x", "disk is full")
