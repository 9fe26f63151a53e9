"""The one error hierarchy of the project.

Every error a user can meet carries a stable, machine-readable ``code`` and the HTTP status that
fits it: the CLI prints the code, the daemon answers with the status and the code in its JSON
error body (``mlxserve.server.errors`` shapes it).
It lives in ``modelstore`` because that is the lowest layer: runners and the daemon subclass
these classes but ``modelstore`` never imports them.
"""

from __future__ import annotations


class MlxserveError(Exception):
    """Base of every error the project raises on purpose."""

    code = "internal_error"
    http_status = 500
    """The HTTP status the daemon answers this error with (``mlxserve/server/errors.py``)."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidReferenceError(MlxserveError):
    """A model reference that does not match the grammar (see ``modelstore.reference``)."""

    code = "invalid_reference"
    http_status = 400


class InvalidDigestError(MlxserveError):
    """A digest that is not ``sha256:`` and 64 lowercase hex digits."""

    code = "invalid_digest"
    http_status = 400


class ModelNotFoundError(MlxserveError):
    """A name the store, registry or hub has no model under."""

    code = "model_not_found"
    http_status = 404


class BlobNotFoundError(MlxserveError):
    """A digest the store holds no blob for."""

    code = "blob_not_found"
    http_status = 404


class DigestMismatchError(MlxserveError):
    """Bytes whose sha256 is not the digest they were stored or served under."""

    code = "digest_mismatch"
    http_status = 400


class CorruptStoreError(MlxserveError):
    """A manifest or blob on disk that fails verification."""

    code = "corrupt_store"
    http_status = 500


class InvalidManifestError(MlxserveError):
    """A manifest or OCI index that does not parse or does not hold together."""

    code = "invalid_manifest"
    http_status = 400


class ImportSourceError(MlxserveError):
    """A path given to ``import`` that is not a model folder, a GGUF file or a packed archive."""

    code = "invalid_import_source"
    http_status = 400


class SpecValidationError(MlxserveError):
    """A ModelSpec that fails its schema or its semantic checks; ``details['errors']`` lists all."""

    code = "invalid_modelspec"
    http_status = 400


class InvalidRequestError(MlxserveError):
    """A request that is well-formed JSON but asks for something invalid. It lives here because
    ``modelstore.parameters`` refuses an out-of-range sampling value for every door with it."""

    code = "invalid_request"
    http_status = 400


class TemplateError(MlxserveError):
    """A chat template that fails to compile or render (including sandbox violations and an
    exhausted render budget, see ``modelstore.chat_template``)."""

    code = "template_error"
    http_status = 400


class StoreHomeError(MlxserveError):
    """A store home that cannot be used: not a folder, unreadable, read-only or on a full disk.
    Its message is one line: the path, what is wrong, what to do."""

    code = "store_unusable"
    http_status = 500


class StoreLockedError(MlxserveError):
    """The store held by another process past the wait: retry after a moment."""

    code = "store_locked"
    http_status = 503


class RegistryError(MlxserveError):
    """A registry that cannot be reached, or answered what the distribution API does not allow."""

    code = "registry_error"
    http_status = 502


class RegistryAuthError(RegistryError):
    """A registry that wants credentials we do not have, or refused the ones we sent."""

    code = "registry_unauthorized"
    http_status = 401


class QuantizeError(MlxserveError):
    """A quantization that cannot be done: an unknown recipe, an already quantized source, or
    not enough disk or memory (refused before any work starts)."""

    code = "quantize_error"
    http_status = 400


class DiskFullError(MlxserveError):
    """The store's disk filled while writing; the partial file was removed."""

    code = "disk_full"
    http_status = 507
