"""GPTQ: beats round-to-nearest on the layer objective, honours fixed grids, act_order and kept weights."""

from __future__ import annotations

import pytest
import torch
from helpers import make_problem

from hfquant.algorithms.gptq import gptq_quantize, masked_minmax_grid
from hfquant.algorithms.grid import dequantize_grid, layer_objective, num_groups, quantize_to_grid
from hfquant.algorithms.rtn import rtn_quantize


def correlation_problem(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-diagonal ``H`` (so dampening does not depend on which columns are present)."""
    w, h = make_problem(out_features, in_features)
    d = h.diagonal().rsqrt()
    return w, h * d[:, None] * d[None, :]


def is_fp16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.half().float()))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_gptq_beats_rtn(bits: int, group_size: int) -> None:
    for in_features in (96, 200):  # both leave a ragged last group for most sizes
        w, h = make_problem(24, in_features, seed=bits)
        qw = gptq_quantize(w, h, bits, group_size)
        rtn = layer_objective(w, rtn_quantize(w, bits, group_size).dequantize(group_size), h)
        gptq = layer_objective(w, qw.dequantize(group_size), h)
        assert gptq < 0.8 * rtn
        ng = num_groups(in_features, group_size)
        assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 2**bits - 1
        assert qw.scales.shape == qw.zeros.shape == (24, ng)
        assert is_fp16(qw.scales) and is_fp16(qw.zeros)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_tensor_grid_is_one_pair(bits: int) -> None:
    w, h = make_problem(24, 96, seed=bits)
    qw = gptq_quantize(w, h, bits, 0)
    assert qw.scales.shape == qw.zeros.shape == (1, 1)
    assert is_fp16(qw.scales) and is_fp16(qw.zeros)
    rtn = rtn_quantize(w, bits, 0)
    assert rtn.scales.shape == (1, 1)
    assert float(rtn.zeros) == pytest.approx(float(w.min())) and float(rtn.dequantize(0).max()) == pytest.approx(
        float(w.max()), rel=1e-5
    )
    assert layer_objective(w, qw.dequantize(0), h) < layer_objective(w, rtn.dequantize(0), h)


def test_diagonal_hessian_is_rtn_on_the_stored_grid() -> None:
    """Without cross terms GPTQ feeds nothing forward: integers are nearest levels of the float16 grid."""
    w, _ = make_problem(16, 200)
    h = torch.diag(torch.rand(200) + 0.5)
    for act_order in (False, True):
        qw = gptq_quantize(w, h, 2, 64, act_order=act_order)
        assert is_fp16(qw.scales) and is_fp16(qw.zeros)
        assert torch.equal(qw.qweight, quantize_to_grid(w, qw.scales, qw.zeros, 2, 64))


def test_act_order_uses_static_minmax_grid_and_beats_rtn() -> None:
    w, h = make_problem(32, 200)
    qw = gptq_quantize(w, h, 2, 64, act_order=True)
    scales, zeros = masked_minmax_grid(w, 2, 64)
    assert torch.equal(qw.scales, scales) and torch.equal(qw.zeros, zeros)
    rtn = layer_objective(w, rtn_quantize(w, 2, 64).dequantize(64), h)
    assert layer_objective(w, qw.dequantize(64), h) < 0.8 * rtn


def test_fixed_grid_is_respected() -> None:
    w, h = make_problem(16, 200)
    g = torch.Generator().manual_seed(1)
    scales = 0.01 + 0.02 * torch.rand(16, 4, generator=g, dtype=torch.float64)
    zeros = -0.03 + 0.01 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    qw = gptq_quantize(w, h, 2, 64, grid=(scales, zeros))
    assert torch.equal(qw.scales, scales.float().half().float())
    assert torch.equal(qw.zeros, zeros.float().half().float())
    nearest = dequantize_grid(quantize_to_grid(w, qw.scales, qw.zeros, 2, 64), qw.scales, qw.zeros, 64)
    assert layer_objective(w, qw.dequantize(64), h) < 0.8 * layer_objective(w, nearest, h)


def test_dead_columns() -> None:
    w, h = make_problem(16, 96)
    h[5, :] = 0.0
    h[:, 5] = 0.0
    qw = gptq_quantize(w, h, 2, 32)
    assert torch.isfinite(qw.scales).all() and torch.isfinite(qw.zeros).all()
    assert layer_objective(w, qw.dequantize(32), h) < layer_objective(
        w, rtn_quantize(w, 2, 32).dequantize(32), h
    )


def test_kept_weights_feed_no_error() -> None:
    """Keeping all of column 0 must leave the rest exactly as GPTQ on columns 1: alone."""
    w, h = correlation_problem(32, 97)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:, 0] = True
    w[::3, 0] = 1.0  # outliers: left out of the (per-row) min-max range
    with_keep = gptq_quantize(w, h, 2, -1, kept=keep)
    alone = gptq_quantize(w[:, 1:], h[1:, 1:], 2, -1)
    torch.testing.assert_close(with_keep.scales, alone.scales)
    torch.testing.assert_close(with_keep.zeros, alone.zeros)
    mismatch = (with_keep.qweight[:, 1:] != alone.qweight).float().mean()
    assert mismatch < 0.01  # only float ties may differ between the two factorizations
    nearest = quantize_to_grid(w, with_keep.scales, with_keep.zeros, 2, -1)
    assert torch.equal(with_keep.qweight[:, 0], nearest[:, 0])
    # Sanity: without the mask column 0 does feed its error into the others.
    plain = gptq_quantize(w, h, 2, -1)
    assert (plain.qweight[:, 1:] != alone.qweight).float().mean() > 0.05


def test_kept_weights_lower_masked_objective() -> None:
    w, h = make_problem(32, 200)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.02

    def masked_objective(qw) -> float:
        return layer_objective(w, torch.where(keep, w, qw.dequantize(64)), h)

    assert masked_objective(gptq_quantize(w, h, 2, 64, kept=keep)) < masked_objective(
        gptq_quantize(w, h, 2, 64)
    )
