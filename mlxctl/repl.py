"""``mlxctl run``'s interactive chat, as Ollama's REPL behaves.

A turn is one line, a ``\"\"\"`` block, or one bracketed paste (however many lines it holds);
``/set``, ``/show``, ``/load``, ``/save``, ``/clear``, ``/bye`` and ``/?`` work as in Ollama,
with Ollama's parameter names as well as ours (``modelstore/parameters.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from modelstore.errors import MlxserveError
from modelstore.parameters import SAMPLING_FIELDS, api_names, from_ollama, kind_of, out_of_range

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
"""What a terminal in bracketed-paste mode puts around pasted text."""
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
NUM_CTX = "num_ctx"
HELP = f"""\
Available Commands:
  /set parameter NAME VALUE  set a parameter: ours or Ollama's name (temperature, top_p, top_k,
                             min_p, seed, num_predict / max_tokens, repeat_penalty, stop,
                             {NUM_CTX}, ...)
  /set system TEXT           set the system message
  /set verbose | noverbose   show (or stop showing) timings and the rendered prompt
  /set think | nothink       thinking on or off (models that think)
  /show info                 details about the model
  /show license              the model's license
  /show modelfile            the model as an Ollama Modelfile, with your settings
  /show parameters           the model's parameters, and yours over them
  /show system               the system message
  /show template             the chat template
  /load MODEL                switch to another model (the conversation is kept)
  /save NAME                 store this model with your parameters and system message
  /clear                     forget the conversation
  /bye                       leave
  /?, /help                  this help

