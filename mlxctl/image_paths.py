"""Images named in a prompt, as ``ollama run`` takes them: ``mlxctl run llava "What is in
./cat.png?"`` sends ``cat.png`` to a vision model and the prompt without its path.

A path counts when it names an image file that exists: quoted (``'my photo.jpg'``) or bare,
starting with ``/``, ``./``, ``../`` or ``~/`` (spaces escaped as ``\\ ``, as a shell would
print it), ending in an image suffix. Anything else is left in the text as it was typed, so a
prompt that only mentions a path is not changed. Written by hand: the rule is Ollama's command
line's, which no library implements; the image itself is checked by the daemon as any other.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from mlxserve.images import MAX_IMAGE_BYTES

SUFFIXES = r"(?:png|jpe?g|webp|gif|bmp)"
PATH = re.compile(
    rf"""(?:(?P<quote>['"])(?P<quoted>[^'"\n]+?\.{SUFFIXES})(?P=quote)"""
    rf"""|(?P<bare>(?:~|\.{{1,2}})?/(?:\\ |[^\s'"])+?\.{SUFFIXES})(?=$|\s|[,;:!?)]))[ \t]*""",
    re.IGNORECASE,
)
"""A path, and the blanks after it (taken out with it)."""


def take_images(text: str) -> tuple[str, list[bytes]]:
    """``text`` without the image files it names, and those files' bytes, in order; each one
    taken is said on stderr, as Ollama does."""
    images: list[bytes] = []

    def take(match: re.Match[str]) -> str:
        written = match["quoted"] or match["bare"].replace("\\ ", " ")
        path = Path(written).expanduser()
        try:
            # A file over the daemon's limit for one image stays text.
            if not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
                return match[0]
            images.append(path.read_bytes())
        except OSError:
            return match[0]
        click.echo(f"Added image '{written}'", err=True)
        return ""

    kept = PATH.sub(take, text)
    return (kept.strip() if images else text), images
