"""The scripts in examples/ run as documented (on a tiny model, so they stay fast)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quantize_save_then_load_chat_and_evaluate(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "w2"
    printed = run("quantize_and_save.py", str(tiny_chat_model_dir), "--out", str(out), "--method", "gptq",
                  "--nsamples", "4", "--seqlen", "32")
    assert "bits per weight" in printed
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    # run() checks the exit status; a random tiny model may answer EOS at once, so the reply's text is
    # not checked here (the real model's answer is: tests/test_cli.py, "Paris").
    run("load_and_chat.py", str(out), "Hello?")
    assert "python-docs perplexity:" in run("evaluate.py", str(out), "1")
    assert "hfquant_facts_loglik perplexity:" in run("lm_eval_scores.py", str(out), "--limit", "2")


def test_push_to_hub_example(tiny_chat_model_dir, tmp_path, monkeypatch, capsys, fake_hub):
    """Run in-process so that the Hub can be faked at the network boundary (``HfApi``)."""
    import runpy

    run("quantize_and_save.py", str(tiny_chat_model_dir), "--out", str(tmp_path / "w2"), "--method", "rtn")
    monkeypatch.setattr(sys, "argv", ["push_to_hub.py", str(tmp_path / "w2"), "me/w2", "--private"])
    runpy.run_path(str(EXAMPLES / "push_to_hub.py"), run_name="__main__")
    assert "uploaded" in capsys.readouterr().out
    assert fake_hub.calls[0] == ("create_repo", {"repo_id": "me/w2", "private": True, "token": None, "exist_ok": True})
    assert {"README.md", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in (tmp_path / "remote/me/w2").iterdir()}


def test_finetune_lora_example(tiny_chat_model_dir, tmp_path):
    """LoRA through PEFT and the Trainer on a saved W2 checkpoint (quantized here with RTN: fast), the
    adapters started at the quantization error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant import HfQuantConfig
    from hfquant.export import save_quantized

    model = AutoModelForCausalLM.from_pretrained(
        tiny_chat_model_dir, quantization_config=HfQuantConfig(bits=2, group_size=64, method="rtn")
    )
    save_quantized(model, tmp_path / "w2", AutoTokenizer.from_pretrained(tiny_chat_model_dir))
    printed = run(
        "finetune_lora.py", str(tmp_path / "w2"), "--out", str(tmp_path / "adapter"), "--steps", "3",
        "--init-from", str(tiny_chat_model_dir),
    )  # fmt: skip
    assert "adapters start at the quantization error" in printed
    assert "training loss:" in printed and "identical logits" in printed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
