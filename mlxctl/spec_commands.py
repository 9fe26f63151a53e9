"""ModelSpec commands: ``spec validate``, ``spec pack`` and ``create``; built for CI pipelines.

``modelstore.spec`` (yaml, jsonschema) is imported inside each command: ``mlxctl --help``
loads every command module and should not pay for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mlxctl.output import byte_progress, console, human_size, print_json
from modelstore.errors import SpecValidationError
from modelstore.store import ModelStore

EXIT_INVALID = 1
spec_file = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def _name_for(spec_data: dict, name: str | None, file: Path) -> str:
    chosen = name or spec_data.get("name")
    if not chosen:
        raise SpecValidationError(f"{file} has no 'name': give one on the command line")
    return chosen


@click.group("spec")
def spec_group() -> None:
    """Validate and pack ModelSpecs (YAML or JSON)."""


@spec_group.command("validate")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--json", "as_json", is_flag=True, help="Print the errors as JSON.")
def validate_command(files: tuple[Path, ...], as_json: bool) -> None:
    """Check ModelSpecs against the schema, their files and their templates, every error of
    every file in one pass; exit 1 if any is invalid.

    \b
    Examples:
      mlxctl spec validate my-model.modelspec.yaml
      mlxctl spec validate specs/*.yaml --json
    """
    from modelstore.spec import load_spec

    specs = [(file, load_spec(file)) for file in files]
    reports = [
        {
            "file": str(file),
            "valid": not spec.problems,
            "errors": [problem.__dict__ for problem in spec.problems],
        }
        for file, spec in specs
    ]
    if as_json:
        print_json(reports[0] if len(reports) == 1 else reports)
    for file, spec in specs:
        if as_json:
            continue
        for problem in spec.problems:
            click.echo(
                f"{file}:{problem.line or 0}: {problem.pointer or '/'}: {problem.message}", err=True
            )
        if spec.problems:
            click.echo(f"{file}: {len(spec.problems)} error(s)", err=True)
        else:
            console.print(f"{file}: valid")
    if any(spec.problems for _, spec in specs):
        sys.exit(EXIT_INVALID)


@spec_group.command("pack")
@spec_file
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="The archive to write (an OCI image layout in a tar).",
)
@click.option("--name", help="Reference recorded in the archive (default: the spec's name).")
@click.option("--json", "as_json", is_flag=True)
def pack_command(file: Path, out: Path, name: str | None, as_json: bool) -> None:
    """Build a ModelSpec into a reproducible OCI layout archive (same inputs, same bytes).

    \b
    Example:
      mlxctl spec pack model.yaml -o model.tar && sha256sum model.tar
    """
    import tempfile

    from modelstore.ocilayout import pack
    from modelstore.spec import build_draft, load_spec, require_valid, reshape

    spec = load_spec(file)
    require_valid(spec)
    reference = _name_for(spec.data, name, file)
    store = ModelStore()
    with tempfile.TemporaryDirectory(prefix="mlxctl-pack-") as work:
        draft = build_draft(spec, store, Path(work))
        with console.status(f"building {reference}") as status:
            draft = reshape(spec, draft, Path(work), report=status.update)
        with byte_progress(f"packing {out.name}", draft.total_source_bytes()) as progress:
            result = pack(draft, reference, out, progress)
    if as_json:
        print_json(
            {
                "path": str(result.path),
                "digest": result.digest,
                "manifest": result.manifest_digest,
                "size": result.size,
            }
        )
    else:
        console.print(f"packed {reference} into {out} ({human_size(result.size)}, {result.digest})")


@click.command("create")
@click.argument("name", required=False)
@click.option(
    "-f",
    "--file",
    "file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The ModelSpec to build.",
)
@click.option(
    "-q",
    "--quantize",
    default=None,
    metavar="RECIPE",
    help="Quantize the weights: Q4/Q6/Q8 (MLX) or Q4_K_M/Q5_K_M/Q6_K/Q8_0 (GGUF).",
)
@click.option(
    "--fuse", is_flag=True, help="Fuse the spec's adapter into new weights instead of storing it."
)
def create_command(name: str | None, file: Path, quantize: str | None, fuse: bool) -> None:
    """Build a model into the store from a ModelSpec.

    \b
    Example:
      mlxctl create mymodel:latest -f mymodel.modelspec.yaml
      mlxctl create mymodel:q4 -f mymodel.modelspec.yaml --quantize Q4_K_M
      mlxctl create tuned:fused -f tuned.modelspec.yaml --fuse
    """
    import tempfile

    from mlxserve.runners.trial import loads_check
    from modelstore.spec import build_draft, load_spec, require_valid, reshape

    spec = load_spec(file)
    require_valid(spec)
    reference = _name_for(spec.data, name, file)
    store = ModelStore()
    store.blobs.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.blobs.tmp_dir) as work:
        draft = build_draft(spec, store, Path(work))
        with console.status(f"building {reference}") as status:
            draft = reshape(
                spec, draft, Path(work), quantize=quantize, fuse=fuse, report=status.update
            )
        with byte_progress(f"creating {reference}", draft.total_source_bytes()) as progress:
            result = store.commit(draft, reference, progress=progress, check=loads_check(store))
    console.print(f"created [bold]{result.model.name}[/] ({human_size(result.model.size)})")
