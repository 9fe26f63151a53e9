"""The one parser of model references: ``[host[:port]/][namespace/]name[:tag][@sha256:<hex>]``.

Every name a user types goes through ``parse_reference`` before it touches the file system, so
the grammar is deliberately strict: lower-case path components, no ``..``, no empty parts, no
absolute paths, digests only as ``sha256:`` plus 64 lower-case hex digits. Written by hand
because the OCI distribution grammar (which this follows) has no maintained Python parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelstore.errors import InvalidDigestError, InvalidReferenceError

DEFAULT_TAG = "latest"
DEFAULT_HOST = "local"
"""Host folder for models that were never pulled from a registry."""
DEFAULT_NAMESPACE = "library"
MAX_REFERENCE_LENGTH = 255
MAX_COMPONENT_LENGTH = 64
MAX_TAG_LENGTH = 128

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HOST = re.compile(
    r"(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
    r"|\d{1,3}(?:\.\d{1,3}){3})(?::\d{1,5})?"
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lower-case hex digits, else raise."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidDigestError(
            f"invalid digest {digest!r}: expected 'sha256:' followed by 64 lower-case hex digits",
            digest=str(digest),
        )
    return digest


@dataclass(frozen=True)
class ModelReference:
    """A parsed reference; ``host``/``namespace`` are ``None`` when the user left them out."""

    name: str
    tag: str = DEFAULT_TAG
    namespace: str | None = None
    host: str | None = None
    digest: str | None = None

    @property
    def host_dir(self) -> str:
        """The host as a folder name (``:`` is not portable in file names)."""
        return (self.host or DEFAULT_HOST).replace(":", "_")

    @property
    def namespace_dir(self) -> str:
        return self.namespace or DEFAULT_NAMESPACE

    @property
    def repository(self) -> str:
        """``namespace/name`` as a registry sees it."""
        return f"{self.namespace_dir}/{self.name}"

    def with_tag(self, tag: str) -> ModelReference:
        return ModelReference(self.name, tag, self.namespace, self.host, None)

    def __str__(self) -> str:
        """The short form users type: defaults left out, as Ollama prints names."""
        parts = []
        if self.host:
            parts.append(self.host)
        if self.namespace and (self.host or self.namespace != DEFAULT_NAMESPACE):
            parts.append(self.namespace)
        parts.append(self.name)
        text = "/".join(parts) + f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _invalid(text: str, why: str) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid model reference {text!r}: {why}", reference=text)


def _looks_like_host(component: str) -> bool:
    return component == "localhost" or "." in component or ":" in component


def parse_reference(text: str) -> ModelReference:
    """Parse ``text`` or raise ``InvalidReferenceError`` saying what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise _invalid(str(text), "empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise _invalid(text[:40] + "...", f"longer than {MAX_REFERENCE_LENGTH} characters")
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in text):
        raise _invalid(text, "control, space or non-ASCII character")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        try:
            validate_digest(digest)
        except InvalidDigestError as exc:
            raise _invalid(text, exc.message) from None
    parts = remainder.split("/")
    if len(parts) > 3:
        raise _invalid(text, "too many '/' (expected [host/][namespace/]name)")
    host = None
    if len(parts) >= 2 and _looks_like_host(parts[0]):
        host = parts.pop(0)
        if not _HOST.fullmatch(host):
            raise _invalid(text, f"bad host {host!r}")
    elif len(parts) == 3:
        raise _invalid(text, f"{parts[0]!r} is not a host name")
    last = parts[-1]
    tag = DEFAULT_TAG
    if ":" in last:
        last, tag = last.split(":", 1)
        if not _TAG.fullmatch(tag) or len(tag) > MAX_TAG_LENGTH:
            raise _invalid(text, f"bad tag {tag!r}")
    parts[-1] = last
    for component in parts:
        if not component:
            raise _invalid(text, "empty path component")
        if len(component) > MAX_COMPONENT_LENGTH:
            raise _invalid(text, f"component longer than {MAX_COMPONENT_LENGTH} characters")
        if not _COMPONENT.fullmatch(component):
            raise _invalid(
                text,
                f"bad component {component!r} (lower-case letters, digits and . _ - between them)",
            )
    namespace = parts[0] if len(parts) == 2 else None
    return ModelReference(name=parts[-1], tag=tag, namespace=namespace, host=host, digest=digest)
