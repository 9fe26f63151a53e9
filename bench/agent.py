"""An agent-like trace against the real daemon: does the prompt cache keep a coding agent's
long, repeating prompt cheap across turns, model swaps and a restart?

The trace (the shape of issue 22): a system prompt with ten tool definitions, padded to
``--system-tokens``; two sessions of ``--turns`` turns, each adding a user message of about
``--turn-tokens`` tokens and the model's answer; a second model loaded between turns with one
model slot (so the agent's model is evicted and reloaded each time); a daemon restart between
the two sessions. The first session starts with an empty cache (its first turn is the cold
time to first token). Then one session with the disk tier off: its decode rate shows what the
write-behind costs, its later turns what a swap costs without the disk tier.

Prints JSON: per session and turn the time to first token, prompt and cached tokens, and the
ratios the issue sets as goals (first turn after the restart vs. cold, each later turn vs.
the first cached one, decode rate with the disk tier vs. without).

    python -m bench.agent [--runner llamacpp|mlx] [--system-tokens 1000] [--turns 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import MODEL, bench_store, emit, median
from modelstore.importer import import_path
from modelstore.runtime import open_model

OTHER = "bench-other:1"
"""The second model of the trace: the default model's weights under another name (another
resident: with one model slot, loading it evicts the agent's model)."""
MLX_MODEL = "bench-agent-mlx:1"
"""The default model converted to MLX (float weights, as the MLX runner holds them off Metal)."""
MLX_SYSTEM_TOKENS = 500
"""The MLX runner's default prefix: MLX on a CPU prefills far slower than llama.cpp."""
START_TIMEOUT_S = 120
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
    """About ``tokens`` tokens of filler (a word and a space are about two tokens)."""
    return " ".join(f"{WORDS[(salt + i) % len(WORDS)]}{i % 97}" for i in range(tokens // 2))


def system_prompt(tokens: int) -> str:
    tools = "\n".join(json.dumps(tool(i)) for i in range(10))
    return f"You are a coding agent. Tools:\n{tools}\nProject notes:\n{text(tokens - 700, 0)}"


class Daemon:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        binary = str(Path(sys.executable).with_name("mlxserve"))
        self.process = subprocess.Popen(
            [binary, "--port", str(port)],
            env={**os.environ, "MLXSERVE_HOME": str(self.home), **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the daemon did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def stream(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Time to the first streamed content, and the final line."""
        request = urllib.request.Request(
            f"{self.url}/api/chat",
            data=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        first = 0.0
        final: dict[str, Any] = {}
        with urllib.request.urlopen(request, timeout=3600) as response:
            for line in response:
                event = json.loads(line)
                if not first and event.get("message", {}).get("content"):
                    first = time.perf_counter() - started
                if event.get("done"):
                    final = event
        return first or (time.perf_counter() - started), final


def session(
    daemon: Daemon, args: argparse.Namespace, system: str, salt: int
) -> list[dict[str, Any]]:
    model = MLX_MODEL if args.runner == "mlx" else MODEL
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    turns = []
    options = {"temperature": 0, "num_predict": args.max_tokens}
    for turn in range(args.turns):
        if turn:  # another model between turns: the agent's model is evicted
            daemon.stream(
                {
                    "model": OTHER,
                    "messages": [{"role": "user", "content": "hi"}],
                    "options": {"num_predict": 1},
                }
            )
        messages.append({"role": "user", "content": text(args.turn_tokens, salt + turn)})
        ttft, final = daemon.stream({"model": model, "messages": messages, "options": options})
        messages.append(
            {"role": "assistant", "content": final.get("message", {}).get("content", "") or "ok"}
        )
        print(
            f"turn {turn}: ttft {ttft:.2f}s {final.get('cached_prompt_tokens')}/"
            f"{final.get('prompt_eval_count')} cached",
            file=sys.stderr,
            flush=True,
        )
        turns.append(
            {
                "ttft_s": round(ttft, 3),
                "prompt_tokens": final.get("prompt_eval_count", 0),
                "cached_tokens": final.get("cached_prompt_tokens", 0),
                "decode_tokens_per_s": round(
                    final.get("eval_count", 0) / max(final.get("eval_duration", 1) / 1e9, 1e-9), 2
                ),
            }
        )
    return turns


def trace(
    home: Path, args: argparse.Namespace, env: dict[str, str], sessions: int = 2
) -> list[list[dict[str, Any]]]:
    shutil.rmtree(home / "cache" / "prompts", ignore_errors=True)
    system = system_prompt(args.system_tokens)
    daemon = Daemon(home, env)
    done = []
    for number in range(sessions):
        daemon.start()
        try:
            done.append(session(daemon, args, system, salt=100 * number))
        finally:
            daemon.stop()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", choices=["llamacpp", "mlx"], default="llamacpp")
    parser.add_argument("--system-tokens", type=int, default=None, help="default 1000 (MLX 500)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    if args.system_tokens is None:
        args.system_tokens = MLX_SYSTEM_TOKENS if args.runner == "mlx" else 1000
    store = bench_store()
    names = {m.name for m in store.list()}
    weights = open_model(store, MODEL).weights[0]
    if OTHER not in names:
        import_path(store, weights, OTHER)
    if args.runner == "mlx" and MLX_MODEL not in names:
        from mlxserve.runners.mlx.gguf_convert import convert_gguf

        folder = convert_gguf(weights, store.root / "tmp" / "bench-agent-mlx", dequantize=True)
        import_path(store, folder, MLX_MODEL)
    home = store.root
    config = {"max_loaded_models": 1, "keep_alive": "-1"}
    env = {"MLXSERVE_MAX_LOADED_MODELS": "1", "MLXSERVE_KEEP_ALIVE": "-1"}
    with_disk = trace(home, args, env)
    without = trace(home, args, {**env, "MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}, sessions=1)
    cold = with_disk[0][0]["ttft_s"]
    after_restart = with_disk[1][0]["ttft_s"]
    first_cached = with_disk[0][1]["ttft_s"] if args.turns > 1 else after_restart
    later = [t["ttft_s"] for s in with_disk for t in s[1:]]
    rate_on = median([t["decode_tokens_per_s"] for s in with_disk for t in s])
    rate_off = median([t["decode_tokens_per_s"] for s in without for t in s])
    emit(
        {
            "runner": args.runner,
            "config": {**vars(args), **config},
            "load_average": os.getloadavg()[0],
            "sessions": with_disk,
            "sessions_without_disk_tier": without,
            "ratios": {
                "first_turn_after_restart_vs_cold": round(after_restart / cold, 3),
                "worst_later_turn_vs_first_cached": round(max(later) / first_cached, 3),
                "decode_rate_with_vs_without_disk_tier": round(rate_on / rate_off, 3),
                "without_disk_tier_later_turn_vs_cold": round(
                    median([t["ttft_s"] for t in without[0][1:]]) / without[0][0]["ttft_s"], 3
                ),
            },
        }
    )


if __name__ == "__main__":
    main()
