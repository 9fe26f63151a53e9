"""``mlxctl run``: one answer, or an interactive chat, streamed as it is generated.

With no daemon running the model runs in this process (``--local`` forces that); heavy
libraries are imported only here, when a model actually runs.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from mlxctl.client import DaemonError
from mlxctl.image_paths import PATH, take_images
from mlxctl.output import byte_progress
from modelstore.default_model import DEFAULT_MODEL
from modelstore.errors import ModelNotFoundError
from modelstore.parameters import CLI_PARAMETERS, check, kind_of


def sampling_options(command: Callable) -> Callable:
    """``--temperature``, ``--top-p``, ... : one flag per sampling knob marked for the CLI,
    each value checked against its bound before anything loads (the API's own refusal)."""
    for name in reversed(CLI_PARAMETERS):
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=kind_of(name),
            help=SAMPLING_HELP.get(name),
            callback=_in_range,
        )(command)
    return command


def _in_range(context: click.Context, option: click.Parameter, value: Any) -> Any:
    flag = option.opts[0] if option.opts else option.name
    return value if value is None else check(option.name or "", value, flag)


SAMPLING_HELP = {"seed": "Same seed, same request, same model: same tokens."}


def split_model_and_prompt(model: str | None, prompt: str | None) -> tuple[str, str | None]:
    """``mlxctl run "a question"`` means the default model: a prompt is never a valid name, a
    path or an ``ORG/REPO``."""
    if model is None:
        return DEFAULT_MODEL, prompt
    if prompt is None:
        from mlxctl.names import looks_like_name

        if not looks_like_name(model):
            return DEFAULT_MODEL, model
    return model, prompt


def print_stats(
    stats: dict[str, Any],
    reason: str | None,
    where: str,
    runner: str | None,
    load_ns: int | None = None,
) -> None:
    """The ``--verbose`` table, the same whether the model ran in this process or in the
    daemon (``stats`` uses Ollama's names, as the daemon's final line does)."""

    def rate(count: int, ns: int) -> str:
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "-"

    cached = stats.get("cached_prompt_tokens", 0)
    load = stats.get("load_duration", 0) if load_ns is None else load_ns
    rows = [
        ("ran", where),
        ("runner", runner or "-"),
        ("load duration", f"{load / 1e9:.3f}s"),
        (
            "prompt eval count",
            f"{stats.get('prompt_eval_count', 0)} token(s)"
            + (f" ({cached} from cache)" if cached else ""),
        ),
        (
            "prompt eval rate",
            rate(stats.get("prompt_eval_count", 0) - cached, stats.get("prompt_eval_duration", 0)),
        ),
        ("eval count", f"{stats.get('eval_count', 0)} token(s)"),
        ("eval rate", rate(stats.get("eval_count", 0), stats.get("eval_duration", 0))),
        ("total duration", f"{stats.get('total_duration', 0) / 1e9:.3f}s"),
        ("done reason", reason or "-"),
    ]
    click.echo("\n".join(f"{name + ':':<22}{value}" for name, value in rows), err=True)


def print_prompt(prompt: str, tokens: int) -> None:
    """``--verbose``: the prompt the template rendered, as the model sees it."""
    click.echo(f"--- rendered prompt ({tokens} tokens) ---\n{prompt}\n---", err=True)


