"""Errors of the inference core and the daemon, on top of ``modelstore.errors``.

Codes are stable: clients match on them. ``mlxserve.server.errors`` maps each code to an HTTP
status; nothing else does.
"""

from __future__ import annotations

from modelstore.errors import MlxserveError


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


class TemplateError(MlxserveError):
    """A chat template that fails to compile or render (including sandbox violations)."""

    code = "template_error"


class QueueFullError(MlxserveError):
    code = "queue_full"


class ModelUnavailableError(MlxserveError):
    """A model that cannot serve right now (a rank of its distributed group died or hung);
    answered 503 with ``Retry-After``, while the daemon keeps serving its other models."""

    code = "model_unavailable"


class DistributedError(MlxserveError):
    """A distributed group that cannot start: a bad hostfile, a backend that is missing, a
    rank whose store lacks the model or holds different bytes (the message names the host)."""

    code = "distributed_error"


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