Use {BLOCK} to begin and end a multi-line message; a paste is one message.
Name an image file (./photo.jpg, ~/Desktop/shot.png) in a message to send it to a vision model.
Ctrl-C stops the current answer; Ctrl-D leaves."""


def parameter_names() -> dict[str, tuple[str, type]]:
    """``/set parameter``'s names: ours and Ollama's -> (our field, its type), and num_ctx."""
    table = {name: (name, kind_of(name)) for name in SAMPLING_FIELDS if kind_of(name) is not dict}
    for wire, (name, kind) in api_names("ollama").items():
        table.setdefault(wire, (name, kind))
    table[NUM_CTX] = (NUM_CTX, int)
    return table


PARAMETERS = parameter_names()
OLLAMA_NAMES = {name: wire for wire, (name, _) in api_names("ollama").items()}


def read_turn(read_line: Callable[[str], str]) -> str:
    """One message: a line, a ``\"\"\"`` block, or a bracketed paste, newlines kept.

    readline may take the paste markers itself (then the pasted lines arrive as one line with
    newlines in it); otherwise they arrive here and the lines up to the end marker are joined.
    """
    line = read_line(PROMPT)
    if line.startswith(PASTE_START):
        text = line.removeprefix(PASTE_START)
        while PASTE_END not in text:
            text += "\n" + read_line("")
        return text.replace(PASTE_END, "")
    stripped = line.lstrip()
    if not stripped.startswith(BLOCK):
        return line
    text = stripped.removeprefix(BLOCK)
    if text.endswith(BLOCK):
        return text.removesuffix(BLOCK)
    lines = [text]
    while True:
        more = read_line(CONTINUATION)
        if BLOCK in more:
            lines.append(more[: more.index(BLOCK)])
            return "\n".join(lines).strip("\n")
        lines.append(more)


class Repl:
    """The loop, the state it changes, and the session (in this process or the daemon)."""

    def __init__(
        self,
        session: Any,
        state: Any,
        *,
        open_session: Callable[[str, int | None], Any],
        details: Callable[[str], dict[str, Any]],
        save: Callable[[str, str, dict[str, Any], str | None, int | None], str],
        turn: Callable[[Any, Any, str], None],
    ) -> None:
        self.session, self.state = session, state
        self.open_session, self.details, self.save, self.turn = open_session, details, save, turn
        self.num_ctx: int | None = None

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        import readline  # noqa: F401 - line editing and history for input()

        click.echo(f"Chatting with {self.session.name}. /? for help, /bye to leave.", err=True)
        first, paste = self.session, sys.stdout.isatty()
        if paste:
            sys.stdout.write(PASTE_ON)
        try:
            self._loop()
        finally:
            if paste:
                sys.stdout.write(PASTE_OFF)
                sys.stdout.flush()
            if self.session is not first:  # the caller closes the session it opened
                self.session.close()

    def _loop(self) -> None:
        while True:
            try:
                text = read_turn(input)
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo("\nUse Ctrl-D or /bye to exit.")
                continue
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if not self.command(text.strip()):
                        return
                    continue
                self.turn(self.session, self.state, text)
            except MlxserveError as error:  # one line, and the chat goes on
                click.echo(f"Error [{error.code}]: {error.message}", err=True)
            except KeyboardInterrupt:  # before the answer streamed (it stops itself after)
                click.echo("\n[stopped]", err=True)

    # -- commands ----------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Apply one ``/`` command; False to leave."""
        words = line.split()
        head = words[0]
        if head in {"/bye", "/exit", "/quit"}:
            return False
        if head in {"/?", "/help"}:
            click.echo(HELP)
        elif head == "/clear":
            self.state.history.clear()
            click.echo("Cleared session context")
        elif head == "/set" and len(words) >= 2:
            self._set(line, words)
        elif head == "/show" and len(words) == 2:
            self._show(words[1])
        elif head == "/load" and len(words) == 2:
            self._load(words[1])
        elif head == "/save" and len(words) == 2:
            self._save(words[1])
        elif head in {"/set", "/show", "/load", "/save"}:
            click.echo(f"Usage: see /? ({head} needs an argument)")
        else:
            click.echo(f"Unknown command '{head}'. Type /? for help")
        return True

    def _set(self, line: str, words: list[str]) -> None:
        what = words[1]
        if what == "parameter":
            if len(words) < 4:
                click.echo("Usage: /set parameter NAME VALUE")
                return
            self._set_parameter(words[2], line.split(maxsplit=3)[3])
        elif what == "system":
            text = line.split(maxsplit=2)[2] if len(words) > 2 else ""
            self.state.system = text.strip().strip('"') or None
            click.echo("Set system message.")
        elif what in {"verbose", "noverbose"}:
            self.session.verbose = what == "verbose"
            click.echo(f"Set '{what}' mode.")
        elif what in {"think", "nothink"}:
            self.state.think = what == "think"
            click.echo(f"Set '{what}' mode.")
        else:
            click.echo(f"Unknown command '/set {what}'. Type /? for help")

    def _set_parameter(self, name: str, raw: str) -> None:
        if name not in PARAMETERS:
            click.echo(f"Unknown parameter '{name}'. Type /? for the names")
            return
        field, kind = PARAMETERS[name]
        try:
            value = [raw] if field == "stop" else kind(raw)
        except ValueError:
            click.echo(f"Couldn't set parameter: '{name}' takes a {kind.__name__}")
            return
        if field == NUM_CTX:
            self._reopen(self.session.name, value)
            click.echo(f"Set parameter '{name}' to '{raw}'")
            return
        value = from_ollama(field, value) if field != name else value  # num_predict -1, ...
        problem = out_of_range(field, value, name)
        if problem:  # the words the API and `mlxctl run --flag` use (modelstore/parameters.py)
            click.echo(f"Couldn't set parameter: {problem}")
            return
        if field == "stop":
            self.state.overrides.setdefault("stop", []).extend(value)
        else:
            self.state.overrides[field] = value
        click.echo(f"Set parameter '{name}' to '{raw}'")

    def _reopen(self, name: str, num_ctx: int | None) -> None:
        """Replace the session (another model, or another context length); when the new one
        cannot load, the old one is loaded again and the error told."""
        old_name, old_ctx, verbose = self.session.name, self.num_ctx, self.session.verbose
        self.session.close()
        try:
            self.session = self.open_session(name, num_ctx)
        except MlxserveError:
            self.session = self.open_session(old_name, old_ctx)
            self.session.verbose = verbose
            raise
        self.session.verbose, self.num_ctx = verbose, num_ctx

    def _load(self, text: str) -> None:
        click.echo(f"Loading model '{text}'")
        self._reopen(text, self.num_ctx)

    def _save(self, name: str) -> None:
        saved = self.save(
            self.session.name, name, dict(self.state.overrides), self.state.system, self.num_ctx
        )
        click.echo(f"Created new model '{saved}'")

    # -- /show -------------------------------------------------------------------------------

    def _show(self, what: str) -> None:
        shows = {
            "info": self._info,
            "license": lambda d: d.get("license") or "No license was specified for this model.",
            "modelfile": self._modelfile,
            "parameters": self._parameters,
            "system": lambda d: (
                self.state.system
                or d.get("system")
                or "No system message was specified for this model."
            ),
            "template": lambda d: d.get("template") or "No prompt template was specified.",
        }
        if what not in shows:
            click.echo(f"Unknown command '/show {what}'. Type /? for help")
            return
        click.echo(shows[what](self.details(self.session.name)))

    def _info(self, details: dict[str, Any]) -> str:
        rows = [
            ("model", details["name"]),
            ("format", details.get("format")),
            ("architecture", details.get("architecture")),
            ("parameters", details.get("parameter_count")),
            ("context length", self.session.loaded_context() or details.get("context_length")),
            ("quantization", details.get("quantization")),
        ]
        return "\n".join(f"  {k:<16}{v}" for k, v in rows if v is not None)

    def merged(self, details: dict[str, Any]) -> dict[str, Any]:
        """The model's own defaults with the user's settings over them (our names)."""
        merged = {**details.get("parameters", {}), **self.state.overrides}
        if self.num_ctx is not None:
            merged[NUM_CTX] = self.num_ctx
        return merged

    def _parameters(self, details: dict[str, Any]) -> str:
        model, yours = details.get("parameters", {}), dict(self.state.overrides)
        if self.num_ctx is not None:
            yours[NUM_CTX] = self.num_ctx
        lines = ["Model defined parameters:"]
        lines += [f"  {k:<24}{json.dumps(v)}" for k, v in model.items()] or ["  (none)"]
        lines.append("User defined parameters:")
        lines += [f"  {k:<24}{json.dumps(v)}" for k, v in yours.items()] or ["  (none)"]
        return "\n".join(lines)

    def _modelfile(self, details: dict[str, Any]) -> str:
        lines = [
            '# Modelfile generated by "mlxctl run" (/show modelfile)',
            f"FROM {details['name']}",
        ]
        if details.get("template"):
            lines.append(f'TEMPLATE """{details["template"]}"""')
        system = self.state.system or details.get("system")
        if system:
            lines.append(f'SYSTEM """{system}"""')
        for name, value in self.merged(details).items():
            wire = "num_ctx" if name in {NUM_CTX, "context_length"} else OLLAMA_NAMES.get(name)
            if wire is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {wire} {json.dumps(item)}")
        if details.get("license"):
            lines.append(f'LICENSE """{details["license"]}"""')
        return "\n".join(lines)
