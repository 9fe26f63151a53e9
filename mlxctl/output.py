"""How ``mlxctl`` prints: rich tables for people, JSON for scripts, sizes in MB/GB."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelstore.blobs import ProgressCallback

PROGRESS_THRESHOLD_BYTES = 32 << 20
"""Below this, a progress bar would only flicker."""

PIPED_WIDTH = 1 << 16
"""Into a pipe or a file, a table is as wide as its rows: no column is cut to fit 80."""
console = Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)
err_console = Console(stderr=True, highlight=False)


def human_size(size: int) -> str:
    """Decimal units, as Ollama and Finder print them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def human_age(timestamp: float) -> str:
    seconds = max(0, int(time.time() - timestamp))
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = seconds // span
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def transfer_progress(*, transient: bool) -> Progress:
    """Bars for byte transfers on stderr: size done, speed and ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr for large transfers; ``None`` (no bar) for small ones."""
    if total < PROGRESS_THRESHOLD_BYTES or not sys.stderr.isatty():
        yield None
        return
    with transfer_progress(transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
