"""How the CLI reports errors: one line with the stable code, exit status 1 (2 for usage)."""

from __future__ import annotations

import sys

import click

from modelstore.errors import MlxserveError

EXIT_ERROR = 1


def run_cli(group: click.Group) -> int:
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return EXIT_ERROR
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except MlxserveError as exc:
        click.echo(f"Error [{exc.code}]: {exc.message}", err=True)
        return EXIT_ERROR
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_ERROR
    return 0
