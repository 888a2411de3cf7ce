"""Peak resident memory of loading a checkpoint, each in a fresh process.

    python benchmarks/load_memory.py FOLDER [FOLDER ...]

For each folder: RSS after importing torch, transformers and hfquant (the baseline), peak RSS
after ``from_pretrained`` and reading every tensor once, and the bytes of the weight files. A loader that held two copies of the
weights would peak near baseline + 2 x size; shard-by-shard loading stays near baseline + 1 x size.
Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from _common import add_common_arguments, append_results, machine_line, print_table, setup

PROBE = """
import json, resource, sys
import torch, transformers, hfquant
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[2]))
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss_mb()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
for t in model.state_dict().values():  # touch every page, so lazily mapped weights count too
    t.sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline": base, "peak": peak, "after": rss_mb()}))
"""


def measure(folder: Path) -> dict[str, float]:
    """Load ``folder`` in a fresh Python with this process's torch thread count."""
    cmd = [sys.executable, "-c", PROBE, str(folder), str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    add_common_arguments(parser, windows=None)
    args = parser.parse_args()
    setup(args)
    rows = []
    for folder in args.folders:
        files = sorted(folder.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) / 2**20
        m = measure(folder)
        rows.append(
            {
                "checkpoint": folder.name,
                "files": len(files),
                "weights (MiB)": f"{size:.0f}",
                "RSS after imports (MiB)": f"{m['baseline']:.0f}",
                "peak RSS (MiB)": f"{m['peak']:.0f}",
                "peak - imports (MiB)": f"{m['peak'] - m['baseline']:.0f}",
                "x weights": f"{(m['peak'] - m['baseline']) / size:.2f}",
            }
        )
    print_table(rows)
    title = "load_memory.py: peak RSS of loading a checkpoint, each load in a fresh process"
    append_results(rows, title=title, text=f"{machine_line()}.")


if __name__ == "__main__":
    main()
