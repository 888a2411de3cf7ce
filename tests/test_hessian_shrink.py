"""Hessian shrinkage toward the diagonal: its algebra, why it helps, and that the driver applies it."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CALIBRATION
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.algorithms.decoupleq import decoupleq_quantize
from hfquant.algorithms.gptq import shrink_hessian
from hfquant.algorithms.grid import dequantize_grid, layer_objective


def test_shrink_keeps_the_diagonal_and_scales_the_rest():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / 64
    out = shrink_hessian(h, 0.25)
    assert torch.equal(out.diagonal(), h.diagonal())
    off = ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(out[off], 0.75 * h[off])
    assert shrink_hessian(h, 0.0) is h
    with pytest.raises(ValueError, match=r"shrink must be in \[0, 1\), got 1.0"):
        shrink_hessian(h, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrinking_a_small_sample_hessian_lowers_the_error_on_fresh_inputs(seed):
    """The premise of the knob: inputs with correlated channels, a Hessian estimated from fewer
    tokens than it has channels; the solve on the shrunk estimate has the lower error under the
    population covariance (the Hessian of inputs the calibration never saw)."""
    g = torch.Generator().manual_seed(seed)
    dim = 128
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim) * torch.rand(dim, generator=g) * 2
    population = mix @ mix.T
    sample = torch.randn(96, dim, generator=g) @ mix.T
    estimate = sample.T @ sample / 96
    w = torch.randn(32, dim, generator=g)

    def fresh_error(h):
        r = decoupleq_quantize(w, h, 2, 32, iters=2)
        return layer_objective(w, dequantize_grid(r.qweight, r.scales, r.zeros, 32), population)

    assert fresh_error(shrink_hessian(estimate, 0.3)) < 0.9 * fresh_error(estimate)


def test_the_config_reaches_the_solve_and_reloads(tiny_llama_dir, tmp_path):
    def quantize(shrink):
        config = HfQuantConfig(bits=2, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=0,
                               e2e_epochs=0, hessian_shrink=shrink, **TINY_CALIBRATION)  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.float32)

    plain, shrunk = quantize(0.0), quantize(0.9)
    layer = "model.layers.0.mlp.down_proj"
    assert not torch.equal(plain.get_submodule(layer).dequantize(), shrunk.get_submodule(layer).dequantize())
    shrunk.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.config.quantization_config.hessian_shrink == 0.9
    assert "decoupleQ (Hessian shrunk 0.9 toward its diagonal)" in (tmp_path / "README.md").read_text()
    ids = torch.arange(1, 17)[None]
    assert torch.equal(again(ids).logits, shrunk(ids).logits)


def test_a_config_saved_before_the_field_existed_reads_as_unshrunk():
    saved = HfQuantConfig(bits=2).to_dict()
    assert saved["hessian_shrink"] == 0.3  # today's default is written out
    del saved["hessian_shrink"]
    assert HfQuantConfig.from_dict(saved).hessian_shrink == 0.0
    assert HfQuantConfig.from_dict({**saved, "hessian_shrink": 0.5}).hessian_shrink == 0.5
