"""The package's layering: solvers are pure torch, and loading a checkpoint imports no solver."""

import ast
import subprocess
import sys
from pathlib import Path

import hfquant

ALGORITHMS = Path(hfquant.__file__).parent / "algorithms"
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints" / "decoupled_kept"
STDLIB = {"__future__", "collections", "contextlib", "dataclasses", "math", "typing"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


def test_algorithms_import_only_torch_and_each_other():
    for path in sorted(ALGORITHMS.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in STDLIB or top == "torch" or name.startswith("hfquant.algorithms"), (path.name, name)


def test_corpora_sit_below_calibration():
    """Texts come from ``corpora``; ``calibration`` cuts them into windows: one way, no cycle."""
    assert "hfquant.calibration" not in _imports(ALGORITHMS.parent / "corpora.py")


def test_loading_a_checkpoint_imports_no_solver():
    code = (
        "import sys, hfquant\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(FIXTURE)!r})\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('hfquant'))))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "hfquant.formats.decoupled" in loaded
    solvers = [m for m in loaded if m.startswith(("hfquant.driver", "hfquant.calibration", "hfquant.task_data"))]
    solvers += [m for m in loaded if m.startswith("hfquant.algorithms.") and m != "hfquant.algorithms.grid"]
    assert solvers == []
