"""benchmarks/gpu.py (issue 16 part B, one run on a GPU machine) runs end to end in ``--smoke`` mode:
CPU, tiny shapes, every section in one process, so a GPU session does not find a crash first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_gpu_script_smoke_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = (tmp_path / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    for section in ("env", "correctness", "generate", "tune", "layers", "e2e", "graph", "compile", "quantize"):
        assert f"- {section} (ok," in summary
        assert (tmp_path / f"{section}.md").read_text()
    assert "| hessian pass |" in (tmp_path / "results.md").read_text()


def test_a_run_forgets_the_sections_of_an_earlier_run(tmp_path):
    """A run without ``tune`` must not apply a decode configuration an earlier run tuned into the folder."""
    (tmp_path / "tune.json").write_text('{"data": {"decode_choice": ["gemv", 1, 8, 1024]}}')
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke", "--sections", "env"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert not (tmp_path / "tune.json").exists()
    assert (tmp_path / "env.json").exists()
