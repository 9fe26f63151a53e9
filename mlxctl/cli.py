"""The ``mlxctl`` command group.

Subcommands live in one module per noun and are imported only when invoked, so ``mlxctl list``
never pays for aiohttp, mlx, transformers or llama_cpp (``tests/test_cli_startup.py`` checks).
"""

from __future__ import annotations

import importlib

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


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
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
        return getattr(module, attribute)


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


def main() -> None:
    from mlxctl.errors import run_cli
    from mlxserve.platform import exit_process

    exit_process(run_cli(cli))
