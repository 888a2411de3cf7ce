"""Quantize at load, save, reload bit-identical; refuse checkpoints that do not match their config."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.export import CheckpointError, bits_per_weight, save_quantized


def _ids(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 32), (4, 128), (2, -1), (3, 0)])
def test_quantize_save_reload_bit_identical(tiny_model_dir, tmp_path, bits, group_size):
    config = HfQuantConfig(bits=bits, group_size=group_size, method="rtn")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    linears = [m for m in model.modules() if isinstance(m, DecoupledLinear)]
    n_blocks = model.config.num_hidden_layers
    assert len(linears) == 7 * n_blocks  # q, k, v, o, gate, up, down in every block
    assert not isinstance(model.lm_head, DecoupledLinear)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    with torch.no_grad():
        before = model(_ids()).logits
    save_quantized(model, tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.safetensors" in files and not any(
        f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        after = reloaded(_ids()).logits
    assert torch.equal(before, after)
    assert reloaded.config.quantization_config.bits == bits
    # Bits per weight equals the bytes the quantized tensors really take in the file.
    stored = load_file(tmp_path / "q" / "model.safetensors")
    quantized_bytes = sum(
        t.numel() * t.element_size()
        for k, t in stored.items()
        if k.endswith((".qweight", ".scales", ".zeros"))
    )
    n_weights = sum(m.in_features * m.out_features for m in linears)
    assert bits_per_weight(reloaded) == pytest.approx(quantized_bytes * 8 / n_weights)
    assert bits < bits_per_weight(reloaded) < bits + 1.5


def test_quantized_layers_differ_from_float(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ref = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    q = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(bits=4, method="rtn")
    )
    w_hat = q.model.layers[0].mlp.down_proj.dequantize()
    rel = float((w_hat - ref).norm() / ref.norm())
    assert 0.0 < rel < 0.15


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(bits=2, group_size=32, method="rtn")
    )
    return save_quantized(model, tmp_path / "q")


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def test_truncated_file_refused(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors is truncated: expected \d+ bytes, found \d+"
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_corrupt_header_refused(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_scales_refused(saved):
    _rewrite(saved, lambda t, m: t.pop("model.layers.1.self_attn.v_proj.scales"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.self_attn.v_proj.scales"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_wrong_shape_refused(saved):
    def edit(tensors, _):
        tensors["model.layers.0.mlp.up_proj.zeros"] = tensors["model.layers.0.mlp.up_proj.zeros"][
            :, :1
        ].clone()

    _rewrite(saved, edit)
    with pytest.raises(
        CheckpointError, match=r"tensor model.layers.0.mlp.up_proj.zeros has shape \[160, 1\], expected"
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_wrong_bit_width_refused(saved):
    # config.json says 3 bits, the packed integers were written for 2.
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with bits=2 but config.json says bits=3"):
        AutoModelForCausalLM.from_pretrained(saved)
    # Without the metadata guard the shapes still give it away, naming the tensor.
    _rewrite(saved, lambda t, m: m.pop("hfquant_bits"))
    with pytest.raises(CheckpointError, match=r"qweight has shape .* expected .* for bits=3"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_newer_format_refused(saved):
    # A writer that did not record its version: the message still says how to upgrade.
    _rewrite(saved, lambda t, m: (m.update(hfquant_format_version="7"), m.pop("hfquant_version")))
    with pytest.raises(CheckpointError, match="format version 7 is newer.*pip install -U hfquant"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_pickle_weights_refused(saved, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(saved, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)


def test_interrupted_save_keeps_previous_folder(saved, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(saved)
    before = (saved / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []
