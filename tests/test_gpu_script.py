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


def test_kernel_sass_counts_the_gemv_loop(tmp_path):
    """benchmarks/kernel_sass.py compiles the dispatcher's GEMV for sm_90 and finds its K loop: at
    W2 each of the loop's weights takes at least its multiply-add, and a few more instructions."""
    script = SCRIPT.with_name("kernel_sass.py")
    result = subprocess.run(
        [sys.executable, str(script), "--bits", "2", "--default-only", "--no-record"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("gemv 1x16x512"))
    cells = row.split(" | ")
    ffma, weights, per_weight = int(cells[7]), int(cells[4]), float(cells[6])
    assert ffma >= weights  # one multiply-add per weight at least
    assert 1.0 < per_weight < 20.0


def test_a_second_run_takes_the_first_runs_decode_choice(tmp_path):
    """The GPU session runs the script twice (each call has a fresh folder): ``--decode-config`` hands
    the second run the GEMV the first run's tune chose, which its sections then measure."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke", "--sections", "layers",
         "--decode-config", "1", "8", "1024", "4", "3", "1", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "batch 1 with the tuned gemv 1x8x1024 w4 s3 pf" in (tmp_path / "layers.md").read_text()
