"""Errors of the inference core and the daemon, on top of ``modelstore.errors``.

Codes are stable: clients match on them. ``mlxserve.server.errors`` maps each code to an HTTP
status; nothing else does.
"""

from __future__ import annotations

from modelstore.errors import MlxserveError
from modelstore.errors import TemplateError as TemplateError  # lives with the template sandbox


class ModelNotLoadedError(MlxserveError):
    code = "model_not_loaded"


class UnsupportedArchitectureError(MlxserveError):
    code = "unsupported_architecture"


class UnsupportedFormatError(MlxserveError):
    """A model whose format no installed runner can run (``details['runners']`` says which can)."""

    code = "unsupported_format"


class RunnerUnavailableError(MlxserveError):
    """A runner whose library is not installed; the message names the extra to install."""

    code = "runner_unavailable"


class ContextOverflowError(MlxserveError):
    """A prompt (plus what it asks to generate) that does not fit the context; never truncated."""

    code = "context_overflow"


class OutOfMemoryError(MlxserveError):
    code = "out_of_memory"


class InferenceError(MlxserveError):
    code = "inference_failed"


class InvalidRequestError(MlxserveError):
    """A request that is well-formed JSON but asks for something invalid."""

    code = "invalid_request"


class UnsupportedFeatureError(MlxserveError):
    """A request option the chosen runner cannot honour (never ignored silently)."""

    code = "unsupported_feature"


class InvalidFormatError(MlxserveError):
    """A ``format`` / ``response_format`` JSON Schema that is invalid, unsatisfiable or uses
    what the grammar engine cannot enforce (checked before any runner sees it)."""

    code = "invalid_format"


class QueueFullError(MlxserveError):
    code = "queue_full"


class UnauthorizedError(MlxserveError):
    code = "unauthorized"


class ForbiddenError(MlxserveError):
    code = "forbidden"


class NotFoundError(MlxserveError):
    """A path the daemon does not serve."""

    code = "not_found"


class MethodNotAllowedError(MlxserveError):
    code = "method_not_allowed"


class RequestTooLargeError(MlxserveError):
    code = "request_too_large"


class InternalError(MlxserveError):
    """Anything unexpected: logged with its trace, answered without it."""

    code = "internal_error"
