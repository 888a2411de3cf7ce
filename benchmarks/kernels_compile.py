"""Registers, spills and shared memory of every Triton kernel configuration, compiled ahead of time.

    python benchmarks/kernels_compile.py            # sm_80, 86, 89, 90; no GPU needed
    python benchmarks/kernels_compile.py --cc 90    # one target

Compiles what tests/test_kernels_compile.py compiles (hfquant.kernels.aot: every launch
configuration of the dispatcher at 2/3/4 bits) and prints per configuration what decides
occupancy: registers per thread (255 is the ceiling; more spill to local memory), spilled bytes,
shared memory per program against the target's limit. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys

import triton
from _common import add_common_arguments, append_results, machine_line, print_table, setup

from hfquant.kernels import aot


def row(record: dict) -> dict[str, object]:
    spec = record["spec"]
    layout = [spec["dtype"], f"GS{spec['group_size']}"]
    layout += [] if spec["has_bias"] else ["no bias"]
    layout += [] if spec["aligned"] else ["unaligned"]
    config, _, _ = record["name"].partition(" W")
    out = {"target": f"sm_{record['cc']}", "config": config, "bits": spec["bits"], "layout": " ".join(layout)}
    if "error" in record:
        return out | {"registers": "ERROR", "spills (B)": "", "shared (KiB)": "", "limit (KiB)": ""}
    return out | {
        "registers": record["registers"],
        "spills (B)": f"{record['spill_stores']}/{record['spill_loads']}",
        "shared (KiB)": f"{record['shared'] / 1024:.1f}",
        "limit (KiB)": record["max_shared"] // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=list(aot.TARGETS), help="compute capabilities")
    add_common_arguments(parser, windows=None)
    args = parser.parse_args()
    setup(args)
    jobs = [(s, cc) for s, cc in aot.specs() if cc in args.cc]
    records = sorted(aot.compile_all(jobs), key=lambda r: (r["name"], r["cc"]))
    for r in records:
        if "error" in r:
            print(f"sm_{r['cc']} {r['name']} failed:\n{r['error']}", file=sys.stderr)
    rows = [row(r) for r in records]
    print_table(rows)
    append_results(
        rows,
        title=f"kernels_compile.py: ahead-of-time compile, triton {triton.__version__}, {machine_line()} (no GPU)",
        text=(
            "Every launch configuration of `triton_matmul.LAUNCH_CONFIGS` (gemv BLOCK_M=1 x BLOCK_N x BLOCK_K; "
            "gemm BLOCK_M x BLOCK_N x BLOCK_K; w = num_warps, s = num_stages). Registers per thread and spill "
            "stores/loads from `ptxas -v`; shared memory per program from the compiled metadata, against the "
            "largest a program may use on the target."
        ),
    )
    sys.exit(any("error" in r for r in records))


if __name__ == "__main__":
    main()
