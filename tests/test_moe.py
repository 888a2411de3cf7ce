"""Mixture-of-experts models: the fused 3D expert weights are split into one linear per expert
(hfquant.nn.experts), quantized like every other linear, saved and reloaded."""

import logging

import pytest
import torch
from helpers import MOE, TINY_CALIBRATION, input_ids, moe_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.export import bits_per_weight, save_quantized
from hfquant.export.gguf import GGUFExportError, save_gguf
from hfquant.formats import QuantizedLinear
from hfquant.nn.experts import ExpertLinears, is_fused_experts, unfuse_experts


def fused_experts(model) -> list[str]:
    return [name for name, m in model.named_modules() if is_fused_experts(m)]


@pytest.mark.parametrize("arch", sorted(MOE))
def test_expert_linears_compute_what_the_fused_experts_compute(arch):
    model = moe_model(arch)
    names = fused_experts(model)
    assert names
    with torch.no_grad():
        before = model(input_ids()).logits
    assert unfuse_experts(model, ["lm_head"]) == names
    assert not fused_experts(model)
    assert all(isinstance(model.get_submodule(n), ExpertLinears) for n in names)
    assert not any(p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_quantized_saved_and_reloaded(arch, tmp_path):
    fp = moe_model(arch)
    fp.save_pretrained(tmp_path / "fp")
    config = HfQuantConfig(bits=4, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=1,
                           e2e_epochs=0, **TINY_CALIBRATION)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # per block: q, k, v, o and two linears for each of the 4 experts; the router stays in full precision
    assert len(layers) == (4 + 2 * 4) * 2
    assert sum(".experts." in n for n in layers) == 2 * 4 * 2
    assert not any(p.dim() == 3 for p in model.parameters())
    # every expert and attention weight is stored at 4 bits (plus a float16 scale and zero per 32)
    expert_weights = sum(p.numel() for n, p in fp.named_parameters() if ".experts." in n)
    attention_weights = sum(p.numel() for n, p in fp.named_parameters() if "self_attn" in n and n.endswith("proj.weight"))
    assert sum(m.in_features * m.out_features for m in layers.values()) == expert_weights + attention_weights
    assert bits_per_weight(model) == pytest.approx(4 + 2 * 16 / 32)
    with torch.no_grad():
        before = model(input_ids()).logits

    out = save_quantized(model, tmp_path / "q")
    keys = load_file(out / "model.safetensors")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    assert f"model.layers.1.{moe}.experts.down.3.qweight" in keys
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded.model.layers[1].mlp.experts.down[3], DecoupledLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, before)


def test_skipped_experts_stay_fused_through_save_and_reload(tmp_path):
    moe_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    config = HfQuantConfig(bits=4, group_size=32, method="rtn", modules_to_not_convert=["lm_head", "experts"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    assert len(fused_experts(model)) == 2
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 4 * 2
    with torch.no_grad():
        before = model(input_ids()).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    assert len(fused_experts(reloaded)) == 2
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, before)


def test_experts_the_calibration_never_reaches_keep_their_weights(tmp_path, caplog):
    """32 experts, one per token, 128 calibration tokens: some experts get none. Their linears are solved
    on the weights alone (identity Hessian); a zero Hessian would make GPTQ zero every weight."""
    fp = moe_model("mixtral", experts=32, k=1)
    fp.save_pretrained(tmp_path / "fp")
    config = HfQuantConfig(bits=4, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=0,
                           e2e_epochs=0, **TINY_CALIBRATION)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert "saw no calibration token" in caplog.text
    for index, layer in enumerate(model.model.layers):
        weights = fp.model.layers[index].mlp.experts.down_proj.detach()
        for e, linear in enumerate(layer.mlp.experts.down):
            rel = (linear.dequantize() - weights[e]).norm() / weights[e].norm()
            assert float(rel) < 0.2, (index, e, float(rel))


def test_gguf_export_refuses_experts_it_cannot_lay_out(tmp_path):
    """A norm after each expert (MuseSpark's ``post_expert_norm``) has no GGUF tensor: refused before
    anything is written. (tests/test_gguf.py exports Qwen3-MoE, Mixtral, Qwen2-MoE, DeepSeek-V3 and gpt-oss.)"""
    moe_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=HfQuantConfig(bits=4, method="rtn"))
    model.model.layers[1].mlp.experts.has_post_expert_norm = True
    with pytest.raises(GGUFExportError, match=r"experts of model.layers.1.mlp.experts .* not supported: a norm"):
        save_gguf(model, None, tmp_path / "model.gguf", type="q4_0")
    assert list(tmp_path.iterdir()) == [tmp_path / "fp"]


