"""The names people type, resolved the way they mean them (``mlxctl run`` and ``mlxctl pull``).

Only the CLI resolves names this way: a request to the daemon never downloads anything. The
order (docs/STORE.md, "Names people type"):

1. ``hf://ORG/REPO`` and ``ollama://NAME``: that source, as written.
2. A path (``./my-model``, ``~/m.gguf``, ``/models/x``, or ``models/x`` / ``m.gguf`` when that
   exists): imported on the fly under a name derived from the folder or file (``run`` only). A
   bare word is a name, never a path: ``./llama3.2`` is the folder.
3. A name the store holds: that model (``run`` only; ``pull`` always fetches).
4. A name with a registry host (``registry.example.com/team/m:1``): that registry.
5. ``ORG/REPO`` shaped like a Hugging Face id: the hub first, then, when it also fits Ollama's
   grammar (lower case, ``user/model[:tag]``), Ollama's library.
6. A bare name (``llama3.2``, ``qwen3:0.6b``): Ollama's library (``ollama://``).

When every candidate fails, the error lists each source tried, why it failed, and the exact
command for each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelstore.errors import (
    InvalidReferenceError,
    MlxserveError,
    ModelNotFoundError,
    RegistryAuthError,
)
from modelstore.hfhub import HF_SCHEME, HubModel
from modelstore.reference import parse_reference
from modelstore.store import ModelStore

OLLAMA_LIBRARY_ENV = "MLXSERVE_OLLAMA_REGISTRY"
"""The host bare names are pulled from (default Ollama's ``registry.ollama.ai``): a mirror."""
_PATH_PREFIXES = ("./", "../", "/", "~")
_FILE_SUFFIXES = (".gguf", ".zip", ".tar")
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?")


@dataclass(frozen=True)
class Candidate:
    """One place a name may come from: the reference to fetch and the command that does."""

    source: str
    reference: str
    command: str


def looks_like_path(text: str) -> bool:
    if text.startswith(_PATH_PREFIXES) or text in {".", ".."}:
        return True
    return ("/" in text or text.endswith(_FILE_SUFFIXES)) and Path(text).exists()


def looks_like_name(text: str) -> bool:
    """A single argument to ``run`` that is a model, not a one-line prompt for the default one."""
    if text.startswith((HF_SCHEME, "ollama://")) or looks_like_path(text):
        return True
    if _HF_ID.fullmatch(text):
        return True
    try:
        parse_reference(text)
    except InvalidReferenceError:
        return False
    return True


def ollama_url(text: str) -> str:
    host = os.environ.get(OLLAMA_LIBRARY_ENV)
    return f"ollama://{host}/{text}" if host else f"ollama://{text}"


def _fits_ollama(text: str) -> bool:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        return False
    return ref.host is None and ref.digest is None


def candidates(text: str) -> list[Candidate]:
    """Where ``text`` may come from, in the order tried (steps 4 to 6 above)."""
    from modelstore.registry.ollama import is_ollama_url

    if text.startswith(HF_SCHEME):
        return [Candidate("Hugging Face", text, f"mlxctl pull {text}")]
    if is_ollama_url(text):
        return [Candidate("Ollama's library", text, f"mlxctl pull {text}")]
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        ref = None
    if ref is not None and ref.host is not None:
        return [Candidate(f"registry {ref.host}", text, f"mlxctl pull {text}")]
    found = []
    if _HF_ID.fullmatch(text) and ":" not in text:
        found.append(Candidate("Hugging Face", HF_SCHEME + text, f"mlxctl pull {HF_SCHEME}{text}"))
    if _fits_ollama(text):
        url = ollama_url(text)
        found.append(Candidate("Ollama's library", url, f"mlxctl pull {url}"))
    return found


def stored_name(candidate: Candidate) -> str:
    """The name a pull of ``candidate`` is stored under."""
    from modelstore.registry.ollama import is_ollama_url, local_name

    if candidate.reference.startswith(HF_SCHEME):
        return HubModel.parse(candidate.reference).store_name()
    if is_ollama_url(candidate.reference):
        return local_name(candidate.reference)
    return candidate.reference


Fetch = Callable[[ModelStore, str], object]


def resolve_for_run(store: ModelStore, text: str, fetch: Fetch) -> str:
    """``mlxctl run TEXT``: a path is imported, a stored name is used, anything else fetched."""
    if looks_like_path(text):
        return import_on_the_fly(store, Path(text).expanduser())
    try:
        if parse_reference(text).host is None and store.exists(text):
            return text
    except InvalidReferenceError:
        pass
    return fetch_first(store, text, fetch, reuse_stored=True, mention=" in the store")


def import_on_the_fly(store: ModelStore, path: Path) -> str:
    """Import ``path`` under its derived name (content-addressed: an unchanged folder adds
    nothing) and say so, as ``run`` pulling a model does."""
    import click

    from mlxctl.output import byte_progress
    from modelstore.importer import derived_name, import_path, source_size

    name = derived_name(path)
    with byte_progress(f"importing {path.name or path}", source_size(path)) as progress:
        result = import_path(store, path, name, progress=progress)
    stored = result.models[0].name
    click.echo(
        f"imported {path} as {stored} (mlxctl import {path} --name NAME renames it)", err=True
    )
    return stored


def fetch_first(
    store: ModelStore, text: str, fetch: Fetch, *, reuse_stored: bool, mention: str = ""
) -> str:
    """Fetch ``text`` from the first candidate that has it; return its stored name.

    Registry errors other than "not there" (auth, a refused connection, TLS) also move on to the
    next candidate, but are named in the final error, which lists every source tried.
    """
    found = candidates(text)
    if not found:
        raise InvalidReferenceError(
            f"{text!r} is not a model name, an ORG/REPO or a path that exists "
            "(examples: llama3.2, qwen3:0.6b, mlx-community/Qwen3-0.6B-4bit, ./my-model)",
            reference=text,
        )
    explicit = len(found) == 1 and found[0].reference == text
    tried: list[str] = []
    for candidate in found:
        name = stored_name(candidate)
        if reuse_stored and store.exists(name):
            return name
        try:
            fetch(store, candidate.reference)
        except RegistryAuthError:
            raise
        except MlxserveError as error:
            if explicit:
                raise
            tried.append(f"  {candidate.source} ({candidate.reference}): {error.message}")
            continue
        return name
    commands = "\n".join(f"  {c.command}" for c in found)
    raise ModelNotFoundError(
        f"no model named '{text}'{mention}; tried, in order:\n"
        + "\n".join(tried)
        + f"\nThe command for each source:\n{commands}\n"
        "  mlxctl import PATH            (a folder or .gguf on this machine)",
        model=text,
    )