@dataclass
class ChatState:
    overrides: dict[str, Any]
    system: str | None = None
    think: bool | str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class DaemonSession:
    """The same interface as ``Session``, answered by a running daemon (``mlxctl serve``)."""

    def __init__(
        self, client: Any, name: str, as_json: bool, verbose: bool, num_ctx: int | None = None
    ) -> None:
        self.client, self.name, self.num_ctx = client, name, num_ctx
        self.load_ns: int | None = None
        self.as_json, self.verbose = as_json, verbose
        self.last_reason: str | None = None

    def load(self) -> None:
        """Load the model (as ``ollama run`` does first); the time that took is the first
        answer's load duration in ``--verbose``, as in-process (the daemon's answer to a load
        request carries no timing, as Ollama's does not)."""
        started = time.perf_counter_ns()
        self.client.post("/api/generate", {"model": self.name, "options": self._options({})})
        self.load_ns = time.perf_counter_ns() - started

    @functools.cached_property
    def vision(self) -> bool:
        """Whether the model reads images: asked of the daemon the first time a prompt names
        an image file (``images_named``), not at every load."""
        shown = self.client.post("/api/show", {"model": self.name})
        return "vision" in shown.get("capabilities", [])

    def model_names(self) -> list[str]:
        """What the daemon's store holds (its store may not be this machine's)."""
        return [model["name"] for model in self.client.get("/api/tags").get("models", [])]

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Our parameter names -> Ollama's (the daemon maps them back)."""
        from modelstore.parameters import api_names

        ollama_names = {field: wire for wire, (field, _) in api_names("ollama").items()}
        options = {ollama_names.get(k, k): v for k, v in overrides.items()}
        if self.num_ctx is not None:
            options["num_ctx"] = self.num_ctx
        return options

    def _print(self, lines: Any, field: str) -> str:
        pieces = []
        try:
            for line in lines:
                if "error" in line:
                    raise DaemonError(line["error"], line.get("code", "daemon_error"))
                part = line[field] if field == "message" else line
                text = part["content"] if field == "message" else part[field]
                pieces.append(text)
                if self.as_json:
                    sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
                else:
                    if part.get("thinking"):
                        click.secho(part["thinking"], dim=True, nl=False)
                    sys.stdout.write(text)
                sys.stdout.flush()
                if line.get("done"):
                    self.last_reason = line.get("done_reason")
                    if not self.as_json:
                        sys.stdout.write("\n")
                    if self.verbose:
                        load_ns, self.load_ns = self.load_ns, None
                        print_stats(
                            line,
                            line.get("done_reason"),
                            f"through the daemon at {self.client.address}",
                            self.runner(),
                            max(load_ns or 0, line.get("load_duration", 0)),
                        )
        except KeyboardInterrupt:
            self.last_reason = "cancelled"
            click.echo("\n[stopped]", err=True)
        return "".join(pieces)

    def loaded_context(self) -> int | None:
        """The context the daemon loaded the model with (``/api/ps``), for ``/show info``."""
        for model in self.client.get("/api/ps").get("models", []):
            if model.get("name") == self.name or model.get("model") == self.name:
                return model.get("context_length")
        return None

    def runner(self) -> str | None:
        """Which runner the daemon holds the model in (``/api/ps``), for the stats table."""
        for model in self.client.get("/api/ps").get("models", []):
            if model.get("name") == self.name or model.get("model") == self.name:
                return str(model.get("runner") or "") or None
        return None

    def show_prompt(self, messages: list[dict[str, Any]], state: ChatState) -> None:
        """``--verbose``: the prompt the daemon's template renders, as in-process prints it.

        The daemon renders it with ``/apply-template`` (the chat core's own ``prepare``, so
        the text is exactly what generation sees) and counts it with ``/tokenize``, as the
        core tokenizes a templated prompt (no BOS added)."""
        body = {"model": self.name, "messages": messages, "think": state.think}
        prompt = self.client.post("/apply-template", body)["prompt"]
        self._show_counted(prompt, add_special=False)

    def _show_counted(self, prompt: str, add_special: bool) -> None:
        body = {"model": self.name, "content": prompt, "add_special": add_special}
        print_prompt(prompt, len(self.client.post("/tokenize", body)["tokens"]))

    def one_shot(self, prompt: str, state: ChatState, raw: bool, images: list[bytes]) -> None:
        if self.verbose and raw:
            self._show_counted(prompt, add_special=True)  # raw text: the tokenizer's BOS too
        elif self.verbose:
            system = [{"role": "system", "content": state.system}] if state.system else []
            self.show_prompt([*system, {"role": "user", "content": prompt}], state)
        body = {
            "model": self.name,
            "prompt": prompt,
            "raw": raw,
            "system": state.system,
            "think": state.think,
            "options": self._options(state.overrides),
        }
        if images:
            body["images"] = [base64.b64encode(image).decode() for image in images]
        self._print(self.client.stream("/api/generate", body), "response")

    def chat(self, messages: list[dict[str, Any]], state: ChatState) -> str:
        self.last_reason = None
        if self.verbose:
            self.show_prompt(messages, state)
        body = {
            "model": self.name,
            "messages": messages,
            "think": state.think,
            "options": self._options(state.overrides),
        }
        return self._print(self.client.stream("/api/chat", body), "message")

    def close(self) -> None:
        """The daemon keeps the model for its keep_alive."""


