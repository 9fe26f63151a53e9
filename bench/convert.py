"""GGUF -> MLX conversion: time and peak memory against the sizes of the file and the result.

Prints JSON. For each size it writes a random-weight llama GGUF of about that many bytes
(gguf-py's writer and its Q8_0 quantizer, or llama.cpp's quantizer for K-quants), then converts
it in a fresh process and reads that process's peak resident memory (``VmHWM``). The goal is a
peak below 1.5x the converted output: the converter streams one tensor at a time.

    python -m bench.convert [--sizes-mb 256 1024] [--quant Q8_0] [--requantize]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit

HIDDEN = 2048
FFN = 5632
HEADS = 16
KV_HEADS = 4
LLAMA_FTYPES = {"Q4_K_M": 15, "Q6_K": 18}
"""K-quants come from llama.cpp's quantizer (gguf-py has none); Q8_0 from gguf-py's."""


def layer_params() -> int:
    head_dim = HIDDEN // HEADS
    return 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * FFN


def write_gguf(path: Path, size_mb: int, quant: str) -> Path:
    """A llama GGUF of about ``size_mb`` MB (Q8_0 stores 8.5 bits a weight)."""
    import gguf

    from tests.fixtures.tiny_models import _gguf_vocab, train_tokenizer

    bits = {"Q8_0": 8.5, "Q6_K": 6.56, "Q4_K_M": 4.8}[quant]
    layers = max(1, round(size_mb * 2**20 * 8 / bits / layer_params()))
    direct = quant == "Q8_0"
    target = path if direct else path.with_suffix(".f32.gguf")
    tokens, types, merges = _gguf_vocab(json.loads(train_tokenizer().to_str()))
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if direct else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HIDDEN // HEADS

    def add(name: str, rows: int, cols: int) -> None:
        value = (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(
            np.float32
        )
        if direct and cols % 32 == 0 and rows > 1:
            quantized = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value.reshape(-1) if rows == 1 else value)

    add("token_embd.weight", len(tokens), HIDDEN)
    for layer in range(layers):
        p = f"blk.{layer}."
        add(p + "attn_norm.weight", 1, HIDDEN)
        add(p + "attn_q.weight", HIDDEN, HIDDEN)
        add(p + "attn_k.weight", kv, HIDDEN)
        add(p + "attn_v.weight", kv, HIDDEN)
        add(p + "attn_output.weight", HIDDEN, HIDDEN)
        add(p + "ffn_norm.weight", 1, HIDDEN)
        add(p + "ffn_gate.weight", FFN, HIDDEN)
        add(p + "ffn_up.weight", FFN, HIDDEN)
        add(p + "ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", 1, HIDDEN)
    add("output.weight", len(tokens), HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if direct:
        return path
    from tests.fixtures.gguf_models import quantize_gguf

    quantize_gguf(target, path, LLAMA_FTYPES[quant])
    target.unlink()
    return path


CHILD = """
import sys, time
from pathlib import Path
from mlxserve.runners.mlx.gguf_convert import convert_gguf
started = time.perf_counter()
out = convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), dequantize=sys.argv[3] == "1")
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(seconds, peak, sum(p.stat().st_size for p in out.iterdir()))
"""


def measure(gguf: Path, out: Path, dequantize: bool) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(gguf), str(out), "1" if dequantize else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, peak, output = done.stdout.split()[-3:]
    return {"seconds": float(seconds), "peak_rss_bytes": int(peak), "output_bytes": int(output)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--quant", default="Q8_0", choices=["Q8_0", *LLAMA_FTYPES])
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="Convert as on Metal (MLX affine bits) instead of to float32.",
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="mlxserve-bench-convert-") as scratch:
        for size_mb in args.sizes_mb:
            gguf = write_gguf(Path(scratch) / f"bench-{size_mb}.gguf", size_mb, args.quant)
            started = time.perf_counter()
            measured = measure(gguf, Path(scratch) / f"out-{size_mb}", not args.requantize)
            gguf_bytes = gguf.stat().st_size
            results.append(
                {
                    "gguf_bytes": gguf_bytes,
                    **measured,
                    "wall_seconds": round(time.perf_counter() - started, 2),
                    "gguf_mb_per_s": round(gguf_bytes / 2**20 / measured["seconds"], 1),
                    "peak_rss_over_output": round(
                        measured["peak_rss_bytes"] / measured["output_bytes"], 3
                    ),
                }
            )
            gguf.unlink()
    emit(
        {"bench": "convert", "quant": args.quant, "requantize": args.requantize, "results": results}
    )


if __name__ == "__main__":
    main()
