"""OCI image manifests (schemaVersion 2) as dataclasses, with strict parsing.

Serialisation is canonical (fixed key order, no whitespace) so the same model always has the
same manifest digest: importing twice, or packing twice, gives identical bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelstore import mediatypes
from modelstore.errors import InvalidManifestError
from modelstore.reference import validate_digest


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str | None:
        return self.annotations.get(mediatypes.ANNOTATION_TITLE)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            body["annotations"] = dict(sorted(self.annotations.items()))
        return body

    @classmethod
    def from_json(cls, body: Any) -> Descriptor:
        if not isinstance(body, dict):
            raise InvalidManifestError("a descriptor must be an object")
        try:
            media_type, digest, size = body["mediaType"], body["digest"], body["size"]
        except KeyError as exc:
            raise InvalidManifestError(f"descriptor without {exc.args[0]!r}") from None
        annotations = body.get("annotations") or {}
        if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
            raise InvalidManifestError("descriptor with a bad mediaType or size")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidManifestError("descriptor annotations must map strings to strings")
        validate_digest(digest)
        title = annotations.get(mediatypes.ANNOTATION_TITLE)
        if title is not None and not is_safe_file_name(title):
            raise InvalidManifestError(f"layer title {title!r} is not a plain file name")
        return cls(media_type, digest, size, dict(annotations))


def is_safe_file_name(name: str) -> bool:
    """A layer title becomes a file name in the runtime folder: no paths, no tricks."""
    return (
        bool(name)
        and len(name) <= 255
        and name not in {".", ".."}
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.annotations:
            body["annotations"] = dict(sorted(self.annotations.items()))
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifestError(f"manifest is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("schemaVersion") != 2:
            raise InvalidManifestError("not an OCI manifest (schemaVersion must be 2)")
        if body.get("mediaType", mediatypes.OCI_MANIFEST) != mediatypes.OCI_MANIFEST:
            raise InvalidManifestError(f"unsupported manifest media type {body.get('mediaType')}")
        layers = body.get("layers")
        if not isinstance(layers, list):
            raise InvalidManifestError("manifest without a layers list")
        config = Descriptor.from_json(body.get("config"))
        if config.media_type != mediatypes.MODEL_CONFIG:
            raise InvalidManifestError(
                f"not an mlxserve model (config media type {config.media_type})"
            )
        parsed = [Descriptor.from_json(layer) for layer in layers]
        titles = [layer.title for layer in parsed if layer.title]
        if len(titles) != len(set(titles)):
            raise InvalidManifestError("two layers share a file name")
        return cls(config, parsed, dict(body.get("annotations") or {}))

    def blob_digests(self) -> list[str]:
        return [self.config.digest, *(layer.digest for layer in self.layers)]

    def total_size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)

    def layers_of(self, media_type: str) -> list[Descriptor]:
        return [layer for layer in self.layers if layer.media_type == media_type]
