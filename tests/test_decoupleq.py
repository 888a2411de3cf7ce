"""decoupleQ: the float step is the exact least-squares optimum and the alternation only ever helps."""

from __future__ import annotations

import pytest
import torch
from helpers import make_problem

from hfquant.algorithms.decoupleq import decoupleq_quantize, solve_float_step, solve_spd
from hfquant.algorithms.gptq import gptq_quantize
from hfquant.algorithms.grid import dequantize_grid, group_index, layer_objective, num_groups


def masked_objective(
    w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, keep: torch.Tensor | None
) -> float:
    return layer_objective(w, w_hat if keep is None else torch.where(keep, w, w_hat), h)


def lstsq_grid(
    w: torch.Tensor,
    h: torch.Tensor,
    q: torch.Tensor,
    group_size: int,
    keep: torch.Tensor | None,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference float step, row by row: ``min ||L^T (w - A theta)||`` with ``H + delta I = L L^T``."""
    out_features, in_features = w.shape
    ng = num_groups(in_features, group_size)
    onehot = torch.nn.functional.one_hot(group_index(in_features, group_size), ng).double()
    lt = torch.linalg.cholesky(h.double() + delta * torch.eye(in_features, dtype=torch.float64)).T
    thetas = []
    for r in range(out_features):
        live = torch.ones(in_features, dtype=torch.float64) if keep is None else (~keep[r]).double()
        a = torch.cat([onehot * q[r].double()[:, None], onehot], dim=1) * live[:, None]
        target = w[r].double() * live
        thetas.append(torch.linalg.lstsq(lt @ a, (lt @ target)[:, None]).solution[:, 0])
    theta = torch.stack(thetas)
    return theta[:, :ng], theta[:, ng:]


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_float_step_is_the_least_squares_optimum(group_size: int, with_keep: bool, damp: float) -> None:
    w, h = make_problem(12, 100, seed=5)  # 100 = 3 groups of 32 + a ragged group of 4
    h = h.double()
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 4, w.shape, generator=g, dtype=torch.uint8)
    keep = torch.rand(w.shape, generator=g) < 0.05 if with_keep else None
    scales, zeros = solve_float_step(w, h, q, group_size, keep, damp=damp, round_fp16=False)
    delta = damp * float(h.diagonal().mean())
    ref_s, ref_z = lstsq_grid(w, h, q, group_size, keep, delta)
    torch.testing.assert_close(scales.double(), ref_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(zeros.double(), ref_z, rtol=1e-4, atol=1e-6)
    if damp == 0.0:
        ours = masked_objective(w, dequantize_grid(q, scales, zeros, group_size), h, keep)
        ref = masked_objective(w, dequantize_grid(q, ref_s.float(), ref_z.float(), group_size), h, keep)
        assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_per_tensor_float_step_is_the_joint_least_squares_optimum(damp: float) -> None:
    w, h = make_problem(12, 100, seed=6)
    h = h.double()
    q = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    scales, zeros = solve_float_step(w, h, q, 0, damp=damp, round_fp16=False)
    assert scales.shape == zeros.shape == (1, 1)
    delta = damp * float(h.diagonal().mean())
    lt = torch.linalg.cholesky(h + delta * torch.eye(100, dtype=torch.float64)).T
    # All rows stacked: one (scale, zero) pair explains the whole matrix.
    a = torch.cat([torch.stack([lt @ q[r].double(), lt @ torch.ones(100, dtype=torch.float64)], 1) for r in range(12)])
    target = torch.cat([lt @ w[r].double() for r in range(12)])
    ref = torch.linalg.lstsq(a, target[:, None]).solution[:, 0]
    torch.testing.assert_close(torch.cat([scales, zeros], 1)[0].double(), ref, rtol=1e-4, atol=1e-6)


def test_per_tensor_decoupleq_is_monotone() -> None:
    w, h = make_problem(16, 96, seed=3)
    history: list[float] = []
    qw = decoupleq_quantize(w, h, 2, 0, iters=3, history=history)
    assert qw.scales.shape == (1, 1)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:], strict=False))
    assert layer_objective(w, qw.dequantize(0), h) < layer_objective(w, gptq_quantize(w, h, 2, 0).dequantize(0), h)


def test_float_step_rounds_to_fp16_and_pins_unidentifiable_directions() -> None:
    w, h = make_problem(8, 128)
    q = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    q[0, :64] = 2  # constant integers: only s * 2 + z is identifiable in that group
    q[1, 64:] = 0  # all zero: the scale multiplies nothing
    prev = (torch.full((8, 2), 0.01), torch.full((8, 2), -0.02))
    scales, zeros = solve_float_step(w, h, q, 64, damp=0.01, prev=prev)
    assert torch.equal(scales, scales.half().float()) and torch.equal(zeros, zeros.half().float())
    assert torch.isfinite(scales).all() and torch.isfinite(zeros).all()
    assert float(scales[1, 1]) == pytest.approx(0.01, rel=1e-3)
    # On the line s * 2 + z = level, the ridge picks the point nearest to the previous grid.
    scales, zeros = solve_float_step(w, h.double(), q, 64, damp=0.01, prev=prev, round_fp16=False)
    level = float(2 * scales[0, 0] + zeros[0, 0])
    assert float(scales[0, 0]) == pytest.approx(0.01 + 2 * (level - (2 * 0.01 - 0.02)) / 5, rel=1e-3)


@pytest.mark.parametrize("with_keep", [False, True])
def test_decoupleq_history_is_monotone_and_beats_gptq(with_keep: bool) -> None:
    w, h = make_problem(48, 200, seed=2)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.02 if with_keep else None
    history: list[float] = []
    qw = decoupleq_quantize(w, h, 2, 64, iters=3, kept=keep, history=history)
    assert len(history) == 2 + 2 * 3
    assert all(b <= a for a, b in zip(history, history[1:], strict=False))
    start = masked_objective(
        w, gptq_quantize(w, h, 2, 64, act_order=True, kept=keep).dequantize(64), h, keep
    )
    plain = masked_objective(w, gptq_quantize(w, h, 2, 64, kept=keep).dequantize(64), h, keep)
    final = masked_objective(w, qw.dequantize(64), h, keep)
    assert history[0] == pytest.approx(start, rel=1e-4)
    assert history[-1] == pytest.approx(final, rel=1e-4)
    assert final < 0.8 * min(start, plain)
    assert torch.equal(qw.scales, qw.scales.half().float()) and torch.equal(qw.zeros, qw.zeros.half().float())
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 3


@pytest.mark.parametrize("bits", [3, 4])
def test_decoupleq_other_widths_per_channel_and_plain_order(bits: int) -> None:
    w, h = make_problem(16, 96, seed=bits)
    for group_size in (32, -1):
        for act_order in (False, True):
            gptq = gptq_quantize(w, h, bits, group_size, act_order=act_order)
            start = layer_objective(w, gptq.dequantize(group_size), h)
            qw = decoupleq_quantize(w, h, bits, group_size, iters=1, act_order=act_order)
            assert layer_objective(w, qw.dequantize(group_size), h) < start


def test_float_step_with_many_groups_on_two_threads() -> None:
    """96 groups (a 1536-wide row in groups of 16, as Q2_K's): the float step's batched 192 x 192 systems.
    torch.linalg.solve's batched LU raised "Pivots given to lu_solve must all be greater or equal to 1"
    on 2 CPU threads at that size (torch 2.13, MKL); the Cholesky solve gives the least-squares optimum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, h = make_problem(4, 1536, seed=5)
        h = h.double()
        q = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
        scales, zeros = solve_float_step(w, h, q, 16, damp=0.01, round_fp16=False)
    finally:
        torch.set_num_threads(threads)
    ref_s, ref_z = lstsq_grid(w, h, q, 16, None, 0.01 * float(h.diagonal().mean()))
    torch.testing.assert_close(scales.double(), ref_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(zeros.double(), ref_z, rtol=1e-4, atol=1e-6)


def test_solve_spd_falls_back_to_least_squares_where_not_positive_definite() -> None:
    a = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    a[1, 2, 2] = -1.0  # indefinite: no Cholesky factor
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(solve_spd(a, b), torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, -3.0]], dtype=torch.float64))