def convert_with_progress(store: Any, name: str, runner: str | None) -> None:
    """Convert a GGUF the MLX runner will load, under a progress bar (the first load of a
    model only: the runner then finds the conversion in its cache)."""
    from mlxserve import platform
    from mlxserve.runners.mlx.gguf_convert import conversion_size, convert_gguf
    from mlxserve.runners.mlx.runner import derived_folder
    from mlxserve.runners.select import choose_runner
    from modelstore.runtime import open_model

    model = open_model(store, name)
    if model.format != "gguf" or choose_runner(model, runner) != "mlx":
        return
    dequantize = platform.mlx_dequantize_weights()
    folder = derived_folder(model, dequantize)
    if (folder / "config.json").is_file():
        return
    total = conversion_size(model.weights[0])
    with byte_progress(f"converting {model.name} to MLX", total) as progress:
        convert_gguf(model.weights[0], folder, dequantize=dequantize, progress=progress)


class Session:
    """One loaded model and the event loop it streams on."""

    def __init__(
        self,
        name: str,
        runner: str | None,
        as_json: bool,
        verbose: bool,
        context_length: int | None = None,
    ) -> None:
        self.name, self.runner_name = name, runner
        self.context_length = context_length
        self.as_json, self.verbose = as_json, verbose
        self.loop = asyncio.new_event_loop()
        self.loaded: Any = None
        self.held: Any = None
        """The loaded model as the daemon's scheduler leases it (``scheduler.HeldModel``)."""
        self.run: Any = None
        """The answer streaming now, for Ctrl-C."""
        self.last_reason: str | None = None
        self.load_ns = 0

    def load(self) -> None:
        from mlxserve.chat.model import LoadedModel
        from modelstore.default_model import ensure_default_model
        from modelstore.store import ModelStore

        store = ModelStore()
        if self.name == DEFAULT_MODEL:
            ensure_default_model(store)
        convert_with_progress(store, self.name, self.runner_name)
        from mlxserve.runners.base import RunnerOptions
        from mlxserve.server.scheduler import HeldModel

        options = RunnerOptions(context_length=self.context_length)
        self.loaded = self.loop.run_until_complete(
            LoadedModel.load(store, self.name, self.runner_name, options)
        )
        self.held = HeldModel(self.loaded)
        self.load_ns = self.loaded.info.load_duration_ns

    @property
    def vision(self) -> bool:
        return self.loaded is not None and self.loaded.model.vision is not None

    def model_names(self) -> list[str]:
        from modelstore.store import ModelStore

        return [model.name for model in ModelStore().list()]

    def loaded_context(self) -> int | None:
        """The context the runner loaded the model with, for ``/show info``."""
        return self.loaded.info.context_length if self.loaded is not None else None

    def answer(self, chat: Any) -> str:
        """Stream one answer to stdout; Ctrl-C cancels it (within a token) and keeps the chat.

        The answer runs as the daemon's do: through its scheduler's ``serve_chat`` (admission,
        the lease, the accounting) and its chat core (``mlxserve/chat/core.py``), so thinking,
        tool calls and ``--json`` lines are exactly what the daemon would send. SIGINT is
        turned into the request's cancel token while an answer streams, so the runner ends the
        generation cleanly instead of an exception tearing through the loop.
        """
        load_ns, self.load_ns = self.load_ns, 1
        pieces: list[str] = []
        task = self.loop.create_task(self._stream(chat, pieces, load_ns))
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt, task)
        try:
            self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None  # before the answer streamed: the turn is dropped
        finally:
            self.loop.remove_signal_handler(signal.SIGINT)
        if self.last_reason == "cancelled":
            click.echo("[stopped]", err=True)
        return "".join(pieces)

    async def _stream(self, chat: Any, pieces: list[str], load_ns: int) -> None:
        from mlxserve.server.api_native import ChatEncoder, GenerateEncoder
        from mlxserve.server.scheduler import serve_chat

        encoder = (GenerateEncoder if chat.prompt is not None else ChatEncoder)(chat, {})
        async with serve_chat(self.held, chat, self._account, load_ns=load_ns) as run:
            if self.verbose:
                prepared = run.prepared
                print_prompt(prepared.prompt, len(prepared.request.prompt_tokens or []))
            self.run = run
            try:
                await self._show(await run.first(), encoder, pieces)
                async for event in run.rest():
                    await self._show(event, encoder, pieces)
            finally:
                self.run = None

    def _interrupt(self, task: asyncio.Task) -> None:
        """Ctrl-C: a started answer's generation ends within a token (its current request's
        cancel token: a reasoning budget's restart replaces the request); before that, while
        the model is leased and the prompt prepared, the turn is cancelled."""
        if self.run is not None:
            self.run.prepared.request.cancel.cancel()
        else:
            task.cancel()

    def _account(self, model: str, done: Any) -> None:
        """A finished answer: its reason, and the ``--verbose`` table (the daemon's metrics)."""
        self.last_reason = done.reason
        if self.verbose:
            info = self.loaded.info
            print_stats(
                vars(done.stats),
                done.reason,
                "in this process",
                f"{info.runner} ({info.format})",
                info.load_duration_ns,
            )

    async def _show(self, event: Any, encoder: Any, pieces: list[str]) -> None:
        from mlxserve.chat.events import Done, ErrorEvent, TextDelta, ThinkingDelta, ToolCallEvent

        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        if self.as_json:
            for line in encoder.encode(event):
                sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
        elif isinstance(event, ThinkingDelta):
            click.secho(event.text, dim=True, nl=False)
        elif isinstance(event, ToolCallEvent):
            call = {"name": event.call.name, "arguments": event.call.arguments}
            sys.stdout.write(f"[tool call] {json.dumps(call)}\n")
        sys.stdout.flush()
        if isinstance(event, Done) and not self.as_json:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.loop.is_closed():
            return  # closed already: /load and /set parameter num_ctx replace a session
        if self.loaded is not None:
            self.loop.run_until_complete(self.loaded.unload())
        self.loop.close()


