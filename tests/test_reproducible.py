"""Same model, config and seed give the same checkpoint; an interrupted quantization with a
``work_dir`` resumes to the checkpoint an uninterrupted run writes, and refuses another model or
other settings."""

import json

import pytest
import torch
from helpers import TINY_CALIBRATION, TINY_TEXTS, build_tiny
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.driver import quantize_model
from hfquant.export import save_quantized

FAST = dict(decoupleq_iters=1, blockwise_epochs=1, **TINY_CALIBRATION)

METHODS = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq", **FAST),
    "decoupleq": dict(method="decoupleq", **FAST),
    "inq": dict(method="inq", bits=3, **FAST),
    "splitquant": dict(method="gptq", split_clusters=3, **FAST),
    "tacq": dict(method="gptq", kept_fraction=0.01, task_dataset=TINY_TEXTS, **FAST),
}


def checkpoint(folder):
    """Tensors, safetensors metadata and config.json of a saved checkpoint (contents, not bytes:
    the header's key order may differ from save to save)."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        metadata = f.metadata()
    return tensors, metadata, json.loads((folder / "config.json").read_text())


def assert_same(a, b):
    tensors_a, metadata_a, config_a = checkpoint(a)
    tensors_b, metadata_b, config_b = checkpoint(b)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert tensors_a[key].dtype == tensors_b[key].dtype and torch.equal(tensors_a[key], tensors_b[key]), key
    assert metadata_a == metadata_b
    assert config_a == config_b


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_checkpoint(tiny_llama_dir, tmp_path, method):
    config = {"bits": 2, "group_size": 32, **METHODS[method]}
    for run in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=HfQuantConfig(**config))
        save_quantized(model, tmp_path / run)
    assert_same(tmp_path / "a", tmp_path / "b")


class Interrupted(Exception):
    """Raised from a forward hook: stands for a crash or Ctrl-C in the middle of quantizing."""


def test_interrupted_quantization_resumes_to_the_same_checkpoint(tmp_path):
    base = build_tiny("mistral", tmp_path / "base")  # 3 decoder blocks
    # dynamic rules: the finished blocks are restored at each layer's own settings
    rules = {"-:model[.]layers[.]1[.]self_attn[.]q_proj": {}, ".*down_proj": {"bits": 4, "group_size": 64}}
    settings = dict(
        bits=2, group_size=32, method="decoupleq", kept_fraction=0.01, saliency="magnitude", dynamic=rules, **FAST
    )
    work = tmp_path / "work"

    def config(**overrides):
        return HfQuantConfig(**{**settings, **overrides})

    reference = AutoModelForCausalLM.from_pretrained(base, quantization_config=config(), dtype=torch.float32)
    save_quantized(reference, tmp_path / "reference")

    # Interrupted when block 2 starts: blocks 0 and 1 are finished and saved.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def crash(*_args):
        raise Interrupted

    model.model.layers[2].register_forward_pre_hook(crash)
    with pytest.raises(Interrupted):
        quantize_model(model, config(work_dir=work), progress=False)
    assert sorted(p.name for p in work.iterdir()) == [
        "block_0000.safetensors",
        "block_0001.safetensors",
        "hidden.safetensors",
        "settings.json",
    ]

    resumed = AutoModelForCausalLM.from_pretrained(base, quantization_config=config(work_dir=work), dtype=torch.float32)
    report = resumed.hf_quantizer.report
    assert report.resumed_blocks == 2 and [b.index for b in report.blocks] == [0, 1, 2]
    assert resumed.model.layers[1].mlp.down_proj.bits == 4 and resumed.model.layers[1].self_attn.k_proj.bits == 2
    save_quantized(resumed, tmp_path / "resumed")
    assert_same(tmp_path / "reference", tmp_path / "resumed")
    assert "work_dir" not in json.loads((tmp_path / "resumed" / "config.json").read_text())["quantization_config"]

    # Other settings, or another model, are refused before any block is touched.
    with pytest.raises(ValueError, match=r"other settings or another model \(bits=2 there, 3 now"):
        AutoModelForCausalLM.from_pretrained(base, quantization_config=config(bits=3, work_dir=work))
    other = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        other.model.embed_tokens.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"\(model: different\)"):
        quantize_model(other, config(work_dir=work), progress=False)
