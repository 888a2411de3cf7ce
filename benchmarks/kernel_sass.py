"""Machine instructions per weight in the batch-1 GEMV's K loop, from sm_90 SASS, on any machine.

    python benchmarks/kernel_sass.py                      # the dispatcher's GEMV and the tune candidates
    python benchmarks/kernel_sass.py --bits 2 --cc 90 86

Each configuration is compiled ahead of time (:mod:`hfquant.kernels.aot`, the ptxas and nvdisasm the
triton wheel ships) and its K loop disassembled: the instructions of one pass of the loop over the
weights one thread holds in it (``BLOCK_N x BLOCK_K / (32 x num_warps)``). At batch 1 every weight
is read once, so the count per weight, times the weights of a Llama-7B block, bounds a block's time
from below wherever the kernel is instruction-bound: ``block weights x count / 32`` warp
instructions, issued at most 4 per clock per SM. The table gives that bound for an H100 SXM (132
SMs, 1.755 GHz boost) beside what a block reads at its memory bandwidth (3.35 TB/s), the other
bound. A static count, not a timing: it says which bound a configuration is up against and how
far a change of the loop moves it; benchmarks/gpu.py measures.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (before triton is imported)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the kernels compile with at run time

from _common import append_results, machine_line, print_table  # noqa: E402

from hfquant.kernels import aot  # noqa: E402
from hfquant.kernels.triton_matmul import GEMV, LaunchConfig  # noqa: E402

# A Llama-7B decoder block: q, k, v, o (4096 x 4096), gate and up (11008 x 4096), down (4096 x 11008).
BLOCK_WEIGHTS = 4 * 4096 * 4096 + 3 * 11008 * 4096
H100 = {"sms": 132, "clock_hz": 1.755e9, "bandwidth": 3.35e12}
_LINE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


def disassemble(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), "-c", str(path)], capture_output=True, text=True, check=True).stdout


def k_loop(sass: str) -> list[str]:
    """The opcodes of the smallest loop (a backward branch's target to the branch) of more than two
    instructions: the K loop (the other backward branch is the exit trap's jump to itself)."""
    labels: dict[str, int] = {}
    lines: list[str] = []
    for raw in sass.splitlines():
        text = raw.strip()
        if label := _LABEL.match(text):
            labels[label.group(1)] = len(lines)
        elif _LINE.match(text):
            lines.append(text)
    loops = []
    for end, text in enumerate(lines):
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), end + 1) <= end:
            loops.append(lines[labels[branch.group(1)] : end + 1])
    loops = [body for body in loops if len(body) > 2]
    if not loops:
        raise ValueError("no K loop found in the kernel's SASS")
    return [_LINE.match(text).group(1) for text in min(loops, key=len)]


def measure(config: LaunchConfig, bits: int, cc: int) -> dict[str, str]:
    spec = aot.KernelSpec(config, bits)
    compiled = aot.compile_kernel(spec, cc)
    ops = k_loop(disassemble(compiled.asm["cubin"]))
    mix = collections.Counter(op.split(".")[0] for op in ops)
    weights = config.block_n * config.block_k // (32 * config.num_warps)
    per_weight = len(ops) / weights
    issue_s = BLOCK_WEIGHTS * per_weight / 32 / (4 * H100["sms"] * H100["clock_hz"])
    memory_s = BLOCK_WEIGHTS * (bits + 32 / 64) / 8 / H100["bandwidth"]  # g64: a float16 scale and zero
    registers = aot.ptxas_resources(compiled.asm["ptx"], cc)["registers"]
    return {
        "config": config.name, "bits": str(bits), "sm": str(cc), "registers": str(registers),
        "weights / thread / step": str(weights), "SASS in K loop": str(len(ops)), "per weight": f"{per_weight:.2f}",
        "FFMA": str(mix["FFMA"]), "int to float": str(mix["I2FP"] + mix["I2F"]), "loads": str(mix["LDG"]),
        "issue floor, H100 block (us)": f"{issue_s * 1e6:.0f}", "memory floor (us)": f"{memory_s * 1e6:.0f}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--cc", type=int, nargs="+", default=[90])
    parser.add_argument("--default-only", action="store_true", help="the dispatcher's GEMV only, not the candidates")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu import CANDIDATES

    configs = [GEMV] + [c for c in map(lambda t: LaunchConfig(*t), CANDIDATES["decode"]) if c != GEMV]
    configs = configs[:1] if args.default_only else configs
    rows = []
    for config in configs:
        for bits in args.bits if config == GEMV else args.bits[:1]:
            for cc in args.cc:
                rows.append(measure(config, bits, cc))
                print(" | ".join(rows[-1].values()), flush=True)
    print_table(rows)
    if not args.no_record:
        append_results(
            rows,
            f"kernel_sass.py: instructions per weight in the batch-1 GEMV's K loop, {machine_line()}",
            "The dispatcher's GEMV at every bit width, the tune candidates at the first; static counts from "
            "the cubin (no GPU), bounds for one Llama-7B block on an H100 (see the script's docstring).",
        )


if __name__ == "__main__":
    main()
