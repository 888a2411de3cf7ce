"""A saved hfquant checkpoint loads correctly in a Python that never runs ``import hfquant``.

``hfquant-autoload.pth`` (installed by ``pip install -e .`` and by the wheel, see setup.py) runs
``_hfquant_autoload`` at start-up, which registers the quantizer once transformers'
``modeling_utils`` has loaded. Each subprocess here is a fresh Python, as ``lm_eval --model hf``,
``transformers.pipeline`` or a training script would be.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hfquant.tasks import TASKS_DIR

CHECKPOINTS = Path(__file__).parent / "fixtures" / "checkpoints"
FIXTURES = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "model.safetensors").is_file())


def python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the venv's, with its .pth files) in ``tmp_path``."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_bare_python_runs_the_hook_and_imports_neither_torch_nor_transformers(tmp_path):
    result = python(
        """
        import json, sys
        names = ("_hfquant_autoload", "hfquant", "torch", "transformers")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in names)))
        """,
        tmp_path,
    )
    loaded = json.loads(result.stdout)
    assert loaded == ["_hfquant_autoload"], "hfquant-autoload.pth is not installed: run `make install` (pip install -e .)"


@pytest.fixture(scope="module")
def fresh_python_outputs(quantized_chat_dir, tmp_path_factory):
    """One fresh Python (never importing hfquant) loads every stored format with ``from_pretrained``,
    the chat checkpoint with ``pipeline``, and scores it with ``lm_eval``'s ``hf`` model."""
    tmp = tmp_path_factory.mktemp("fresh")
    python(
        f"""
        import json, sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, pipeline
        import lm_eval
        from lm_eval.tasks import TaskManager

        logits = {{}}
        for name in {FIXTURES!r}:
            folder = {str(CHECKPOINTS)!r} + "/" + name
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                logits[name] = model(load_file(folder + "/expected.safetensors")["input_ids"]).logits
        pipe = pipeline("text-generation", model={str(quantized_chat_dir)!r}, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            logits["pipeline"] = pipe.model(torch.arange(1, 33).unsqueeze(0)).logits
        save_file(logits, "logits.safetensors")
        results = lm_eval.simple_evaluate(
            model="hf", model_args={{"pretrained": {str(quantized_chat_dir)!r}, "device": "cpu", "dtype": "float32"}},
            tasks=["hfquant_facts_loglik"], limit=4, log_samples=False, bootstrap_iters=0,
            task_manager=TaskManager(include_path={str(TASKS_DIR)!r}, include_defaults=False),
        )
        json.dump({{"results": results["results"], "pipeline_module": type(pipe.model.model.layers[0].mlp.up_proj).__module__,
                    "imported_by_hook": "hfquant" in sys.modules}}, open("out.json", "w"))
        """,
        tmp,
    )
    return load_file(tmp / "logits.safetensors"), json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("name", FIXTURES)
def test_from_pretrained_without_import_gives_bit_identical_logits(fresh_python_outputs, name):
    folder = CHECKPOINTS / name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(load_file(folder / "expected.safetensors")["input_ids"]).logits
    assert torch.equal(fresh_python_outputs[0][name], expected)


def test_pipeline_without_import_loads_the_quantized_model(fresh_python_outputs, quantized_chat_dir):
    logits, out = fresh_python_outputs
    assert out["imported_by_hook"] and out["pipeline_module"].startswith("hfquant.")
    model = AutoModelForCausalLM.from_pretrained(quantized_chat_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(logits["pipeline"], model(torch.arange(1, 33).unsqueeze(0)).logits)


def test_lm_eval_hf_model_without_import_scores_like_the_loaded_model(fresh_python_outputs, quantized_chat_dir):
    from transformers import AutoTokenizer

    from hfquant import harness

    model = AutoModelForCausalLM.from_pretrained(quantized_chat_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(quantized_chat_dir)
    ours = harness.run_tasks(model, tokenizer, ["hfquant_facts_loglik"], limit=4)["results"]
    theirs = fresh_python_outputs[1]["results"]
    assert theirs["hfquant_facts_loglik"]["perplexity,none"] == pytest.approx(ours["hfquant_facts_loglik"]["perplexity,none"])


def test_a_broken_hfquant_is_a_loud_warning_not_a_broken_transformers(tmp_path):
    """If ``import hfquant`` fails, transformers still imports and says how to fix it."""
    (tmp_path / "hfquant").mkdir()
    (tmp_path / "hfquant" / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    result = python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import transformers.modeling_utils
        print([str(w.message) for w in caught if "hfquant" in str(w.message)])
        """,
        tmp_path,
        PYTHONPATH=str(tmp_path),
    )
    assert "simulated broken install" in result.stdout and "pip install hfquant" in result.stdout
