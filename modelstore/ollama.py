"""Ollama's models, read where Ollama keeps them (or as its registry serves them).

Ollama's store is ``$OLLAMA_MODELS`` (else ``~/.ollama/models``): a Docker v2 manifest per tag
at ``manifests/<host>/<namespace>/<name>/<tag>``, and content-addressed blobs at
``blobs/sha256-<hex>``. A manifest's layers carry Ollama's media types; ``ollama_draft`` maps
them onto a ``ModelDraft`` (weights hard-linked into our store, verified against the digest
the manifest names; Modelfile parameters renamed to ours; system prompt and licence kept; the
Go template kept for reference only, because the chat template we render is the GGUF's own
Jinja one). ``registry/ollama.py`` applies the same mapping to what it pulls.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore import mediatypes
from modelstore.adapters import adapter_layers
from modelstore.blobs import ProgressCallback
from modelstore.draft import (
    LICENSE_TITLE,
    PARAMS_TITLE,
    SYSTEM_TITLE,
    LayerSource,
    ModelDraft,
    params_bytes,
)
from modelstore.errors import BlobNotFoundError, ImportSourceError, InvalidManifestError
from modelstore.importer import ImportResult
from modelstore.manifest import Descriptor
from modelstore.parameters import (
    SAMPLING_FIELDS,
    SPEC_PARAMETERS,
    api_names,
    from_ollama,
    out_of_range,
)
from modelstore.reference import ModelReference, parse_reference
from modelstore.sources import draft_from_gguf, projector_layer
from modelstore.store import Check, ModelStore

OLLAMA_MODELS_ENV = "OLLAMA_MODELS"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"
MAX_MANIFEST_BYTES = 4 << 20
MAX_TEXT_LAYER_BYTES = 1 << 20
"""Params, system prompts, licences and templates are small; a bigger one is not Ollama's."""

MODEL = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"
LICENSE = "application/vnd.ollama.image.license"
TEMPLATE = "application/vnd.ollama.image.template"
ADAPTER = "application/vnd.ollama.image.adapter"
PROJECTOR = "application/vnd.ollama.image.projector"
MESSAGES = "application/vnd.ollama.image.messages"

TEMPLATE_TITLE = "ollama.template.gotmpl"
"""The Go template, stored as a plain file: for reference, never rendered."""
KEPT_FILES = {
    MESSAGES: "ollama.messages.json",
}
"""Layers no runner here uses yet, kept so that nothing the user had is lost."""

LOAD_TIME_NAMES = {
    "num_ctx": "context_length",
    "num_gpu": "n_gpu_layers",
    "num_thread": "n_threads",
}
"""Ollama's names for the load-time parameters (``RUNNER_PARAMETERS``), which
``parameters.py`` (sampling only) does not declare."""
PARAMETER_NAMES = {
    wire: name for wire, (name, _) in api_names("ollama").items() if name in SPEC_PARAMETERS
} | LOAD_TIME_NAMES
"""Modelfile ``PARAMETER`` names -> ModelSpec parameters; others (``mirostat``, ...) have no
counterpart here and are left out (``map_parameters`` says which)."""


def ollama_root() -> Path:
    return Path(os.environ.get(OLLAMA_MODELS_ENV) or Path.home() / ".ollama" / "models")


@dataclass(frozen=True)
class OllamaModel:
    """One tag in Ollama's store (or registry): where it came from and its layers."""

    host: str
    namespace: str
    name: str
    tag: str
    layers: list[Descriptor]

    @property
    def display_name(self) -> str:
        """As ``ollama list`` prints it."""
        prefix = "" if self.host == OLLAMA_REGISTRY else f"{self.host}/"
        prefix += "" if self.namespace == OLLAMA_NAMESPACE and not prefix else f"{self.namespace}/"
        return f"{prefix}{self.name}:{self.tag}"

    @property
    def store_name(self) -> str:
        """Our name for it: Ollama's, without its registry host."""
        space = "" if self.namespace == OLLAMA_NAMESPACE else f"{self.namespace}/"
        return f"{space}{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def weights(self) -> Descriptor:
        found = [layer for layer in self.layers if layer.media_type == MODEL]
        if len(found) != 1:
            raise InvalidManifestError(
                f"{self.display_name}: expected one {MODEL} layer, found {len(found)}"
            )
        return found[0]


