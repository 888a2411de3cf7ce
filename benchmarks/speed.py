"""Speed of quantized layers and the default model on CPU: per-layer latency and decode tokens/s.

    python benchmarks/speed.py                   # float32 vs W2 g64 vs W4 g64 (RTN weights), 2 threads
    python benchmarks/speed.py --new-tokens 8 --max-wait 0 --no-record             # a quick look

Speed does not depend on how the integers were chosen, so the model is quantized with RTN and the
layers get random packed weights. Every ratio compares numbers measured in the same run. Prints
tables and appends them to benchmarks/RESULTS.md with the thread count and the machine's load.
The GPU figures (Llama-7B shapes, cuBLAS and bitsandbytes NF4 beside hfquant's kernels) are
benchmarks/gpu.py's ``layers`` and ``e2e`` sections.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from _common import (
    add_common_arguments,
    append_results,
    decode_tokens_per_s,
    load_default,
    machine_line,
    print_table,
    random_layer,
    setup,
    time_call,
)
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.kernels import cpu as cpu_kernel

MIN_SECONDS = 0.3  # per latency: the CPU is shared, so each figure is a median over this long


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def wait_for_low_load(max_wait: float, threshold: float) -> None:
    """The CPU is shared: wait (up to ``max_wait`` seconds) until the 1-minute load drops."""
    deadline = time.time() + max_wait
    while os.getloadavg()[0] > threshold and time.time() < deadline:
        print(f"waiting for a quieter machine: {load_note()}", flush=True)
        time.sleep(30)


def no_sync() -> None:
    """CPU calls are synchronous: nothing to wait for."""


def layer_row(out_f: int, in_f: int) -> dict[str, str]:
    """Batch-1 latency of one default-model layer shape: float32, and W2/W4 g64 by kernel and by reference."""
    dense = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(1, in_f)
    row = {
        "layer (out x in)": f"{out_f} x {in_f}",
        "fp32 (us)": time_call(lambda: F.linear(x, dense), no_sync, MIN_SECONDS),
    }
    for bits in (2, 4):
        layer = random_layer(out_f, in_f, bits, 64, torch.float32, "cpu")
        with torch.no_grad():
            row[f"W{bits} kernel (us)"] = time_call(lambda layer=layer: layer(x), no_sync, MIN_SECONDS)
            row[f"W{bits} dequant+matmul (us)"] = time_call(
                lambda layer=layer: F.linear(x, layer.dequantize()), no_sync, MIN_SECONDS
            )
    return {k: v if isinstance(v, str) else f"{v * 1e6:.0f}" for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-wait", type=float, default=900, help="seconds to wait for a low CPU load")
    parser.add_argument("--load-threshold", type=float, default=1.0)
    add_common_arguments(parser, windows=None)
    parser.set_defaults(threads=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    setup(args)
    path, _ = load_default()
    wait_for_low_load(args.max_wait, args.load_threshold)
    load_start = load_note()

    layer_rows = [layer_row(out_f, in_f) for out_f, in_f in [(576, 576), (1536, 576), (576, 1536)]]

    prompt = torch.randint(0, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    model_rows = []
    fp_speed = None
    for name, bits in [("fp32", None), ("W2 g64", 2), ("W4 g64", 4)]:
        config = HfQuantConfig(bits=bits, group_size=64, method="rtn") if bits else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).eval()
        speed = decode_tokens_per_s(model, prompt, args.new_tokens, no_sync, repeats=3)
        fp_speed = fp_speed or speed
        weight_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
        model_rows.append(
            {
                "model": name,
                "decode tokens/s": f"{speed:.1f}",
                "x fp32": f"{speed / fp_speed:.2f}",
                "weights+buffers (MiB)": f"{weight_mb:.0f}",
            }
        )
        print(f"{name}: {speed:.1f} tokens/s", flush=True)
        del model
    load_end = load_note()
    print()
    layer_table = print_table(layer_rows)
    print()
    print_table(model_rows)
    text = (
        f"SmolLM2-135M-Instruct, {machine_line()}. Per-layer: batch-1 latency, median. Decode: greedy, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, KV cache, prefill excluded. C++ kernel "
        f"{'on' if cpu_kernel.available() else 'OFF'}. Machine shared with other jobs: {load_start} at the "
        f"start, {load_end} at the end.\n\n{layer_table}"
    )
    append_results(model_rows, title="speed.py: CPU layer latency and decode speed", text=text)


if __name__ == "__main__":
    main()