def images_named(session: Session | DaemonSession, text: str) -> tuple[str, list[bytes]]:
    """For a vision model, ``text`` without the image files it names and their bytes
    (``image_paths.py``); for any other model, or a text that names none, ``text`` as typed."""
    if PATH.search(text) is None or not session.vision:
        return text, []
    return take_images(text)


def chat_turn(session: Session | DaemonSession, state: ChatState, text: str) -> None:
    messages = list(state.history)
    if state.system:
        messages.insert(0, {"role": "system", "content": state.system})
    text, images = images_named(session, text)
    user: dict[str, Any] = {"role": "user", "content": text}
    if images:  # as Ollama's message: base64, kept in the history for the later turns
        user["images"] = [base64.b64encode(image).decode() for image in images]
    messages.append(user)
    if isinstance(session, DaemonSession):
        reply = session.chat(messages, state)
    else:
        from mlxserve.chat.types import ChatRequest, Message

        chat = ChatRequest(
            session.name,
            messages=[
                Message(
                    m["role"],
                    m["content"],
                    images=[base64.b64decode(i) for i in m.get("images", [])],
                )
                for m in messages
            ],
            sampling=dict(state.overrides),
            think=state.think,
        )
        reply = session.answer(chat)
    if session.last_reason == "cancelled":
        return  # as Ollama: an answer cut with Ctrl-C is not part of the conversation
    state.history += [user, {"role": "assistant", "content": reply}]


