"""How ``mlxctl`` reports an import, the same for ``import`` from a folder, a file, an archive,
another app's store or the Hugging Face cache: the model, its size and digest, and how each file
got into the store (cloned, copied, hard-linked or already there), or the same as JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlxctl.output import console, human_size, print_json

if TYPE_CHECKING:
    from modelstore.importer import ImportResult

IMPORT_VERBS = {
    "hardlink": "hard-linked",
    "clone": "cloned (copy-on-write)",
    "copy": "copied",
    "existing": "already stored",
}
"""How ``import`` says each file got in (``StoredHow``), in the order it lists them."""


def short_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def report_import(result: ImportResult, as_json: bool) -> None:
    models, hows = result.models, {k: str(v) for k, v in result.files.items()}
    if as_json:
        print_json(
            [
                {
                    "name": m.name,
                    "digest": m.manifest_digest,
                    "size": m.size,
                    "files": hows,
                    "warnings": result.warnings,
                }
                for m in models
            ]
        )
        return
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    counts = {how: list(hows.values()).count(how) for how in IMPORT_VERBS}
    note = "".join(f", {n} file(s) {IMPORT_VERBS[how]}" for how, n in counts.items() if n)
    for model in models:
        console.print(
            f"imported [bold]{model.name}[/] ({human_size(model.size)}, "
            f"{short_digest(model.manifest_digest)}{note})"
        )
