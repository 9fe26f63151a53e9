"""An agent-like trace against the real daemon: does the prompt cache keep a coding agent's
long, repeating prompt cheap across turns, model swaps and a restart?

The trace (the shape of issue 22): a system prompt with ten tool definitions, padded to
``--system-tokens``; two sessions of ``--turns`` turns, each adding a user message of about
``--turn-tokens`` tokens and the model's answer; a second model loaded between turns with one
model slot (so the agent's model is evicted and reloaded each time); a server restart between
the two sessions (the second session is a new conversation: the same system prompt and tools,
new user messages, as an agent's next session).

What is timed. Before each measured request the agent's model is loaded by a request of its
own (the daemon's empty ``/api/chat``; a one-token "hi" on the peers) and that load is
reported apart (``load_s``), so the time to first token (``ttft_s``, to the first streamed
content) measures the prompt and its cache only, the same way for the cold turn and the cached
ones. "Cold" is the first turn of the first session, on an empty cache.

Phases, one after another in one run:
- ``mlxserve``: the trace on the daemon (disk tier on).
- ``mlxserve_without_disk_tier``: the same with the disk tier off (what a swap and a restart
  cost without it).
- the peer (``llama_cpp.server`` for llama.cpp, ``mlx_lm.server`` for MLX): the same trace,
  the second model being a second alias (llama-cpp-python's multi-model config) or a second
  path (mlx_lm.server loads the model a request names), so a swap reloads as ours does.
- ``decode``: what the write-behind costs on decode. Two daemons, disk tier on and off, one
  conversation each without swaps, its turns back to back (with the disk tier each turn's
  entry is written while the same daemon's next turn prefills and decodes), the daemons taking
  turns by conversation, AB then BA. The rate is the daemon's own ``eval_count /
  eval_duration``.

Prints JSON: per phase, session and turn the load time, time to first token, prompt and cached
tokens and decode rate, and the ratios the issue sets as goals.

    python -m bench.agent [--runner llamacpp|mlx] [--system-tokens 2500] [--turns 10]
        [--phases mlxserve nodisk peer decode] [--peer-python PYTHON]
        [--decode-turns 6] [--decode-tokens 64]

``--peer-python``: an interpreter that has llama-cpp-python's server extras (uvicorn,
fastapi, sse-starlette, starlette-context, pydantic-settings); this one by default, which has
them where the project's ``bench`` extra is installed (``make install`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import MODEL, bench_store, emit, median
from mlxserve import platform
from modelstore.importer import import_path
from modelstore.runtime import open_model
from tests.daemon import free_port

OTHER = "bench-other:1"
"""The second model of the trace: the default model's weights under another name (another
resident: with one model slot, loading it evicts the agent's model)."""
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 3600
LLAMACPP_SYSTEM_TOKENS = 2500
"""About 4,000 real tokens with the tools (the issue's ~4k-token system prompt)."""
MLX_SYSTEM_TOKENS = 800
"""MLX on a CPU prefills far slower than llama.cpp: a shorter prefix, as the issue allows."""
PEER_CONTEXT = 8192
"""llama_cpp.server's context (the default model's trained context): the whole trace fits."""
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]
LLAMA_CPP_SERVER = """
import sys, runpy, llama_cpp
from mlxserve.platform import make_llama_cpp_safe
make_llama_cpp_safe(llama_cpp)  # its server crashes on AMX Xeons otherwise (docs/FACTS)
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def tool(index: int) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{index}",
            "description": f"Tool number {index}: reads or edits files in the workspace.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "A path in the workspace"},
                    "limit": {"type": "integer", "description": "At most this many lines"},
                },
                "required": ["path"],
            },
        },
    }


def text(tokens: int, salt: int) -> str:
    """``tokens // 2`` words of filler: about 1.6x ``tokens`` tokens on SmolLM2 (a word such as
    ``alpha12`` is about three); the JSON reports each prompt's real count."""
    return " ".join(f"{WORDS[(salt + i) % len(WORDS)]}{i % 97}" for i in range(tokens // 2))


def system_prompt(tokens: int) -> str:
    tools = "\n".join(json.dumps(tool(i)) for i in range(10))
    return f"You are a coding agent. Tools:\n{tools}\nProject notes:\n{text(tokens - 700, 0)}"


def post(url: str, body: dict[str, Any]) -> Iterator[bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        yield from response


def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the server at {url} did not start")


class Server:
    """One server under test: started, stopped, asked to load a model and to answer a turn."""

    agent = MODEL
    other = OTHER
    process: subprocess.Popen[bytes] | None = None
    url = ""

    def command(self, port: int) -> tuple[list[str], dict[str, str], str]:
        """The command line, its extra environment, and the path that answers once it is up."""
        raise NotImplementedError

    def start(self) -> None:
        port = free_port()
        command, env, probe = self.command(port)
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_up(f"{self.url}{probe}", self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def load(self, model: str) -> float:
        raise NotImplementedError

    def turn(self, model: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
        raise NotImplementedError


class Mlxserve(Server):
    def __init__(self, home: Path, env: dict[str, str], agent: str) -> None:
        self.home, self.env, self.agent = home, env, agent

    def command(self, port: int) -> tuple[list[str], dict[str, str], str]:
        binary = str(Path(sys.executable).with_name("mlxserve"))
        env = {
            "MLXSERVE_HOME": str(self.home),
            "MLXSERVE_MAX_LOADED_MODELS": "1",
            "MLXSERVE_KEEP_ALIVE": "-1",
            # a cold prefill of the whole trace on a loaded CPU can outlast the stall watchdog
            "MLXSERVE_RUNNER_STALL_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            **self.env,
        }
        return [binary, "--port", str(port)], env, "/api/health"

    def load(self, model: str) -> float:
        """Ollama's load: an empty ``/api/chat``."""
        started = time.perf_counter()
        for _ in post(f"{self.url}/api/chat", {"model": model, "messages": []}):
            pass
        return time.perf_counter() - started

    def turn(self, model: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "options": {"temperature": 0, "num_predict": tokens},
        }
        started = time.perf_counter()
        first = 0.0
        final: dict[str, Any] = {}
        content = ""
        for line in post(f"{self.url}/api/chat", body):
            event = json.loads(line)
            piece = event.get("message", {}).get("content")
            if piece and not first:
                first = time.perf_counter() - started
            content += piece or ""
            if event.get("done"):
                final = event
        eval_s = final.get("eval_duration", 0) / 1e9
        return {
            "ttft_s": round(first or time.perf_counter() - started, 3),
            "prompt_tokens": final.get("prompt_eval_count", 0),
            "cached_tokens": final.get("cached_prompt_tokens", 0),
            "eval_count": final.get("eval_count", 0),
            "decode_tokens_per_s": round(final.get("eval_count", 0) / eval_s, 2) if eval_s else 0,
            "answer": content,
        }


class OpenAIPeer(Server):
    """A peer server speaking ``/v1/chat/completions`` (llama_cpp.server, mlx_lm.server)."""

    def load(self, model: str) -> float:
        """A one-token request: neither peer has a load-only request."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        started = time.perf_counter()
        for _ in post(f"{self.url}/v1/chat/completions", body):
            pass
        return time.perf_counter() - started

    def turn(self, model: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
            "temperature": 0,
        }
        started = time.perf_counter()
        first = last = 0.0
        pieces = 0
        usage: dict[str, Any] = {}
        content = ""
        for raw in post(f"{self.url}/v1/chat/completions", body):
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data:") :])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    last = time.perf_counter() - started
                    first = first or last
                    pieces += 1
                    content += piece
        details = usage.get("prompt_tokens_details") or {}
        return {
            "ttft_s": round(first or time.perf_counter() - started, 3),
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens"),
            "eval_count": usage.get("completion_tokens", pieces),
            "decode_tokens_per_s": round((pieces - 1) / (last - first), 2) if last > first else 0,
            "answer": content,
        }


class LlamaCppServer(OpenAIPeer):
    """llama-cpp-python's server with two aliases of the GGUF: asking for the other one frees
    the agent's model and loads it again (its one-model-at-a-time proxy). It serves one
    request at a time; ``interrupt_requests`` off makes later requests wait their turn instead
    of ending the running stream early (docs/FACTS). Threads as the daemon's llama.cpp runner
    (its own default is half the cores)."""

    def __init__(self, gguf: Path, folder: Path, python: str, n_ctx: int = PEER_CONTEXT) -> None:
        self.agent, self.other = "agent", "other"
        self.gguf, self.folder, self.python, self.n_ctx = gguf, folder, python, n_ctx

    def command(self, port: int) -> tuple[list[str], dict[str, str], str]:
        threads = platform.default_threads()
        models = [
            {
                "model": str(self.gguf),
                "model_alias": alias,
                "n_ctx": self.n_ctx,
                "n_threads": threads,
                "n_threads_batch": threads,
                "verbose": False,
            }
            for alias in (self.agent, self.other)
        ]
        settings = {
            "host": "127.0.0.1",
            "port": port,
            "interrupt_requests": False,
            "models": models,
        }
        config = self.folder / "llama-cpp-server.json"
        config.write_text(json.dumps(settings))
        command = [self.python, "-c", LLAMA_CPP_SERVER, "--config_file", str(config)]
        return command, {}, "/v1/models"


class MlxLmServer(OpenAIPeer):
    """mlx_lm.server loads the model a request names (by path), one at a time: the other
    model is the same folder under a second path. It batches concurrent requests with
    mlx-lm's ``BatchGenerator`` (``parallel``: its decode and prompt concurrency)."""

    def __init__(
        self, folder: Path, other: Path, parallel: int | None = None, blas: str | None = None
    ) -> None:
        self.agent, self.other = str(folder), str(other)
        self.parallel = parallel
        self.blas = blas
        """A BLAS to preload (``LD_PRELOAD``), as the daemon loads one (``platform.use_cpu_blas``);
        ``None``: mlx-lm as a user runs it, on the BLAS MLX's wheel links."""

    def command(self, port: int) -> tuple[list[str], dict[str, str], str]:
        command = [sys.executable, "-m", "mlx_lm.server", "--model", self.agent]
        if self.parallel is not None:
            width = str(self.parallel)
            command += ["--decode-concurrency", width, "--prompt-concurrency", width]
        environment = {"HF_HUB_OFFLINE": "1"}
        if self.blas:
            environment |= {"LD_PRELOAD": self.blas, "MKL_THREADING_LAYER": "GNU"}
        return [*command, "--port", str(port)], environment, "/v1/models"


def session(server: Server, args: argparse.Namespace, system: str, salt: int) -> list[dict]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    turns = []
    for turn in range(args.turns):
        if turn:  # another model between turns: the agent's model is evicted
            server.load(server.other)
        load_s = server.load(server.agent)
        messages.append({"role": "user", "content": text(args.turn_tokens, salt + turn)})
        result = server.turn(server.agent, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": result.pop("answer") or "ok"})
        result["load_s"] = round(load_s, 3)
        print(f"  turn {turn}: {result}", file=sys.stderr, flush=True)
        turns.append(result)
    return turns


def trace(server: Server, args: argparse.Namespace, home: Path | None) -> list[list[dict]]:
    if home is not None:
        shutil.rmtree(home / "cache" / "prompts", ignore_errors=True)
    system = system_prompt(args.system_tokens)
    done = []
    for number in range(2):
        server.start()
        try:
            done.append(session(server, args, system, salt=100 * number))
        finally:
            server.stop()
    return done


def goals(sessions: list[list[dict]]) -> dict[str, float]:
    """The issue's ratios: first turn after the restart vs cold, each later turn vs the first
    cached one (the second turn of the first session)."""
    cold = sessions[0][0]["ttft_s"]
    after_restart = sessions[1][0]["ttft_s"]
    first_cached = sessions[0][1]["ttft_s"] if len(sessions[0]) > 1 else after_restart
    later = [t["ttft_s"] for s in sessions for t in s[1:]]
    return {
        "cold_ttft_s": cold,
        "first_turn_after_restart_vs_cold": round(after_restart / cold, 3),
        "worst_later_turn_vs_first_cached": round(max(later, default=0) / first_cached, 3),
        "median_later_turn_vs_first_cached": round(median(later) / first_cached, 3),
        "median_load_s": round(median([t["load_s"] for s in sessions for t in s]), 3),
    }


def decode_cost(home: Path, args: argparse.Namespace, agent: str) -> dict[str, Any]:
    """Decode rates with and without the disk tier: two daemons, one conversation each without
    swaps, each conversation's turns back to back on its daemon (so each turn's entry is written
    behind while that daemon's next turn prefills and decodes, as in an agent's session), the
    daemons taking turns by conversation in the order AB then BA (so a drift of the machine's
    load hits both alike). A turn's rate is paired with the same turn's on the other daemon in
    the same round (the same context length); the goal reads the median of those ratios."""
    shutil.rmtree(home / "cache" / "prompts", ignore_errors=True)
    servers = {
        "with_disk_tier": Mlxserve(home, {}, agent),
        "without_disk_tier": Mlxserve(home, {"MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}, agent),
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    written: dict[str, int] = {}
    try:
        for server in servers.values():
            server.start()
            server.load(agent)
        for round_, order in enumerate((list(servers), list(reversed(servers)))):
            system = f"Session {round_}. " + system_prompt(args.system_tokens)
            for name in order:
                messages = [{"role": "system", "content": system}]
                for turn in range(args.decode_turns):
                    messages.append({"role": "user", "content": text(args.turn_tokens, turn)})
                    result = servers[name].turn(agent, messages, args.decode_tokens)
                    messages.append({"role": "assistant", "content": result["answer"] or "ok"})
                    if turn:  # the first turn is a cold prefill on both
                        rates[name].append(result["decode_tokens_per_s"])
                    rate = result["decode_tokens_per_s"]
                    print(f"  decode {name} {round_}.{turn}: {rate}", file=sys.stderr)
        for name, server in servers.items():
            with urllib.request.urlopen(f"{server.url}/api/ps", timeout=60) as response:
                models = json.loads(response.read()).get("models", [])
            cache = models[0].get("prompt_cache", {}) if models else {}
            written[name] = cache.get("disk", {}).get("entries", 0)
    finally:
        for server in servers.values():
            server.stop()
    pairs = [
        on / off
        for on, off in zip(rates["with_disk_tier"], rates["without_disk_tier"], strict=True)
        if off
    ]
    return {
        "tokens_per_answer": args.decode_tokens,
        "rates": rates,
        "disk_entries_written": written,
        "decode_rate_with_vs_without_disk_tier": round(median(pairs), 3) if pairs else None,
        "per_turn_ratios": [round(p, 3) for p in pairs],
    }


def prepare(args: argparse.Namespace) -> tuple[Any, str, Path, Path]:
    """The store, the agent's model name, the GGUF, and a scratch folder."""
    store = bench_store()
    weights = open_model(store, MODEL).weights[0]
    if not store.exists(OTHER):
        import_path(store, weights, OTHER)
    agent = MODEL
    scratch = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    if args.runner == "mlx":
        from bench.load import MLX_MODEL, mlx_copy

        args.mlx_folder = mlx_copy(store)
        agent = MLX_MODEL
    return store, agent, weights, scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", choices=["llamacpp", "mlx"], default="llamacpp")
    parser.add_argument("--system-tokens", type=int, default=None, help="default 2500 (MLX 800)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["mlxserve", "nodisk", "peer", "decode"],
        choices=["mlxserve", "nodisk", "peer", "decode"],
    )
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--decode-turns", type=int, default=6)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.system_tokens is None:
        args.system_tokens = MLX_SYSTEM_TOKENS if args.runner == "mlx" else LLAMACPP_SYSTEM_TOKENS
    store, agent, weights, scratch = prepare(args)
    home = store.root
    result: dict[str, Any] = {
        "runner": args.runner,
        "config": {k: str(v) for k, v in vars(args).items()},
        "load_average_at_start": os.getloadavg(),
    }
    phases: dict[str, Server] = {
        "mlxserve": Mlxserve(home, {}, agent),
        "nodisk": Mlxserve(home, {"MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}, agent),
    }
    if args.runner == "mlx":
        other = scratch / "other-model"
        other.symlink_to(args.mlx_folder, target_is_directory=True)
        phases["peer"] = MlxLmServer(args.mlx_folder, other)
    else:
        phases["peer"] = LlamaCppServer(weights, scratch, args.peer_python)
    labels = {"nodisk": "mlxserve_without_disk_tier", "peer": phases["peer"].__class__.__name__}
    try:
        for phase in [p for p in args.phases if p != "decode"]:
            print(f"{phase}:", file=sys.stderr, flush=True)
            sessions = trace(phases[phase], args, home if phase != "peer" else None)
            result[labels.get(phase, phase)] = {"sessions": sessions, "goals": goals(sessions)}
        if "decode" in args.phases:
            result["decode"] = decode_cost(home, args, agent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()
    emit(result)


if __name__ == "__main__":
    main()