def save_model(
    source: str, name: str, overrides: dict[str, Any], system: str | None, num_ctx: int | None
) -> str:
    """``/save NAME``: ``source`` with the chat's parameters and system message as its own
    defaults, built as a ModelSpec ``from: model://SOURCE`` would be."""
    from pathlib import Path

    from modelstore.spec import ModelSpec, build_draft
    from modelstore.store import ModelStore

    parameters = dict(overrides)
    if num_ctx is not None:
        parameters["context_length"] = num_ctx
    data: dict[str, Any] = {"from": f"model://{source}", "parameters": parameters}
    if system:
        data["system"] = system
    store = ModelStore()
    draft = build_draft(ModelSpec(Path.cwd() / "saved.modelspec.yaml", data), store)
    return store.commit(draft, name).model.name


def model_details(name: str) -> dict[str, Any]:
    """What ``/show`` prints: ``mlxctl show NAME --json``'s data."""
    from mlxctl.store_commands import _show_data
    from modelstore.store import ModelStore

    store = ModelStore()
    return _show_data(store, store.resolve(name))


def interactive(
    session: Session | DaemonSession,
    state: ChatState,
    open_session: Callable[[str, int | None], Session | DaemonSession],
) -> None:
    from mlxctl.repl import Repl

    Repl(
        session,
        state,
        open_session=open_session,
        details=model_details,
        save=save_model,
        turn=chat_turn,
    ).run()


@click.command("run")
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("--runner", help="Force a runner: mlx, llamacpp, or a plugin's (docs/RUNNERS.md).")
@sampling_options
@click.option("--system", help="System prompt (replaces the model's).")
@click.option(
    "--think",
    type=click.Choice(["true", "false", "low", "medium", "high"]),
    help="Thinking on, off, or at a level (models that think; shown dimmed).",
)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--local", is_flag=True, help="Run in this process even if a daemon is up.")
@click.option("--json", "as_json", is_flag=True, help="Stream NDJSON chunks (daemon shape).")
@click.option("--verbose", is_flag=True, help="Print load time and tokens/s afterwards.")
@click.option("--insecure", is_flag=True, help="Pull a missing model over plain HTTP.")
@click.option(
    "--host",
    envvar="MLXSERVE_HOST",
    help="The daemon's address, host:port (default: MLXSERVE_HOST, else the config).",
)
def run_command(
    model: str | None,
    prompt: str | None,
    runner: str | None,
    system: str | None,
    think: str | None,
    raw: bool,
    local: bool,
    as_json: bool,
    verbose: bool,
    insecure: bool,
    host: str | None,
    **sampling: Any,
) -> None:
    """Run a model: one answer if a prompt is given (or piped in), else an interactive chat.

    \b
    Examples:
      mlxctl run                                   chat with the default model (smollm2:135m)
      mlxctl run "Why is the sky blue?"            one answer from the default model
      mlxctl run smollm2:135m "Hi" --temperature 0 --verbose
      cat notes.txt | mlxctl run mymodel "Summarize"   the piped text, then the prompt
      mlxctl run registry.example.com/team/llama:8b   pulled first if the store lacks it
      mlxctl run llava "What is in ./photo.jpg?"   a vision model is sent the image
    """
    name, prompt = split_model_and_prompt(model, prompt)
    if name != DEFAULT_MODEL:
        name = resolve_model(name, insecure)
    if not sys.stdin.isatty():
        piped = sys.stdin.read().strip()
        if piped:  # as Ollama: the piped text first, then the prompt argument
            prompt = f"{piped}\n\n{prompt}" if prompt else piped
    state = ChatState(
        {k: v for k, v in sampling.items() if v is not None},
        system,
        {"true": True, "false": False}.get(think or "", think),
    )
    session = choose_session(name, runner, local, as_json, verbose, host)
    try:
        try:
            session.load()
        except (ModelNotFoundError, DaemonError) as error:
            if error.code != ModelNotFoundError.code:
                raise
            raise not_found(name, session.model_names()) from None
        if prompt is None:

            def open_session(model: str, num_ctx: int | None) -> Session | DaemonSession:
                target = model if model == name else resolve_model(model, insecure)
                opened = choose_session(target, runner, local, as_json, verbose, host, num_ctx)
                opened.load()
                return opened

            interactive(session, state, open_session)
            return
        prompt, images = images_named(session, prompt)
        if isinstance(session, DaemonSession):
            session.one_shot(prompt, state, raw, images)
        else:
            from mlxserve.chat.types import ChatRequest, Message

            chat = ChatRequest(
                name,
                prompt=prompt,
                system=state.system,
                raw=raw,
                sampling=dict(state.overrides),
                think=state.think,
            )
            if images:  # as ``/api/generate``'s images: before the prompt's text
                chat.messages = [Message("user", prompt, images=images)]
            session.answer(chat)
    finally:
        session.close()


