"""``mlxctl run``: one answer, or an interactive chat, streamed as it is generated.

With no daemon running the model runs in this process (``--local`` forces that); heavy
libraries are imported only here, when a model actually runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from mlxctl.client import DaemonError
from mlxctl.output import byte_progress
from modelstore.default_model import DEFAULT_MODEL
from modelstore.errors import InvalidReferenceError
from modelstore.hfhub import HF_SCHEME
from modelstore.parameters import CLI_PARAMETERS, SAMPLING_FIELDS, kind_of
from modelstore.reference import parse_reference

CHAT_HELP = """\
Commands:
  /bye                      leave
  /clear                    forget the conversation
  /set parameter NAME VALUE set temperature, top_p, top_k, min_p, seed, max_tokens, ...
  /set system TEXT          set the system prompt
  /show parameters          print the parameters in use
  /?                        this help
Ctrl-C stops the current answer; Ctrl-D leaves."""
SETTABLE = {name: kind_of(name) for name in SAMPLING_FIELDS if kind_of(name) is not dict}
"""``/set parameter NAME VALUE``: every sampling knob (``modelstore/parameters.py``)."""


def sampling_options(command: Callable) -> Callable:
    """``--temperature``, ``--top-p``, ... : one flag per sampling knob marked for the CLI."""
    for name in reversed(CLI_PARAMETERS):
        kind = kind_of(name)
        command = click.option(
            f"--{name.replace('_', '-')}", name, type=kind, help=SAMPLING_HELP.get(name)
        )(command)
    return command


SAMPLING_HELP = {"seed": "Same seed, same request, same model: same tokens."}


def split_model_and_prompt(model: str | None, prompt: str | None) -> tuple[str, str | None]:
    """``mlxctl run "a question"`` means the default model: a prompt is never a valid name."""
    if model is None:
        return DEFAULT_MODEL, prompt
    if prompt is None and not model.startswith(HF_SCHEME):
        try:
            parse_reference(model)
        except InvalidReferenceError:
            return DEFAULT_MODEL, model
    return model, prompt


@dataclass
class ChatState:
    overrides: dict[str, Any]
    system: str | None = None
    think: bool | str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class DaemonSession:
    """The same interface as ``Session``, answered by a running daemon (``mlxctl serve``)."""

    def __init__(self, client: Any, name: str, as_json: bool, verbose: bool) -> None:
        self.client, self.name = client, name
        self.as_json, self.verbose = as_json, verbose

    def load(self) -> None:
        self.client.post("/api/generate", {"model": self.name})

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Our parameter names -> Ollama's (the daemon maps them back)."""
        from modelstore.parameters import api_names

        ollama_names = {field: wire for wire, (field, _) in api_names("ollama").items()}
        return {ollama_names.get(k, k): v for k, v in overrides.items()}

    def _print(self, lines: Any, field: str) -> str:
        pieces = []
        try:
            for line in lines:
                if "error" in line:
                    raise DaemonError(line["error"], line.get("code", "daemon_error"))
                text = line[field]["content"] if field == "message" else line[field]
                pieces.append(text)
                if self.as_json:
                    sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
                else:
                    sys.stdout.write(text)
                sys.stdout.flush()
                if line.get("done"):
                    if not self.as_json:
                        sys.stdout.write("\n")
                    if self.verbose:
                        click.echo(
                            json.dumps(
                                {k: v for k, v in line.items() if k.endswith(("count", "duration"))}
                            ),
                            err=True,
                        )
        except KeyboardInterrupt:
            click.echo("\n[stopped]", err=True)
        return "".join(pieces)

    def one_shot(self, prompt: str, state: ChatState, raw: bool) -> None:
        body = {
            "model": self.name,
            "prompt": prompt,
            "raw": raw,
            "system": state.system,
            "think": state.think,
            "options": self._options(state.overrides),
        }
        self._print(self.client.stream("/api/generate", body), "response")

    def chat(self, messages: list[dict[str, Any]], state: ChatState) -> str:
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
    from mlxserve.runners.gguf_convert import conversion_size, convert_gguf
    from mlxserve.runners.mlx import derived_folder
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

    def __init__(self, name: str, runner: str | None, as_json: bool, verbose: bool) -> None:
        self.name, self.runner_name = name, runner
        self.as_json, self.verbose = as_json, verbose
        self.loop = asyncio.new_event_loop()
        self.loaded: Any = None
        self.last_reason: str | None = None
        self.load_ns = 0

    def load(self) -> None:
        from mlxserve.inference import LoadedModel
        from modelstore.default_model import ensure_default_model
        from modelstore.store import ModelStore

        store = ModelStore()
        if self.name == DEFAULT_MODEL:
            ensure_default_model(store)
        convert_with_progress(store, self.name, self.runner_name)
        self.loaded = self.loop.run_until_complete(
            LoadedModel.load(store, self.name, self.runner_name)
        )
        self.load_ns = self.loaded.info.load_duration_ns

    def answer(self, chat: Any) -> str:
        """Stream one answer to stdout; Ctrl-C cancels it (within a token) and keeps the chat.

        The answer runs through the daemon's own chat core (``mlxserve/chat/core.py``), so
        thinking, tool calls and ``--json`` lines are exactly what the daemon would send.
        SIGINT is turned into the request's cancel token while an answer streams, so the
        runner ends the generation cleanly instead of an exception tearing through the loop.
        """
        from mlxserve.chat.core import ChatRun, prepare

        prepared = prepare(self.loaded, chat)
        load_ns, self.load_ns = self.load_ns, 1
        run = ChatRun(chat, self.loaded, prepared, load_ns=load_ns)
        pieces: list[str] = []
        self.loop.add_signal_handler(signal.SIGINT, prepared.request.cancel.cancel)
        try:
            self.loop.run_until_complete(self._stream(chat, run, pieces))
        finally:
            self.loop.remove_signal_handler(signal.SIGINT)
            self.loop.run_until_complete(run.close())
        if self.last_reason == "cancelled":
            click.echo("[stopped]", err=True)
        return "".join(pieces)

    async def _stream(self, chat: Any, run: Any, pieces: list[str]) -> None:
        from mlxserve.server.api_native import ChatEncoder, GenerateEncoder

        encoder = (GenerateEncoder if chat.prompt is not None else ChatEncoder)(chat, {})
        await self._show(await run.first(), encoder, pieces)
        async for event in run.rest():
            await self._show(event, encoder, pieces)

    async def _show(self, event: Any, encoder: Any, pieces: list[str]) -> None:
        from mlxserve.chat.types import Done, ErrorEvent, TextDelta, ThinkingDelta, ToolCallEvent

        if isinstance(event, ErrorEvent):
            raise event.error
        if self.as_json:
            for line in encoder.encode(event):
                sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            pieces.append(event.text)
        elif isinstance(event, ThinkingDelta):
            click.secho(event.text, dim=True, nl=False)
        elif isinstance(event, ToolCallEvent):
            call = {"name": event.call.name, "arguments": event.call.arguments}
            sys.stdout.write(f"[tool call] {json.dumps(call)}\n")
        sys.stdout.flush()
        if isinstance(event, Done):
            self.last_reason = event.reason
            if not self.as_json:
                sys.stdout.write("\n")
                sys.stdout.flush()
            if self.verbose:
                self._report(event.stats, event.reason)

    def _report(self, stats: Any, reason: str | None) -> None:
        def rate(count: int, ns: int) -> str:
            return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "-"

        info = self.loaded.info
        evaluated = stats.prompt_eval_count - stats.cached_prompt_tokens
        click.echo(
            "\n".join(
                [
                    f"runner:               {info.runner} ({info.format})",
                    f"load duration:        {info.load_duration_ns / 1e9:.3f}s",
                    f"prompt eval count:    {stats.prompt_eval_count} token(s) "
                    f"({stats.cached_prompt_tokens} from cache)",
                    f"prompt eval rate:     {rate(evaluated, stats.prompt_eval_duration)}",
                    f"eval count:           {stats.eval_count} token(s)",
                    f"eval rate:            {rate(stats.eval_count, stats.eval_duration)}",
                    f"total duration:       {stats.total_duration / 1e9:.3f}s",
                    f"done reason:          {reason}",
                ]
            ),
            err=True,
        )

    def close(self) -> None:
        if self.loaded is not None:
            self.loop.run_until_complete(self.loaded.unload())
        self.loop.close()


