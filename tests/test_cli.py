"""`hfquant quantize | eval | chat` end to end on a tiny model."""

import subprocess
import sys

import pytest

from hfquant.cli import build_parser, main


def hfquant(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfquant.cli", *args], input=stdin, capture_output=True, text=True, timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def quantized_dir(tiny_chat_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    result = hfquant("quantize", str(tiny_chat_model_dir), "--bits", "3", "--group-size", "32", "--method",
                     "decoupleq", "--nsamples", "4", "--seqlen", "32", "--blockwise-epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits/weight" in result.stdout and "mse after block-wise" in result.stdout
    assert "quantization time by stage: calibration " in result.stdout and "block-wise " in result.stdout
    return out


def test_quantize_writes_checkpoint(quantized_dir):
    assert (quantized_dir / "model.safetensors").exists()
    assert (quantized_dir / "tokenizer_config.json").exists()
    assert not [p for p in quantized_dir.parent.iterdir() if p.name.startswith(".")]


def test_eval_prints_perplexity(quantized_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = hfquant("eval", str(quantized_dir), "--text", str(text), "--seqlen", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout


def test_chat_answers_a_piped_question(quantized_dir):
    result = hfquant("chat", str(quantized_dir), "--device", "cpu", "--max-new-tokens", "8", stdin="Hello?\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout  # a random tiny model may only emit whitespace: the path is what is tested here


def test_chat_default_model_answers_through_a_pipe():
    result = hfquant("chat", "--device", "cpu", "--max-new-tokens", "24", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout


def test_bad_settings_give_a_clear_error(tiny_chat_model_dir, tmp_path, capsys):
    code = main(["quantize", str(tiny_chat_model_dir), "--bits", "5", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "bits must be one of [2, 3, 4], got 5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parser_defaults():
    args = build_parser().parse_args(["quantize", "--out", "d"])
    assert (args.model, args.bits, args.group_size, args.method) == (None, 2, 64, "decoupleq")
    assert args.split_clusters == 0
    args = build_parser().parse_args(["quantize", "--method", "inq", "--split-clusters", "3", "--out", "d"])
    assert (args.method, args.split_clusters) == ("inq", 3)


def test_split_quantize_from_the_command_line(tiny_chat_model_dir, tmp_path, capsys):
    out = tmp_path / "split"
    code = main(["quantize", str(tiny_chat_model_dir), "--method", "rtn", "--split-clusters", "3",
                 "--group-size", "0", "--out", str(out)])
    assert code == 0
    assert "rtn + split 3" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()
    code = main(["quantize", str(tiny_chat_model_dir), "--method", "inq", "--split-clusters", "3",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "split_clusters applies to method rtn, gptq or decoupleq" in capsys.readouterr().err


def test_dynamic_rules_from_the_command_line(tiny_chat_model_dir, tmp_path, capsys):
    """``--dynamic`` takes GPTQModel-style rules as JSON; bad JSON is refused by name."""
    import json

    out = tmp_path / "dyn"
    rules = '{"-:model[.]layers[.]0[.]self_attn[.]q_proj": {}, ".*down_proj": {"bits": 4, "group_size": 32}}'
    code = main(["quantize", str(tiny_chat_model_dir), "--method", "rtn", "--bits", "2", "--dynamic", rules,
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert saved == [["-:model[.]layers[.]0[.]self_attn[.]q_proj", {}], [".*down_proj", {"bits": 4, "group_size": 32}]]
    code = main(["quantize", str(tiny_chat_model_dir), "--dynamic", "{down_proj: 4}", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--dynamic must be a JSON object" in capsys.readouterr().err


def test_eval_defaults_to_the_heldout_domains(quantized_dir):
    result = hfquant("eval", str(quantized_dir), "--seqlen", "64", "--max-windows", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "domain" in line and "|" in line]
    domains = [line.split("|")[2].strip() for line in lines[1:]]
    assert domains == ["python-docs", "fortunes", "python-code", "bookofmormon"]
    assert all("out of domain" in line for line in lines[1:4]) and "in domain" in lines[4]