SUGGESTIONS = 3
SIMILARITY = 0.5
"""``difflib`` ratio above which a known name is offered as "did you mean"."""


def resolve_model(text: str, insecure: bool) -> str:
    """What the user typed -> a stored model, pulled or imported first when needed
    (``mlxctl/names.py``); a miss names the sources tried and the close names stored."""
    from mlxctl.names import resolve_for_run
    from mlxctl.registry_commands import pull_any
    from modelstore.store import ModelStore

    store = ModelStore()
    try:
        return resolve_for_run(
            store, text, lambda target, ref: pull_any(target, ref, insecure=insecure)
        )
    except ModelNotFoundError as error:
        raise not_found(text, [m.name for m in store.list()], error.message) from None


def not_found(name: str, known: list[str], detail: str | None = None) -> ModelNotFoundError:
    """``mlxctl run hi``: "hi" names no model; say which names are close and how to ask the
    default model a one-word question, instead of only "model 'hi:latest' not found"."""
    import difflib

    short = {n.removesuffix(":latest"): n for n in known}
    close = [
        short[c] for c in difflib.get_close_matches(name, list(short), SUGGESTIONS, SIMILARITY)
    ]
    lines = [detail or f"no model named '{name}' (`mlxctl list` shows the models in the store)."]
    if close:
        lines.append("Did you mean: " + ", ".join(close) + "?")
    lines.append(f'To ask the default model, name it first: mlxctl run {DEFAULT_MODEL} "{name}"')
    return ModelNotFoundError("\n".join(lines), model=name, suggestions=close)


def choose_session(
    name: str,
    runner: str | None,
    local: bool,
    as_json: bool,
    verbose: bool,
    host: str | None = None,
    num_ctx: int | None = None,
) -> Session | DaemonSession:
    """The daemon when one is up (it keeps models warm), else this process.

    ``--runner`` picks a library, which only an in-process run can honour.
    """
    if not local and runner is None:
        from mlxctl.client import DaemonClient

        client = DaemonClient.from_environment(host)
        if client.is_up():
            if name == DEFAULT_MODEL:
                from modelstore.default_model import ensure_default_model
                from modelstore.store import ModelStore

                ensure_default_model(ModelStore())
            return DaemonSession(client, name, as_json, verbose, num_ctx)
    return Session(name, runner, as_json, verbose, num_ctx)
