"""Speed of quantized layers and models: per-layer latency and end-to-end decode tokens/s.

    python benchmarks/speed.py --device cpu    # default model: float32 vs W2 g64 vs W4 g64 (RTN weights)
    python benchmarks/speed.py --device cuda   # Llama-7B shapes: fp16 (cuBLAS) vs W2 g64 vs bitsandbytes NF4

Speed does not depend on how the integers were chosen, so CPU models are quantized with RTN and
GPU models get random packed weights. Every ratio compares numbers measured in the same run.
Prints tables and appends them to benchmarks/RESULTS.md with the device, thread count and load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.grid import num_groups
from hfquant.cli import print_table
from hfquant.kernels import cpu as cpu_kernel
from hfquant.nn import DecoupledLinear, packed_width

RESULTS = Path(__file__).with_name("RESULTS.md")
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)


def random_layer(
    out_f: int, in_f: int, bits: int, group_size: int, dtype: torch.dtype, device: str
) -> DecoupledLinear:
    """A DecoupledLinear with random integers and a plausible grid (speed does not depend on values)."""
    layer = DecoupledLinear(in_f, out_f, bits, group_size, bias=False, dtype=dtype, device=device)
    words = packed_width(in_f, bits)
    layer.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, (out_f, words), dtype=torch.int32, device=device))
    ng = num_groups(in_f, group_size)
    layer.scales.copy_(torch.rand(out_f, ng, device=device) * 0.02)
    layer.zeros.copy_(-torch.rand(out_f, ng, device=device) * 0.02 * (2**bits - 1) / 2)
    return layer


def time_call(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float = 0.3) -> float:
    """Median seconds per call over repeated timed batches (after warm-up)."""
    for _ in range(3):
        fn()
    sync()
    samples, total = [], 0.0
    while total < min_seconds or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(10):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / 10)
        total += samples[-1] * 10
    return sorted(samples)[len(samples) // 2]


def decode_tokens_per_s(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, sync: Callable[[], None]
) -> float:
    """Greedy decode speed with the KV cache: (t(N tokens) - t(1 token)) / (N - 1), prefill excluded."""

    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    run(4)  # warm-up
    t1 = sorted(run(1) for _ in range(3))[1]
    tn = sorted(run(new_tokens) for _ in range(3))[1]
    return (new_tokens - 1) / (tn - t1)


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def wait_for_low_load(max_wait: float, threshold: float) -> None:
    """The CPU is shared: wait (up to ``max_wait`` seconds) until the 1-minute load drops."""
    deadline = time.time() + max_wait
    while os.getloadavg()[0] > threshold and time.time() < deadline:
        print(f"waiting for a quieter machine: {load_note()}", flush=True)
        time.sleep(30)


def cpu_layer_row(out_f: int, in_f: int) -> dict[str, str]:
    """Batch-1 latency of one default-model layer shape: float32, and W2/W4 g64 by kernel and by reference."""
    dense = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(1, in_f)
    nothing = lambda: None  # noqa: E731 - CPU calls are synchronous
    row = {
        "layer (out x in)": f"{out_f} x {in_f}",
        "fp32 (us)": time_call(lambda: F.linear(x, dense), nothing),
    }
    for bits in (2, 4):
        layer = random_layer(out_f, in_f, bits, 64, torch.float32, "cpu")
        with torch.no_grad():
            row[f"W{bits} kernel (us)"] = time_call(lambda layer=layer: layer(x), nothing)
            row[f"W{bits} dequant+matmul (us)"] = time_call(
                lambda layer=layer: F.linear(x, layer.dequantize()), nothing
            )
    return {k: v if isinstance(v, str) else f"{v * 1e6:.0f}" for k, v in row.items()}


def bench_cpu(args: argparse.Namespace) -> str:
    from transformers import AutoModelForCausalLM

    from hfquant import HfQuantConfig
    from hfquant.models import default_model_path

    torch.set_num_threads(args.threads)
    kernel = cpu_kernel.available()
    nothing = lambda: None  # noqa: E731 - CPU calls are synchronous
    path = default_model_path()
    wait_for_low_load(args.max_wait, args.load_threshold)
    load_start = load_note()

    layer_rows = [cpu_layer_row(out_f, in_f) for out_f, in_f in [(576, 576), (1536, 576), (576, 1536)]]

    prompt = torch.randint(0, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    model_rows = []
    models: list[tuple[str, dict]] = [("fp32", {}), ("W2 g64", {"bits": 2}), ("W4 g64", {"bits": 4})]
    fp_speed = None
    for name, q in models:
        config = HfQuantConfig(bits=q["bits"], group_size=64, method="rtn") if q else None
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=config
        ).eval()
        speed = decode_tokens_per_s(model, prompt, args.new_tokens, nothing)
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
    tables = print_table(layer_rows) + "\n\n" + print_table(model_rows)
    return (
        f"\n## speed.py --device cpu, {datetime.date.today()}: SmolLM2-135M-Instruct, {platform.machine()} CPU "
        f"({platform.processor() or 'unknown model'}), {torch.get_num_threads()} threads\n\n"
        f"Per-layer: batch-1 latency, median. Decode: greedy, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, KV cache, prefill excluded. C++ kernel {'on' if kernel else 'OFF'}. "
        f"Machine shared with other jobs: {load_start} at the start, {load_end} at the end.\n\n"
        f"{tables}\n"
    )


def llama7b_like(dtype: torch.dtype, layers: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def quantize_random_(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Replace every linear of the decoder blocks (not lm_head), freeing each dense weight at once."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
            torch.cuda.empty_cache()
    return model


def bench_cuda(args: argparse.Namespace) -> str:
    if not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
        )
    from hfquant.kernels import triton_matmul

    if not triton_matmul.triton_installed():
        raise SystemExit("--device cuda measures the Triton kernels: pip install triton")
    sync = torch.cuda.synchronize
    dtype = torch.float16
    layer_rows = []
    for out_f, in_f in LLAMA7B_SHAPES:
        dense = torch.randn(out_f, in_f, dtype=dtype, device="cuda") * 0.02
        layer = random_layer(out_f, in_f, 2, 64, dtype, "cuda")
        for batch in (1, 4, 16, 512):
            x = torch.randn(batch, in_f, dtype=dtype, device="cuda")
            t_fp = time_call(lambda: F.linear(x, dense), sync)  # noqa: B023
            with torch.no_grad():
                t_q = time_call(lambda: layer(x), sync)  # noqa: B023
            layer_rows.append(
                {"layer (out x in)": f"{out_f} x {in_f}", "rows": batch, "fp16 (us)": f"{t_fp * 1e6:.1f}",
                 "W2 g64 (us)": f"{t_q * 1e6:.1f}", "speed-up": f"{t_fp / t_q:.2f}"}
            )  # fmt: skip
    print_table(layer_rows)

    prompt = torch.randint(0, 32000, (1, args.prompt_len), device="cuda")
    model_rows = []
    builders: list[tuple[str, Callable[[nn.Linear], nn.Module] | None]] = [
        ("fp16", None),
        ("W2 g64", lambda lin: random_layer(lin.out_features, lin.in_features, 2, 64, dtype, "cuda")),
    ]
    try:
        import bitsandbytes as bnb

        def nf4(lin: nn.Linear) -> nn.Module:
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
            )
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            return q.cuda()

        builders.append(("bnb NF4", nf4))
    except ImportError:
        print("bitsandbytes is not installed: NF4 row skipped")
    fp_speed = None
    for name, make in builders:
        torch.cuda.empty_cache()
        model = llama7b_like(dtype, args.layers)
        if make is not None:
            quantize_random_(model, make)
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        speed = decode_tokens_per_s(model, prompt, args.new_tokens, sync)
        fp_speed = fp_speed or speed
        model_rows.append(
            {"model": name, "decode tokens/s": f"{speed:.1f}", "x fp16": f"{speed / fp_speed:.2f}",
             "weight memory (GiB)": f"{weights / 2**30:.2f}", "peak memory (GiB)": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"}
        )  # fmt: skip
        print(f"{name}: {speed:.1f} tokens/s", flush=True)
        del model
    tables = print_table(layer_rows) + "\n\n" + print_table(model_rows)
    return (
        f"\n## speed.py --device cuda, {datetime.date.today()}: {torch.cuda.get_device_name()}\n\n"
        f"Per-layer: Llama-7B shapes, fp16 activations, median latency. Decode: Llama-7B-shaped model "
        f"({args.layers} layers, random weights), greedy, prompt {args.prompt_len} tokens, {args.new_tokens} "
        f"new tokens, prefill excluded; memory includes embeddings and lm_head in fp16.\n\n{tables}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--layers", type=int, default=32, help="decoder blocks of the Llama-7B-shaped model (cuda)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=900, help="seconds to wait for a low CPU load (cpu)"
    )
    parser.add_argument("--load-threshold", type=float, default=1.0)
    parser.add_argument("--no-save", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    text = bench_cpu(args) if args.device == "cpu" else bench_cuda(args)
    if not args.no_save:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
