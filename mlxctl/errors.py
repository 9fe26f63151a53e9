"""How the CLI reports errors: one line with the stable code, exit status 1 (2 for usage)."""

from __future__ import annotations

import errno
import sys

import click

from modelstore.errors import MlxserveError

EXIT_ERROR = 1
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full: free some space (mlxctl rm, then mlxctl gc)",
    errno.EDQUOT: "the disk quota is used up: free some space (mlxctl rm, then mlxctl gc)",
    errno.EROFS: "the file system is read-only: set MLXSERVE_HOME to a writable folder",
}
"""Write failures that happen mid-command (a disk that fills during a pull): one line too."""


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
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        click.echo(f"Error [store_unusable]: {exc.filename}: {DISK_ERRORS[exc.errno]}", err=True)
        return EXIT_ERROR
    return 0
