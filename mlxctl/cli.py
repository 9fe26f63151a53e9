"""The ``mlxctl`` command group.

Subcommands live in one module per noun and are imported only when invoked, so ``mlxctl list``
never pays for aiohttp, mlx, transformers or llama_cpp (``tests/test_cli_store.py`` checks).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import click

# command name -> "module:function"; each module is owned by one part of the product.
COMMANDS: dict[str, str] = {
    "import": "mlxctl.store_commands:import_command",
    "list": "mlxctl.store_commands:list_command",
    "show": "mlxctl.store_commands:show_command",
    "rm": "mlxctl.store_commands:rm_command",
    "cp": "mlxctl.store_commands:cp_command",
    "verify": "mlxctl.store_commands:verify_command",
    "gc": "mlxctl.store_commands:gc_command",
    "cache": "mlxctl.cache_commands:cache_group",
    "create": "mlxctl.spec_commands:create_command",
    "spec": "mlxctl.spec_commands:spec_group",
    "run": "mlxctl.run_command:run_command",
    "serve": "mlxctl.daemon_commands:serve_command",
    "ps": "mlxctl.daemon_commands:ps_command",
    "stop": "mlxctl.daemon_commands:stop_command",
    "pull": "mlxctl.registry_commands:pull_command",
    "push": "mlxctl.registry_commands:push_command",
    "service": "mlxctl.service_commands:service_group",
}
ALIASES = {"ls": "list"}
"""Ollama's and habit's other names for commands."""


STORE_ACCESS: dict[str, bool] = {
    "import": True,
    "list": False,
    "show": False,
    "rm": True,
    "cp": True,
    "verify": False,
    "gc": True,
    "create": True,
    "run": True,
    "pull": True,
    "push": False,
}
"""Commands that use the store, and whether they write to it: the store is checked first
(``ModelStore.check``), so a bad home is one line, never a traceback or an empty list."""


def checking_store(command: click.Command, write: bool) -> click.Command:
    callback = command.callback
    if callback is None or getattr(callback, "checks_store", False):
        return command

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from modelstore.store import ModelStore

        ModelStore().check(write=write)
        return callback(*args, **kwargs)

    checked.checks_store = True  # type: ignore[attr-defined]
    command.callback = checked
    return command


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "help":
            return help_command
        cmd_name = ALIASES.get(cmd_name, cmd_name)
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command: click.Command = getattr(module, attribute)
        if cmd_name in STORE_ACCESS:
            return checking_store(command, STORE_ACCESS[cmd_name])
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxserve")
def cli() -> None:
    """Run and manage local models on MLX (and llama.cpp where MLX cannot run).

    \b
    Examples:
      mlxctl run "Why is the sky blue?"        chat with the embedded default model
      mlxctl import ./my-model --name my:1b    add an HF-style folder to the store
      mlxctl list                              what the store holds
    """


@click.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx: click.Context, command: str | None) -> None:
    """Show help for mlxctl, or for one COMMAND (as mlxctl COMMAND --help)."""
    group = ctx.parent.command if ctx.parent else cli
    assert isinstance(group, click.Group)
    target = group.get_command(ctx, command) if command else None
    if command and target is None:
        raise click.UsageError(f"no such command '{command}'")
    parent = ctx.parent or ctx
    shown = (
        target.get_help(click.Context(target, info_name=command, parent=parent))
        if target
        else group.get_help(parent)
    )
    click.echo(shown)


def main() -> None:
    from mlxctl.errors import run_cli
    from mlxserve.platform import exit_process

    exit_process(run_cli(cli))
