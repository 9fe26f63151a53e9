"""``mlxctl service install|uninstall|status``: the daemon started at login, as menubar apps
and editor plugins expect it to be there.

macOS: a launchd agent in ``~/Library/LaunchAgents`` (written with ``plistlib``), restarted
when it crashes, logging to ``~/Library/Logs/mlxserve.log``. Linux: a systemd user unit in
``~/.config/systemd/user`` (``Restart=on-failure``, logs in the journal). Both run the
``mlxserve`` next to this ``mlxctl``, with the store and port this install was made with.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from mlxctl.output import console, print_json
from modelstore.errors import MlxserveError

LABEL = "dev.mlxserve.daemon"
UNIT = "mlxserve.service"
RESTART_DELAY_S = 2


class ServiceError(MlxserveError):
    code = "service_error"


@dataclass(frozen=True)
class ServiceFile:
    kind: str
    path: Path
    text: str
    load: list[list[str]]
    unload: list[list[str]]
    status: list[str]


def daemon_command(port: int | None) -> list[str]:
    command = [str(Path(sys.executable).with_name("mlxserve"))]
    return command + (["--port", str(port)] if port else [])


def daemon_environment() -> dict[str, str]:
    """The settings this install should keep (the store it was made for)."""
    return {
        key: os.environ[key] for key in ("MLXSERVE_HOME", "MLXSERVE_CONFIG") if os.environ.get(key)
    }


def launchd_file(port: int | None) -> ServiceFile:
    home = Path.home()
    path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    log = home / "Library" / "Logs" / "mlxserve.log"
    agent = {
        "Label": LABEL,
        "ProgramArguments": daemon_command(port),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_DELAY_S,
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
        "EnvironmentVariables": daemon_environment(),
    }
    domain = f"gui/{os.getuid()}"
    return ServiceFile(
        "launchd",
        path,
        plistlib.dumps(agent).decode(),
        load=[["launchctl", "bootstrap", domain, str(path)]],
        unload=[["launchctl", "bootout", f"{domain}/{LABEL}"]],
        status=["launchctl", "print", f"{domain}/{LABEL}"],
    )


def systemd_quote(word: str, *, expands_dollar: bool = True) -> str:
    """One word as systemd reads it (``systemd.service(5)``, "Command lines"): double-quoted
    with ``\\`` and ``"`` escaped, ``%`` doubled (a specifier otherwise) and, in ``ExecStart=``,
    ``$`` doubled (a variable otherwise); shell quoting is not systemd's."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if expands_dollar:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def systemd_file(port: int | None) -> ServiceFile:
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = config / "systemd" / "user" / UNIT
    environment = "".join(
        f"Environment={systemd_quote(f'{key}={value}', expands_dollar=False)}\n"
        for key, value in daemon_environment().items()
    )
    text = (
        "[Unit]\n"
        "Description=mlxserve: local models over the Ollama and OpenAI APIs\n"
        "After=network.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(systemd_quote(word) for word in daemon_command(port))}\n"
        f"{environment}"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_DELAY_S}\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )
    user = ["systemctl", "--user"]
    return ServiceFile(
        "systemd",
        path,
        text,
        load=[[*user, "daemon-reload"], [*user, "enable", "--now", UNIT]],
        unload=[[*user, "disable", "--now", UNIT]],
        status=[*user, "status", "--no-pager", UNIT],
    )


def service_file(kind: str | None, port: int | None) -> ServiceFile:
    from mlxserve.platform import service_manager

    kind = kind or service_manager()
    if kind == "launchd":
        return launchd_file(port)
    if kind == "systemd":
        return systemd_file(port)
    raise ServiceError("no supported service manager here (launchd on macOS, systemd on Linux)")


def run_steps(steps: list[list[str]]) -> None:
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ServiceError(f"`{step[0]}` is not available here") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise ServiceError(f"`{shlex.join(step)}` failed: {detail[-1] if detail else '?'}")


kind_option = click.option(
    "--kind",
    type=click.Choice(["launchd", "systemd"]),
    help="Override the service manager (default: this system's).",
)


@click.group("service")
def service_group() -> None:
    """Start the daemon at login (launchd agent on macOS, systemd user unit on Linux).

    \b
    Examples:
      mlxctl service install             write and start it
      mlxctl service install --print     show the file without installing
      mlxctl service status
      mlxctl service uninstall
    """


@service_group.command("install")
@click.option("--port", type=int, help="Port the daemon listens on (default: the config's).")
@click.option("--print", "print_only", is_flag=True, help="Print the file; install nothing.")
@click.option("--no-start", is_flag=True, help="Write the file but do not load it.")
@kind_option
def install_command(port: int | None, print_only: bool, no_start: bool, kind: str | None) -> None:
    """Write the service file and load it."""
    service = service_file(kind, port)
    if print_only:
        click.echo(service.text, nl=False)
        return
    service.path.parent.mkdir(parents=True, exist_ok=True)
    service.path.write_text(service.text)
    console.print(f"wrote {service.path}")
    if not no_start:
        run_steps(service.load)
        console.print(f"started the {service.kind} service; it starts again at login")


@service_group.command("uninstall")
@kind_option
def uninstall_command(kind: str | None) -> None:
    """Stop the service and remove its file."""
    service = service_file(kind, None)
    if not service.path.exists():
        console.print(f"not installed ({service.path} does not exist)")
        return
    try:
        run_steps(service.unload)
    finally:
        service.path.unlink(missing_ok=True)
    console.print(f"removed {service.path}")


def installed_port(service: ServiceFile) -> int | None:
    """The ``--port`` the installed unit starts the daemon with, if it names one."""
    try:
        text = service.path.read_text()
    except OSError:
        return None
    found = re.search(r"--port\W+(\d+)", text)
    return int(found.group(1)) if found else None


@service_group.command("status")
@kind_option
@click.option("--json", "as_json", is_flag=True)
def status_command(kind: str | None, as_json: bool) -> None:
    """Whether the service is installed, loaded, and the daemon answers."""
    from mlxctl.client import DaemonClient

    service = service_file(kind, None)
    loaded = False
    if service.path.exists():
        try:
            loaded = (
                subprocess.run(service.status, capture_output=True, check=False).returncode == 0
            )
        except FileNotFoundError:
            loaded = False
    client = DaemonClient.from_environment()
    unit_port = installed_port(service)
    if unit_port is not None:
        client = DaemonClient(client.host, unit_port, client.api_key)
    state = {
        "kind": service.kind,
        "file": str(service.path),
        "installed": service.path.exists(),
        "loaded": loaded,
        "daemon": client.address,
        "answering": client.is_up(),
    }
    if as_json:
        print_json(state)
        return
    for key, value in state.items():
        console.print(f"{key:<10} {value}")
