"""What cuts across every route: request ids, access control, error shape, JSON access logs."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from mlxserve import __version__
from mlxserve.errors import (
    ForbiddenError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    RequestTooLargeError,
    UnauthorizedError,
)
from mlxserve.server import webui
from mlxserve.server.config import Settings
from mlxserve.server.errors import error_response
from mlxserve.server.metrics import Metrics
from modelstore.errors import MlxserveError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-Id"
VERSION_HEADER = "X-Mlxserve-Version"
CONTEXT_HEADER = "X-Mlxserve-Context"
"""On a generation: the context its model is loaded with, and ``; requested=N`` when the
request's ``num_ctx`` was clamped to it (docs/API.md, "Context length")."""
CONTEXT = "context"
"""The request key a chat route sets for ``CONTEXT_HEADER``."""
CLIENT_CLOSED_REQUEST = 499
"""Logged (never sent) when the client went away mid-request: nginx's convention."""
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")
"""RFC 9110 ``Host`` for the names a local daemon answers to: a DNS name or an IP literal and
a port; no userinfo, no percent-escapes, nothing a lenient URL parser could read two ways."""
OPEN_PATHS = frozenset({"/api/health"})
"""Answer without an API key: liveness checks carry no data."""
log = logging.getLogger("mlxserve.access")
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for scheme in ("http", "https")
        for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
"""Ollama's default origins (``envconfig/config.go``: local pages, Electron/Tauri apps) and the
origins editor webviews send (VS Code extensions)."""
CORS_ORIGIN = "cors_origin"
CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Request-Id"
"""What a preflight that names no headers is told it may send (Ollama allows these)."""
CORS_MAX_AGE_S = "600"


def _allowed_hosts(settings: Settings) -> set[str]:
    names = set(LOCAL_NAMES) | {settings.host, socket.gethostname()}
    names |= {h.lower() for h in settings.allowed_hosts}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    return {name.lower() for name in names}


def _host_name(value: str) -> str | None:
    """The host of a ``Host`` header, or ``None`` if it is outside the grammar."""
    match = _HOST.fullmatch(value)
    return match.group(1).strip("[]").lower() if match else None


def _supplied_key(request: web.Request) -> bytes:
    """``Authorization: Bearer KEY`` (OpenAI and Ollama clients), else ``x-api-key: KEY``
    (Anthropic's clients send only that)."""
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer "):
        return bearer.removeprefix("Bearer ").strip().encode()
    return request.headers.get("x-api-key", "").strip().encode()


def make_middlewares(settings: Settings, metrics: Metrics) -> list[Callable]:
    hosts = _allowed_hosts(settings)
    allowed_origin = origin_matcher(settings.allowed_origins)
    key = settings.api_key.encode() if settings.api_key else None

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request["request_id"] = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        request["log"] = {}
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except MlxserveError as error:
            response = error_response(error, request.path)
            if isinstance(error, MethodNotAllowedError):
                response.headers["Allow"] = ", ".join(error.details["allowed"])
            status = response.status
            metrics.errors.labels(error.code).inc()
            request["log"]["error"] = error.code
            return response
        except ConnectionResetError:
            # The client went away (often during ``write_eof``): a log line, not a traceback.
            status = CLIENT_CLOSED_REQUEST
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            route = request.match_info.route.resource
            route_name = route.canonical if route is not None else "unmatched"
            metrics.requests.labels(route_name, str(status)).inc()
            entry = {
                "request_id": request["request_id"],
                "method": request.method,
                "route": route_name,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                **request["log"],
            }
            log.info(json.dumps(entry))

    @web.middleware
    async def access_control(request: web.Request, handler: Handler) -> web.StreamResponse:
        """DNS rebinding (Host) and the API key (browsers' Origin: ``cors``)."""
        if _host_name(request.headers.get("Host", "")) not in hosts:
            raise ForbiddenError("this Host is not allowed (DNS rebinding protection)")
        needs_key = (
            key is not None
            and request.path not in OPEN_PATHS
            and not (settings.webui and webui.is_page_request(request))
        )
        if needs_key and not hmac.compare_digest(_supplied_key(request), key):
            raise UnauthorizedError(
                "missing or wrong API key (Authorization: Bearer ..., or x-api-key)"
            )
        return await handler(request)

    @web.middleware
    async def error_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors and anything unexpected, in our error shape (never a trace)."""
        try:
            return await handler(request)
        except MlxserveError:
            raise
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLargeError(
                f"request body larger than {settings.max_body_bytes} bytes"
            ) from None
        except web.HTTPNotFound:
            raise NotFoundError(f"no route {request.method} {request.path}") from None
        except web.HTTPMethodNotAllowed as exc:
            raise MethodNotAllowedError(
                f"{request.method} is not allowed on {request.path}",
                allowed=sorted(exc.allowed_methods),
            ) from None
        except web.HTTPException:
            raise
        except (ConnectionResetError, TimeoutError):
            raise
        except Exception:
            # Never the exception's text: it can carry paths and internals. The request id
            # finds the trace in the log.
            request_id = request["request_id"]
            logging.getLogger("mlxserve").exception(
                "unhandled error on %s (request id %s)", request.path, request_id
            )
            raise InternalError(
                f"internal error (request id {request_id}); see the daemon log",
                request_id=request_id,
            ) from None

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Browsers, extensions and editor webviews (``Origin``), as Ollama answers them: an
        allowed origin gets its preflight answered and the CORS headers on every response
        (``add_cors_headers``); any other origin is refused before a handler runs."""
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if not allowed_origin(origin):
            raise ForbiddenError(
                f"origin {origin} is not allowed (add it to MLXSERVE_ORIGINS; see docs/API.md)"
            )
        request[CORS_ORIGIN] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204)  # a preflight carries no credentials: no key check
        return await handler(request)

    return [request_context, cors, access_control, error_shape]


def origin_matcher(extra: list[str]) -> Callable[[str], bool]:
    """Whether an ``Origin`` is allowed: Ollama's defaults (``DEFAULT_ORIGINS``) plus
    ``MLXSERVE_ORIGINS``, where ``*`` matches any run of characters but ``/``, ``@`` and
    blanks, so a pattern never lets userinfo or a path through."""
    patterns = [*DEFAULT_ORIGINS, *(o.strip().rstrip("/") for o in extra if o.strip())]
    regex = re.compile(
        "|".join(
            "(?:" + "[^/@\\s]*".join(re.escape(part) for part in pattern.split("*")) + ")"
            for pattern in patterns
        ),
        re.IGNORECASE,
    )
    return lambda origin: any(regex.fullmatch(o) for o in (origin, origin.removesuffix("/")))


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: streams and errors of an allowed origin carry CORS headers."""
    origin = request.get(CORS_ORIGIN)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Expose-Headers"] = f"{REQUEST_ID_HEADER}, {CONTEXT_HEADER}"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", CORS_HEADERS
        )
        response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE_S


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams included, carries the request id and
    mlxserve's version (``/api/version`` answers the Ollama API version clients gate on); a
    generation also carries its context (``CONTEXT_HEADER``)."""
    response.headers[VERSION_HEADER] = __version__
    if "request_id" in request:
        response.headers[REQUEST_ID_HEADER] = request["request_id"]
    if CONTEXT in request:
        response.headers[CONTEXT_HEADER] = request[CONTEXT]