def test_interrupted_moe_quantization_resumes(tmp_path):
    from hfquant.driver import quantize_model

    moe_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    settings = dict(bits=2, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=1, e2e_epochs=0,
                    **TINY_CALIBRATION)  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=HfQuantConfig(**settings))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")

    def crash(*_args):
        raise KeyboardInterrupt

    model.model.layers[1].register_forward_pre_hook(crash)
    work = HfQuantConfig(**settings, work_dir=str(tmp_path / "work"))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, work, progress=False)
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=work)
    assert resumed.hf_quantizer.report.resumed_blocks == 1
    with torch.no_grad():
        assert torch.equal(resumed(input_ids()).logits, reference(input_ids()).logits)


class _Routed(torch.nn.Module):
    """Experts 0 and 1 get different tokens, expert 2 none; ``alone`` is never called and has no siblings."""

    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
        self.alone = torch.nn.Linear(6, 6)

    def forward(self, hidden):
        return torch.cat([self.experts[0](hidden[:, :3]), self.experts[1](hidden[:, 3:])], dim=1)


def test_an_unreached_expert_gets_the_hessian_of_its_siblings_tokens():
    from hfquant.driver.blocks import full_precision_pass

    block = _Routed()
    hidden = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(0))
    linears = {**{f"experts.{e}": m for e, m in enumerate(block.experts)}, "alone": block.alone}
    hessians, _ = full_precision_pass(block, linears, [(hidden, {})])
    x = hidden.reshape(-1, 6)
    torch.testing.assert_close(hessians["experts.2"], x.T @ x / len(x))  # every token reached 0 or 1
    torch.testing.assert_close(hessians["alone"], torch.eye(6))
    first = hidden[:, :3].reshape(-1, 6)
    torch.testing.assert_close(hessians["experts.0"], first.T @ first / len(first))


def test_calibrating_all_experts_keeps_the_output_and_shows_every_token_to_every_expert():
    """``all_experts_calibrated``: the MoE layer computes what it computes routed (the block's targets
    do not change), while each expert's linears see every token, routed or not."""
    from hfquant.driver.blocks import full_precision_pass
    from hfquant.nn.experts import all_experts_calibrated

    model = moe_model("mixtral", experts=8, k=2)
    unfuse_experts(model, ["lm_head"])
    block = model.model.layers[0]
    experts = block.mlp.experts
    with torch.no_grad():
        routed = model(input_ids()).logits
        with all_experts_calibrated(model):
            assert experts.calibrate_all
            torch.testing.assert_close(model(input_ids()).logits, routed, rtol=1e-5, atol=1e-5)
    assert not experts.calibrate_all  # the context restores routing
    hidden = model.model.embed_tokens(input_ids()).detach()
    position_ids = torch.arange(hidden.shape[1])[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids), "position_ids": position_ids}
    linears = {f"mlp.experts.gate_up.{e}": experts.gate_up[e] for e in range(8)}
    routed_h, routed_out = full_precision_pass(block, linears, [(hidden, kwargs)])
    all_h, all_out = full_precision_pass(block, linears, [(hidden, kwargs)], all_experts=True)
    torch.testing.assert_close(all_out[0], routed_out[0], rtol=1e-5, atol=1e-5)
    # every expert's gate_up input is then the same: all tokens' normalized hidden states
    first = all_h["mlp.experts.gate_up.0"]
    for e in range(1, 8):
        torch.testing.assert_close(all_h[f"mlp.experts.gate_up.{e}"], first)
    assert not all(torch.allclose(routed_h[f"mlp.experts.gate_up.{e}"], first) for e in range(8))


def test_calibrate_all_experts_quantizes_an_moe_model_and_is_checked(tmp_path, caplog):
    """32 experts, one per token: with every expert calibrated on every token, none is left unreached."""
    moe_model("mixtral", experts=32, k=1).save_pretrained(tmp_path / "fp")
    config = HfQuantConfig(bits=4, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=1,
                           e2e_epochs=0, calibrate_all_experts=True, **TINY_CALIBRATION)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    assert "saw no calibration token" not in caplog.text
    assert sum(".experts." in n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)) == 2 * 32 * 2
    assert model.config.quantization_config.calibrate_all_experts is True
    reloaded = AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    assert reloaded.config.quantization_config.calibrate_all_experts is True
    assert "every MoE expert calibrated on every token" in (tmp_path / "q" / "README.md").read_text()
    with pytest.raises(ValueError, match="calibrate_all_experts must be True or False, got 'yes'"):
        HfQuantConfig(calibrate_all_experts="yes")