def chat_turn(session: Session | DaemonSession, state: ChatState, text: str) -> None:
    messages = list(state.history)
    if state.system:
        messages.insert(0, {"role": "system", "content": state.system})
    messages.append({"role": "user", "content": text})
    if isinstance(session, DaemonSession):
        reply = session.chat(messages, state)
    else:
        from mlxserve.chat.types import ChatRequest, Message

        chat = ChatRequest(
            session.name,
            messages=[Message(m["role"], m["content"]) for m in messages],
            sampling=dict(state.overrides),
            think=state.think,
        )
        reply = session.answer(chat)
    state.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def handle_command(line: str, state: ChatState) -> bool:
    """Apply a ``/`` command; return False to leave the chat."""
    words = line.split(maxsplit=3)
    if words[0] in {"/bye", "/exit", "/quit"}:
        return False
    if words[0] == "/clear":
        state.history.clear()
        click.echo("Cleared the conversation.")
    elif words[:2] == ["/set", "parameter"] and len(words) == 4 and words[2] in SETTABLE:
        name, raw = words[2], words[3]
        try:
            state.overrides[name] = [raw] if name == "stop" else SETTABLE[name](raw)
        except ValueError:
            click.echo(f"{name} needs a {SETTABLE[name].__name__}")
        else:
            click.echo(f"Set parameter '{name}' to '{raw}'")
    elif words[:2] == ["/set", "system"] and len(words) >= 3:
        state.system = line.split(maxsplit=2)[2]
        click.echo("Set system message.")
    elif words[:2] == ["/show", "parameters"]:
        click.echo(json.dumps(state.overrides, indent=2))
    else:
        click.echo(CHAT_HELP)
    return True


