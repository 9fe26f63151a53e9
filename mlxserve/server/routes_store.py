"""Routes that change or describe the store: ``/api/create``, ``/api/pull``, ``/api/push``,
``/api/show``.

Each streams Ollama-shaped NDJSON status lines (``{"status": ...}``; progress lines add
``digest``, ``total``, ``completed``) unless ``stream: false``.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from mlxserve.errors import InvalidRequestError
from mlxserve.runners.trial import loads_check
from mlxserve.server import validate
from mlxserve.server.describe import show_body
from mlxserve.server.encoders import NDJSON, open_stream, write_ndjson
from mlxserve.server.errors import error_body, with_request_id
from mlxserve.server.state import MANAGER, STORE
from mlxserve.server.validate import json_body, model_name
from modelstore.errors import MlxserveError
from modelstore.model import OLLAMA_PARAMETER_NAMES
from modelstore.parameters import from_ollama
from modelstore.reference import parse_reference, validate_digest

routes = web.RouteTableDef()
Work = Callable[[Callable[[dict[str, Any]], None]], Awaitable[None]]


async def run_with_status(request: web.Request, stream: bool, work: Work) -> web.StreamResponse:
    """Run ``work`` (which reports status dicts) and relay them as NDJSON or one final object."""
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def report(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    task = asyncio.create_task(work(report))
    task.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    if not stream:
        await task
        return web.json_response({"status": "success"})
    response: web.StreamResponse | None = None
    while (event := await events.get()) is not None:
        if response is None:
            response = await open_stream(request, NDJSON)
        await write_ndjson(response, event)
    try:
        task.result()
    except MlxserveError as error:
        if response is None:
            raise
        # The error is the last line, as docs/API.md says: never "success" after it.
        stamped = with_request_id(error, request["request_id"])
        await write_ndjson(response, error_body(stamped, "native"))
    else:
        if response is None:
            response = await open_stream(request, NDJSON)
        await write_ndjson(response, {"status": "success"})
    await response.write_eof()
    return response


def link_blobs(store: Any, files: dict[str, Any], target: Path, param: str) -> None:
    """Uploaded blobs (``{file name: digest}``) as a folder of those names, for a spec."""
    target.mkdir()
    for file_name, digest in files.items():
        if not isinstance(file_name, str) or "/" in file_name or file_name.startswith("."):
            raise InvalidRequestError(f"bad file name {file_name!r} in '{param}'", param=param)
        blob = store.blobs.path(validate_digest(digest))
        if not blob.is_file():
            raise InvalidRequestError(
                f"blob {digest} was not uploaded (POST /api/blobs/{digest} first)", param=param
            )
        (target / file_name).symlink_to(blob)


def spec_from_create_body(body: dict[str, Any], store: Any, folder: Path) -> Path:
    """Ollama's create fields (``from``, ``files``, ``adapters``, ``template``, ``system``,
    ``parameters``, ``license``) become a ModelSpec, so ``create`` has one code path."""
    spec: dict[str, Any] = {}
    source = body.get("from")
    files = body.get("files")
    if source and files:
        raise InvalidRequestError("give either 'from' or 'files', not both")
    if isinstance(source, str) and source:
        spec["from"] = f"model://{source}"
    elif isinstance(files, dict) and files:
        link_blobs(store, files, folder / "weights", "files")
        ggufs = [name for name in files if name.endswith(".gguf")]
        spec["from"] = f"./weights/{ggufs[0]}" if len(ggufs) == 1 else "./weights"
    else:
        raise InvalidRequestError("'from' (a model) or 'files' (uploaded blobs) is required")
    adapters = body.get("adapters")
    if adapters:
        if not isinstance(adapters, dict):
            raise InvalidRequestError(
                "'adapters' must map file names to uploaded blob digests", param="adapters"
            )
        link_blobs(store, adapters, folder / "adapter", "adapters")
        spec["adapters"] = ["./adapter"]
    for key in ("template", "system", "license"):
        value = body.get(key)
        if isinstance(value, list):
            value = "\n".join(validate.typed(key, v, str) for v in value)
        elif value is not None:
            value = validate.typed(key, value, str)
        if value:
            spec[key] = value
    if body.get("parameters"):
        spec["parameters"] = spec_parameters(body["parameters"])
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spec_parameters(parameters: Any) -> dict[str, Any]:
    """Ollama's parameter names (``num_ctx``, ``num_predict``, ``repeat_penalty``...) as well
    as the ModelSpec's; the spec's schema then checks types and ranges."""
    if not isinstance(parameters, dict):
        raise InvalidRequestError("'parameters' must be an object", param="parameters")
    renamed: dict[str, Any] = {}
    for key, value in parameters.items():
        name = OLLAMA_PARAMETER_NAMES.get(key, key)
        if name in renamed:
            raise InvalidRequestError(
                f"parameter {name!r} is given twice ({key!r} is its Ollama name)",
                param="parameters",
            )
        renamed[name] = from_ollama(name, value) if name != key else value
    return renamed


def without_paths(error: MlxserveError, folder: Path) -> MlxserveError:
    """The same error, with the request's temporary folder taken out of its message: the
    client sent a body, not a file, and must not learn the server's paths."""
    spec = str(folder / "spec.yaml")
    error.message = (
        error.message.replace(f"{spec} has", "the request has")
        .replace(f"{folder}/weights/", "")
        .replace(f"{folder}/adapter/", "")
        .replace(f"{folder}/", "")
        .replace(str(folder), "the request")
    )
    error.details.pop("path", None)
    return error


