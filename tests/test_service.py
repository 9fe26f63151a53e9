"""``mlxctl service``: the unit and the agent it writes are valid for their managers, and the
command line they contain starts a daemon that answers."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cli import mlxctl
from tests.daemon import free_port


def start_and_probe(command: list[str], env: dict[str, str], port: int) -> None:
    """Run the service's exact command line; it must serve ``/api/health`` on ``port``."""
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, "the service's command exited"
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/health", timeout=1
                ) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the service's command did not start a daemon")
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_systemd_unit_verifies_and_its_command_runs(tmp_path: Path):
    port = free_port()
    home = tmp_path / "store"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    mlxctl(
        "service",
        "install",
        "--kind",
        "systemd",
        "--no-start",
        "--port",
        str(port),
        home=home,
        env=env,
    )
    unit = tmp_path / "config" / "systemd" / "user" / "mlxserve.service"
    text = unit.read_text()
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert verified.returncode == 0, verified.stderr
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    environment = dict(
        shlex.split(line.split("=", 1)[1])[0].split("=", 1)
        for line in text.splitlines()
        if line.startswith("Environment=")
    )
    assert environment == {"MLXSERVE_HOME": str(home)}
    start_and_probe(shlex.split(lines["ExecStart"]), environment, port)
    status = json.loads(
        mlxctl("service", "status", "--kind", "systemd", "--json", home=home, env=env).stdout
    )
    assert status["installed"] is True
    removed = mlxctl("service", "uninstall", "--kind", "systemd", home=home, env=env, check=False)
    assert not unit.exists(), removed.stderr


def test_the_launchd_agent_parses_and_its_command_runs(tmp_path: Path):
    port = free_port()
    home = tmp_path / "store"
    printed = mlxctl(
        "service", "install", "--kind", "launchd", "--print", "--port", str(port), home=home
    ).stdout
    agent = plistlib.loads(printed.encode())
    assert agent["Label"] == "dev.mlxserve.daemon"
    assert agent["KeepAlive"] == {"SuccessfulExit": False} and agent["RunAtLoad"] is True
    assert agent["StandardErrorPath"].endswith("Library/Logs/mlxserve.log")
    start_and_probe(agent["ProgramArguments"], agent["EnvironmentVariables"], port)


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="no systemctl here")
def test_install_without_a_user_manager_says_so_in_one_line(tmp_path: Path):
    result = mlxctl(
        "service",
        "install",
        "--kind",
        "systemd",
        home=tmp_path / "store",
        env={
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent",
        },
        check=False,
    )
    if result.returncode == 0:
        pytest.skip("this machine has a systemd user manager: install really started")
    assert "Error [service_error]" in result.stderr and "Traceback" not in result.stderr


def systemd_unquote(text: str) -> list[str]:
    """systemd's reading of a command line (``systemd.service(5)``), for the words we write:
    double-quoted, ``\\\\`` and ``\\"`` escaped, ``%%`` and ``$$`` for literal ``%`` and ``$``."""
    words = []
    for quoted in re.findall(r'"((?:[^"\\]|\\.)*)"', text):
        word = re.sub(r"\\(.)", r"\1", quoted).replace("%%", "%").replace("$$", "$")
        words.append(word)
    return words


def test_unit_files_escape_paths_and_status_checks_the_units_port(tmp_path: Path):
    home = tmp_path / "a store" / '100% $HOME "quoted"'
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "MLXSERVE_PORT": "1"}
    mlxctl(
        "service",
        "install",
        "--kind",
        "systemd",
        "--no-start",
        "--port",
        "11777",
        home=home,
        env=env,
    )
    unit = tmp_path / "config" / "systemd" / "user" / "mlxserve.service"
    lines = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line)
    assert systemd_unquote(lines["Environment"]) == [f"MLXSERVE_HOME={home}"]
    assert systemd_unquote(lines["ExecStart"])[1:] == ["--port", "11777"]
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert verified.returncode == 0, verified.stderr
    status = json.loads(
        mlxctl("service", "status", "--kind", "systemd", "--json", home=home, env=env).stdout
    )
    assert status["daemon"] == "127.0.0.1:11777", "status asks the port the unit starts on"