def interactive(session: Session | DaemonSession, state: ChatState) -> None:
    import readline  # noqa: F401 - line editing and history for input()

    click.echo(f"Chatting with {session.name}. /? for help, /bye to leave.", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\nUse /bye or Ctrl-D to leave.")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not handle_command(line.strip(), state):
                return
            continue
        chat_turn(session, state, line)


@click.command("run")
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("--runner", type=click.Choice(["mlx", "llamacpp"]), help="Force a runner.")
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
    **sampling: Any,
) -> None:
    """Run a model: one answer if a prompt is given (or piped in), else an interactive chat.

    \b
    Examples:
      mlxctl run                                   chat with the default model (smollm2:135m)
      mlxctl run "Why is the sky blue?"            one answer from the default model
      mlxctl run smollm2:135m "Hi" --temperature 0 --verbose
      echo "Summarise: ..." | mlxctl run mymodel
      mlxctl run registry.example.com/team/llama:8b   pulled first if the store lacks it
    """
    name, prompt = split_model_and_prompt(model, prompt)
    if name != DEFAULT_MODEL:
        from mlxctl.registry_commands import ensure_pulled

        name = ensure_pulled(name, insecure=insecure)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip() or None
    state = ChatState(
        {k: v for k, v in sampling.items() if v is not None},
        system,
        {"true": True, "false": False}.get(think or "", think),
    )
    session = choose_session(name, runner, local, as_json, verbose)
    try:
        session.load()
        if prompt is None:
            interactive(session, state)
        elif isinstance(session, DaemonSession):
            session.one_shot(prompt, state, raw)
        else:
            from mlxserve.chat.types import ChatRequest

            session.answer(
                ChatRequest(name, prompt=prompt, system=state.system, raw=raw,
                            sampling=dict(state.overrides), think=state.think)
            )
    finally:
        session.close()


def choose_session(
    name: str, runner: str | None, local: bool, as_json: bool, verbose: bool
) -> Session | DaemonSession:
    """The daemon when one is up (it keeps models warm), else this process.

    ``--runner`` picks a library, which only an in-process run can honour.
    """
    if not local and runner is None:
        from mlxctl.client import DaemonClient

        client = DaemonClient.from_environment()
        if client.is_up():
            if name == DEFAULT_MODEL:
                from modelstore.default_model import ensure_default_model
                from modelstore.store import ModelStore

                ensure_default_model(ModelStore())
            return DaemonSession(client, name, as_json, verbose)
    return Session(name, runner, as_json, verbose)