@routes.post("/api/create")
async def create(request: web.Request) -> web.StreamResponse:
    from modelstore.spec import build_draft, load_spec, require_valid, reshape

    body = await json_body(request)
    name = parse_reference(model_name(body))  # an invalid name is refused before any work
    store = request.app[STORE]
    quantize = validate.optional(body, "quantize", str, None)
    stream = validate.optional(body, "stream", bool, True)

    async def work(report: Callable[[dict[str, Any]], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="mlxserve-create-") as temp:
            folder = Path(temp)
            try:
                spec_path = spec_from_create_body(body, store, folder)
                report({"status": "parsing modelspec"})
                spec = load_spec(spec_path)
                require_valid(spec)
                draft = await asyncio.to_thread(build_draft, spec, store, folder / "source")
                draft = await asyncio.to_thread(
                    reshape,
                    spec,
                    draft,
                    folder,
                    quantize=quantize,
                    report=lambda status: report({"status": status}),
                )
            except MlxserveError as error:
                raise without_paths(error, folder) from None
            report({"status": "writing manifest"})
            try:
                await asyncio.to_thread(store.commit, draft, name, check=loads_check(store))
            except MlxserveError as error:
                raise without_paths(error, folder) from None
            request.app[MANAGER].forget_crashes(str(name))

    return await run_with_status(request, stream, work)


def progress_reporter(report: Callable[[dict[str, Any]], None]) -> Callable[[Any], None]:
    def relay(event: Any) -> None:
        body = (
            event
            if isinstance(event, dict)
            else {k: v for k, v in vars(event).items() if v is not None}
        )
        report(body)

    return relay


@routes.post("/api/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    from modelstore.registry import pull_model
    from modelstore.registry.ollama import is_ollama_url, local_name, pull_ollama

    body = await json_body(request)
    name = model_name(body)
    # An invalid name is refused before any work (an ollama:// URL is checked by its parser).
    ollama = is_ollama_url(name)
    if ollama:
        local_name(name)
    else:
        name = str(parse_reference(name))
    insecure = validate.optional(body, "insecure", bool, False)
    stream = validate.optional(body, "stream", bool, True)
    store = request.app[STORE]

    async def work(report: Callable[[dict[str, Any]], None]) -> None:
        if ollama:
            await pull_ollama(store, name, insecure=insecure, progress=progress_reporter(report))
            return
        await pull_model(store, name, insecure=insecure, progress=progress_reporter(report))

    return await run_with_status(request, stream, work)


@routes.post("/api/push")
async def push(request: web.Request) -> web.StreamResponse:
    from modelstore.registry import push_model

    body = await json_body(request)
    name = str(parse_reference(model_name(body)))
    target = str(parse_reference(validate.optional(body, "destination", str) or name))
    insecure = validate.optional(body, "insecure", bool, False)
    stream = validate.optional(body, "stream", bool, True)
    store = request.app[STORE]

    async def work(report: Callable[[dict[str, Any]], None]) -> None:
        await push_model(store, name, target, insecure=insecure, progress=progress_reporter(report))

    return await run_with_status(request, stream, work)


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    """From the config and small text layers kept at import: no GGUF parsing per call."""
    body = await json_body(request)
    store = request.app[STORE]
    model = store.resolve(model_name(body))
    return web.json_response(await asyncio.to_thread(show_body, store, model))
