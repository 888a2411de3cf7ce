"""Every stored format on every tiny architecture: quantize at load, save, reload bit-identical,
and bits per weight equal to the bytes the quantized layers take in the file."""

import pytest
import torch
from helpers import TINY_CALIBRATION, input_ids
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.pytorch_utils import Conv1D

from hfquant import HfQuantConfig
from hfquant.export import bits_per_weight, save_quantized
from hfquant.formats import FORMATS, QuantizedLinear, format_for

# One row per stored format and grid kind; each one runs on every architecture of conftest.TINY.
SETTINGS = {
    "decoupled-w2-g64": dict(bits=2, group_size=64, method="rtn"),
    "decoupled-w3-g32": dict(bits=3, group_size=32, method="rtn"),
    "decoupled-w4-g128": dict(bits=4, group_size=128, method="rtn"),
    "decoupled-w2-row": dict(bits=2, group_size=-1, method="rtn"),
    "decoupled-w3-tensor": dict(bits=3, group_size=0, method="rtn"),
    "decoupled-kept": dict(bits=2, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude"),
    "split-g32": dict(bits=2, group_size=32, method="rtn", split_clusters=3),
    "split-tensor": dict(bits=2, group_size=0, method="rtn", split_clusters=3),
    "power-of-two": dict(bits=3, method="inq", blockwise_epochs=1, **TINY_CALIBRATION),
    # the tiny qwen2 MLP is 200 wide: no GGUF block type holds its down_proj rows
    "gguf-q4_1": dict(gguf_type="q4_1", method="decoupleq", decoupleq_iters=1, blockwise_epochs=1,
                      modules_to_not_convert=["lm_head", "down_proj"], **TINY_CALIBRATION),  # fmt: skip
}


def test_every_format_is_covered():
    assert {format_for(HfQuantConfig(**s)).name for s in SETTINGS.values()} == set(FORMATS)


@pytest.mark.parametrize("name", SETTINGS)
def test_save_reload_bit_identical(tiny_model_dir, tmp_path, name):
    config = HfQuantConfig(**SETTINGS[name])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    per_block = 7 - ("down_proj" in config.modules_to_not_convert)  # q, k, v, o, gate, up, down
    assert len(layers) == per_block * model.config.num_hidden_layers
    assert all(type(m) is format_for(config) for m in layers.values())
    assert not isinstance(model.lm_head, QuantizedLinear)
    with torch.no_grad():
        before = model(input_ids()).logits
    out = save_quantized(model, tmp_path / "q")
    assert "model.safetensors" in {p.name for p in out.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in out.iterdir())

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(before, reloaded(input_ids()).logits)
    state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    # Bits per weight count exactly the bytes the quantized layers' tensors take in the file.
    stored = load_file(out / "model.safetensors")
    quantized_bytes = sum(
        t.numel() * t.element_size()
        for key, t in stored.items()
        if key.rpartition(".")[0] in layers and not key.endswith(".bias")
    )
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    assert bits_per_weight(reloaded) == pytest.approx(quantized_bytes * 8 / n_weights)
    assert config.bits < bits_per_weight(reloaded)


def test_quantized_layers_differ_from_float(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ref = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=HfQuantConfig(bits=4, method="rtn"))
    w_hat = q.model.layers[0].mlp.down_proj.dequantize()
    rel = float((w_hat - ref).norm() / ref.norm())
    assert 0.0 < rel < 0.15


def test_gpt2_conv1d_layers_quantized_saved_and_reloaded(tmp_path):
    """GPT-2 keeps its linears as transformers' Conv1D (weight stored [in, out]): they are quantized
    as the nn.Linear computing the same, and reload (GPT-2's weight init reaches into c_proj.weight)."""
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    fp.save_pretrained(tmp_path / "fp")
    config = HfQuantConfig(bits=4, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=1,
                           e2e_epochs=0, **TINY_CALIBRATION)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers == {f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        before, reference = model(input_ids()).logits, fp(input_ids()).logits
    assert float((before - reference).norm() / reference.norm()) < 0.1
    reloaded = AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, before)