def parse_manifest(raw: bytes, host: str, namespace: str, name: str, tag: str) -> OllamaModel:
    """An Ollama (Docker v2) manifest: only its layers matter; its config blob is Ollama's."""
    try:
        body = json.loads(raw)
        layers = [Descriptor.from_json(layer) for layer in body["layers"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidManifestError(f"{name}:{tag}: not an Ollama manifest ({exc})") from None
    return OllamaModel(host, namespace, name, tag, layers)


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def list_models(root: Path | None = None) -> list[OllamaModel]:
    """Every tag in Ollama's store, sorted by name (unreadable manifests are skipped)."""
    root = root or ollama_root()
    found = []
    for path in sorted((root / "manifests").glob("*/*/*/*")):
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            continue
        host, namespace, name = path.parts[-4:-1]
        try:
            found.append(parse_manifest(path.read_bytes(), host, namespace, name, path.name))
        except InvalidManifestError:
            continue
    return found


def ollama_reference(text: str) -> ModelReference:
    """``[host/][namespace/]name[:tag]`` with Ollama's defaults (its registry, ``library``)."""
    ref = parse_reference(text)
    return ModelReference(
        ref.name, ref.tag, ref.namespace or OLLAMA_NAMESPACE, ref.host or OLLAMA_REGISTRY
    )


def find_model(text: str, root: Path | None = None) -> OllamaModel:
    root = root or ollama_root()
    ref = ollama_reference(text)
    assert ref.host is not None and ref.namespace is not None
    path = root / "manifests" / ref.host / ref.namespace / ref.name / ref.tag
    if not path.is_file():
        raise ImportSourceError(
            f"{text} is not in Ollama's store at {root} ('mlxctl import --from-ollama' lists "
            "what is)",
            path=str(path),
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(f"{path}: too large for a manifest")
    return parse_manifest(path.read_bytes(), ref.host, ref.namespace, ref.name, ref.tag)


def _text(path: Path, layer: Descriptor) -> str:
    if layer.size > MAX_TEXT_LAYER_BYTES:
        raise InvalidManifestError(f"{layer.media_type} layer of {layer.size} bytes is too large")
    return path.read_bytes()[:MAX_TEXT_LAYER_BYTES].decode("utf-8", errors="replace")


def map_parameters(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Ollama's parameters under our names (its special values in our terms), and the names
    that have no counterpart, or a value out of our range (Ollama passes any number on;
    ``modelstore/parameters.py`` says what a model here may default to)."""
    mapped: dict[str, Any] = {}
    dropped = []
    for wire, value in params.items():
        name = PARAMETER_NAMES.get(wire)
        value = from_ollama(name, value) if name in SAMPLING_FIELDS else value
        if name is None or (name in SAMPLING_FIELDS and out_of_range(name, value, wire)):
            dropped.append(wire)
        else:
            mapped[name] = value
    if isinstance(mapped.get("stop"), str):
        mapped["stop"] = [mapped["stop"]]
    return mapped, sorted(dropped)


def ollama_draft(model: OllamaModel, locate: Any) -> tuple[ModelDraft, list[str]]:
    """The draft for ``model``; ``locate(digest)`` is where a layer's bytes are on disk.

    Every file layer carries the digest the manifest names, so the store refuses a blob whose
    bytes have changed (``DigestMismatchError``) instead of storing it under a new digest.
    Returns the draft and the Ollama parameters that were left out.
    """
    weights = model.weights()

    def existing(layer: Descriptor) -> Path:
        path = locate(layer.digest)
        if not path.is_file():
            raise BlobNotFoundError(
                f"{model.display_name}: its manifest names blob {layer.digest} "
                f"({layer.media_type}), which is missing at {path}",
                digest=layer.digest,
            )
        return path

    draft = draft_from_gguf(existing(weights))
    draft.config.source = {"kind": "ollama", "name": model.display_name}
    draft.layers = [
        LayerSource(
            mediatypes.WEIGHTS_GGUF,
            f"{model.name}.gguf",
            path=locate(weights.digest),
            digest=weights.digest,
        )
    ]
    dropped: list[str] = []
    for layer in model.layers:
        if layer.media_type == PARAMS:
            try:
                params = json.loads(_text(existing(layer), layer))
            except json.JSONDecodeError as exc:
                raise InvalidManifestError(f"params layer is not JSON: {exc}") from None
            mapped, dropped = map_parameters(params if isinstance(params, dict) else {})
            draft.replace_layer(mediatypes.PARAMS, PARAMS_TITLE, params_bytes(mapped))
        elif layer.media_type == SYSTEM:
            text = _text(existing(layer), layer)
            draft.replace_layer(mediatypes.SYSTEM_PROMPT, SYSTEM_TITLE, text.encode())
        elif layer.media_type == LICENSE:
            text = _text(existing(layer), layer)
            draft.replace_layer(mediatypes.LICENSE, LICENSE_TITLE, text.encode())
            draft.config.license = draft.config.license or text.splitlines()[0][:100]
        elif layer.media_type == TEMPLATE:
            draft.layers.append(
                LayerSource(
                    mediatypes.OTHER_FILE, TEMPLATE_TITLE, path=existing(layer), digest=layer.digest
                )
            )
        elif layer.media_type == ADAPTER:
            (adapter,) = adapter_layers(existing(layer), draft)
            draft.layers.append(dataclasses.replace(adapter, digest=layer.digest))
        elif layer.media_type == PROJECTOR:
            draft.layers.append(
                dataclasses.replace(projector_layer(existing(layer), draft), digest=layer.digest)
            )
        elif layer.media_type in KEPT_FILES:
            draft.layers.append(
                LayerSource(
                    mediatypes.OTHER_FILE,
                    KEPT_FILES[layer.media_type],
                    path=existing(layer),
                    digest=layer.digest,
                )
            )
    return draft, dropped


def import_ollama(
    store: ModelStore,
    model: OllamaModel,
    root: Path | None = None,
    *,
    name: str | None = None,
    allow_link: bool = True,
    progress: ProgressCallback | None = None,
    check: Check | None = None,
) -> tuple[ImportResult, list[str]]:
    """Store one tag of Ollama's store (hard links where possible; ``check`` as
    ``ModelStore.commit``'s); returns the result and the Ollama parameters that were left out."""
    root = root or ollama_root()
    draft, dropped = ollama_draft(model, lambda digest: blob_path(root, digest))
    result = store.commit(
        draft, name or model.store_name, allow_link=allow_link, progress=progress, check=check
    )
    return ImportResult([result.model], result.blobs), dropped
