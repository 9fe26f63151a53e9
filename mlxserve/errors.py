"""Errors of the inference core and the daemon, on top of ``modelstore.errors``.

Codes are stable: clients match on them. Each class carries its HTTP status;
``mlxserve.server.errors`` turns an error into each API's error body.
"""

from __future__ import annotations

from modelstore.errors import InvalidRequestError as InvalidRequestError  # parameters.py's
from modelstore.errors import MlxserveError
from modelstore.errors import TemplateError as TemplateError  # lives with the template sandbox


class RequestLimitError(InvalidRequestError):
    """A request past one of its size limits (``server/limits.py``; a request's images,
    ``images.py``); ``details['limit']`` holds the bound."""

    code = "request_limit"


class ModelNotLoadedError(MlxserveError):
    """A request that reached a model as it was unloaded (keep_alive, eviction, shutdown)."""

    code = "model_not_loaded"


class UnsupportedArchitectureError(MlxserveError):
    """A model whose architecture the chosen runner's library does not implement."""

    code = "unsupported_architecture"
    http_status = 400


class UnsupportedQuantizationError(MlxserveError):
    """A GGUF tensor type that cannot be dequantized for MLX (it still runs on llama.cpp)."""

    code = "unsupported_quantization"
    http_status = 400


class UnsupportedFormatError(MlxserveError):
    """A model whose format no installed runner can run (``details['runners']`` says which can)."""

    code = "unsupported_format"
    http_status = 400


class RunnerUnavailableError(MlxserveError):
    """A runner whose library is not installed; the message names the extra to install."""

    code = "runner_unavailable"
    http_status = 501


class ContextOverflowError(MlxserveError):
    """A prompt (plus what it asks to generate) that does not fit the context; never truncated."""

    code = "context_overflow"
    http_status = 400


class OutOfMemoryError(MlxserveError):
    """A load or a context that does not fit in the memory the daemon plans within."""

    code = "out_of_memory"
    http_status = 507


class InferenceError(MlxserveError):
    """The runner's library failed during generation, with its own reason."""

    code = "inference_failed"


class UnsupportedFeatureError(MlxserveError):
    """A request option the chosen runner cannot honour (never ignored silently)."""

    code = "unsupported_feature"
    http_status = 400


class InvalidFormatError(MlxserveError):
    """A ``format`` / ``response_format`` JSON Schema that is invalid, unsatisfiable or uses
    what the grammar engine cannot enforce (checked before any runner sees it)."""

    code = "invalid_format"
    http_status = 400


class QueueFullError(MlxserveError):
    """A model's slots and its wait queue are full: retry after a moment."""

    code = "queue_full"
    http_status = 429


class ModelUnavailableError(MlxserveError):
    """A model that cannot serve right now (a rank of its distributed group died or hung);
    answered 503 with ``Retry-After``, while the daemon keeps serving its other models."""

    code = "model_unavailable"
    http_status = 503


class ModelCrashedError(MlxserveError):
    """The model's worker process died (a library abort, a signal), hung past its deadline or
    outgrew its memory limit (``runners/isolated.py``); the next request starts a new one."""

    code = "model_crashed"


class ModelUnloadableError(MlxserveError):
    """A model that failed its trial load at create or import (``runners/trial.py``): its
    library refused it, aborted on it or hung on it. Refused then, with the reason, instead of
    stored and failing on every chat."""

    code = "model_unloadable"
    http_status = 400


class ModelCrashLoopError(MlxserveError):
    """A model whose worker crashed again and again without serving anything in between:
    refused, with the last crash's reason, until the model is created again."""

    code = "model_crash_loop"


class DistributedError(MlxserveError):
    """A distributed group that cannot start: a bad hostfile, a backend that is missing, a
    rank whose store lacks the model or holds different bytes (the message names the host)."""

    code = "distributed_error"


class UnauthorizedError(MlxserveError):
    """A request without the API key the daemon requires, or with another."""

    code = "unauthorized"
    http_status = 401


class ForbiddenError(MlxserveError):
    """A Host or Origin header the daemon does not serve (DNS rebinding, CORS)."""

    code = "forbidden"
    http_status = 403


class NotFoundError(MlxserveError):
    """A path the daemon does not serve."""

    code = "not_found"
    http_status = 404


class MethodNotAllowedError(MlxserveError):
    """A path the daemon serves, asked with a method it does not take."""

    code = "method_not_allowed"
    http_status = 405


class RequestTooLargeError(MlxserveError):
    """A body over ``max_body_bytes``, refused before it is read."""

    code = "request_too_large"
    http_status = 413


class InternalError(MlxserveError):
    """Anything unexpected: logged with its trace, answered without it."""

    code = "internal_error"
