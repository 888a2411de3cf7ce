"""RTN, GPTQ, decoupleQ, SplitQuant and INQ at equal bits: held-out perplexity, bits per weight, time.

    python benchmarks/methods.py                               # full grid (an hour or more on 2 cores)
    python benchmarks/methods.py --bits 4 --methods rtn,splitquant-rtn --windows 1 --nsamples 4

Every method quantizes the default model at each bit width with the same group size and the same
calibration windows; perplexity is on held-out text (Book of Mormon chapters calibration never
sees). Bits per weight count everything a method stores (integers, grids, SplitQuant's cluster
indices, INQ's exponents). Appends a markdown table to benchmarks/RESULTS.md row by row as each
run finishes (so a partial run still records), and redraws the plot (perplexity, log scale, vs
bits per weight, one line per method) after every row.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from quality import table_lines
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.calibration import heldout_texts
from hfquant.cli import print_table
from hfquant.eval import perplexity
from hfquant.export import bits_per_weight
from hfquant.models import default_model_path

# Block-wise minimization is off for the layer solvers (it is a separate hfquant stage); INQ's
# retraining between its steps uses --blockwise-epochs, since retraining is part of the method.
METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq", "blockwise_epochs": 0},
    "decoupleq": {"method": "decoupleq", "blockwise_epochs": 0},
    "splitquant-rtn": {"method": "rtn", "split": True},
    "splitquant-decoupleq": {"method": "decoupleq", "blockwise_epochs": 0, "split": True},
    "inq": {"method": "inq"},
}
RESULTS = Path(__file__).with_name("RESULTS.md")
PLOT = Path(__file__).with_name("methods.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--clusters", type=int, default=3, help="SplitQuant clusters")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument("--blockwise-epochs", type=int, default=2, help="INQ retraining epochs per step")
    parser.add_argument("--windows", type=int, default=8, help="512-token held-out windows scored")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is appended to")
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = heldout_texts()

    def ppl(model) -> float:
        return perplexity(model, tokenizer, texts, seqlen=512, max_windows=args.windows, progress=False)

    header = (
        f"\n## methods.py, {datetime.date.today()}: SmolLM2-135M-Instruct, {platform.machine()} CPU "
        f"({platform.processor() or 'unknown model'}), {torch.get_num_threads()} threads "
        f"(os.cpu_count()={os.cpu_count()})\n\n"
        f"Held-out perplexity: {args.windows} windows x 512 tokens of Book of Mormon chapters never used in "
        f"calibration. Calibration: {args.nsamples} x {args.seqlen} tokens of the other chapters. Group size "
        f"{args.group_size}; decoupleQ {args.decoupleq_iters} rounds, no block-wise minimization; SplitQuant "
        f"{args.clusters} clusters; INQ retrains {args.blockwise_epochs} epochs between its 50/75/87.5/100% "
        "steps. Bits/weight: everything stored, over the quantized layers. Time: quantization only, on this "
        "machine (shared with other jobs: compare within a run only). Rows are appended as each run finishes.\n\n"
    )
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fp_ppl = ppl(full)
    del full
    rows: list[dict[str, str]] = []
    with args.results.open("a", encoding="utf-8") as f:
        fp_row = {
            "bits": "fp32",
            "method": "full precision",
            "perplexity": f"{fp_ppl:.2f}",
            "x fp": "1.00",
            "bits/weight": "32",
            "time (s)": "-",
        }
        f.write(header + table_lines([fp_row], with_header=True))
    for bits in (int(b) for b in args.bits.split(",")):
        for method in methods:
            settings = {"blockwise_epochs": args.blockwise_epochs, **METHODS[method]}
            split = settings.pop("split", False)
            config = HfQuantConfig(
                bits=bits,
                group_size=args.group_size,
                split_clusters=args.clusters if split else 0,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                decoupleq_iters=args.decoupleq_iters,
                blockwise_batch_size=4,
                tokenizer=tokenizer,
                **settings,
            )
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
            seconds = time.perf_counter() - start
            value = ppl(model)
            row = {
                "bits": f"W{bits}",
                "method": method,
                "perplexity": f"{value:.2f}",
                "x fp": f"{value / fp_ppl:.2f}",
                "bits/weight": f"{bits_per_weight(model):.3f}",
                "time (s)": f"{seconds:.0f}",
            }
            rows.append(row)
            with args.results.open("a", encoding="utf-8") as f:
                f.write(table_lines([row], with_header=False))
            plot(rows, fp_ppl, args.plot, args.group_size)
            print(f"W{bits} {method}: ppl {value:.2f} ({value / fp_ppl:.2f}x fp) in {seconds:.0f} s", flush=True)
            del model
    print()
    print_table([fp_row, *rows])


def plot(rows: list[dict[str, str]], fp_ppl: float, out: Path, group_size: int) -> None:
    """Perplexity (log scale) against bits per weight, one line per method, full precision dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((float(r["bits/weight"]), float(r["perplexity"])) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(fp_ppl, color="black", linestyle="--", linewidth=1, label=f"fp32 ({fp_ppl:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bits per weight (all storage counted)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M-Instruct, group {group_size}: methods at 2/3/4 bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
