"""Peak resident memory of loading a checkpoint, each in a fresh process.

    python benchmarks/load_memory.py FOLDER [FOLDER ...]

For each folder: RSS after importing torch, transformers and hfquant (the baseline), peak RSS
after ``from_pretrained`` and reading every tensor once, and the bytes of the weight files. A loader that held two copies of the
weights would peak near baseline + 2 x size; shard-by-shard loading stays near baseline + 1 x size.
Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from hfquant.cli import print_table

RESULTS = Path(__file__).with_name("RESULTS.md")

PROBE = """
import json, resource, sys
import torch, transformers, hfquant
from transformers import AutoModelForCausalLM
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
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
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
    table = print_table(rows)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(
            f"\n## load_memory.py, {datetime.date.today()}: {platform.machine()} CPU, each load in a fresh process\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
