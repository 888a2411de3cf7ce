"""Quality of each method on the default model: held-out perplexity, bits per weight, time.

    python benchmarks/quality.py                       # full grid (tens of minutes on 2 cores)
    python benchmarks/quality.py --configs w2g64 --methods rtn,decoupleq+bw

Every quantized model is compared with full precision on the same held-out text (Book of Mormon
chapters that calibration never sees), in the same run. Prints a table and appends it to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.calibration import heldout_texts
from hfquant.cli import print_table
from hfquant.eval import perplexity
from hfquant.export import bits_per_weight
from hfquant.models import default_model_path

METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq", "blockwise_epochs": 0},
    "decoupleq": {"method": "decoupleq", "blockwise_epochs": 0},
    "decoupleq+bw": {"method": "decoupleq"},
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_config(text: str) -> tuple[int, int]:
    bits, group = text.lower().removeprefix("w").split("g")
    return int(bits), int(group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="w2g64,w2g128,w3g64,w4g64")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--blockwise-epochs", type=int, default=4)
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument("--windows", type=int, default=32, help="512-token held-out windows scored")
    args = parser.parse_args()

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = heldout_texts()

    def ppl(model) -> float:
        return perplexity(model, tokenizer, texts, seqlen=512, max_windows=args.windows, progress=False)

    header = (
        f"\n## quality.py, {datetime.date.today()}: SmolLM2-135M-Instruct, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads (os.cpu_count()={os.cpu_count()})\n\n"
        f"Held-out perplexity: {args.windows} windows x 512 tokens of Book of Mormon chapters never used in "
        f"calibration. Calibration: {args.nsamples} x {args.seqlen} tokens of the other chapters; "
        f"decoupleQ {args.decoupleq_iters} rounds; block-wise minimization {args.blockwise_epochs} epochs "
        "(`+bw`). Time: quantization only, on this machine (shared with other jobs: compare times within a "
        "row group only). Rows are appended as each run finishes.\n\n"
    )
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fp_ppl = ppl(full)
    del full
    rows = [
        {
            "config": "fp32",
            "method": "full precision",
            "perplexity": f"{fp_ppl:.2f}",
            "x fp": "1.00",
            "bits/weight": "32",
            "time (s)": "-",
        }
    ]
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(header + table_lines(rows, with_header=True))
    for config_name in args.configs.split(","):
        bits, group_size = parse_config(config_name)
        for method in args.methods.split(","):
            settings = {"blockwise_epochs": args.blockwise_epochs, **METHODS[method]}
            config = HfQuantConfig(
                bits=bits,
                group_size=group_size,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                decoupleq_iters=args.decoupleq_iters,
                blockwise_batch_size=4,
                tokenizer=tokenizer,
                **settings,
            )
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, quantization_config=config
            )
            seconds = time.perf_counter() - start
            value = ppl(model)
            row = {
                "config": f"W{bits} g{group_size}",
                "method": method,
                "perplexity": f"{value:.2f}",
                "x fp": f"{value / fp_ppl:.2f}",
                "bits/weight": f"{bits_per_weight(model):.3f}",
                "time (s)": f"{seconds:.0f}",
            }
            rows.append(row)
            with RESULTS.open("a", encoding="utf-8") as f:
                f.write(table_lines([row], with_header=False))
            print(
                f"{config_name} {method}: ppl {value:.2f} ({value / fp_ppl:.2f}x fp) in {seconds:.0f} s",
                flush=True,
            )
            del model
    print()
    print_table(rows)


def table_lines(rows: list[dict[str, str]], with_header: bool) -> str:
    """Markdown table rows (with the header lines first when asked), one per line."""
    lines = (
        ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        if with_header
        else []
    )
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
