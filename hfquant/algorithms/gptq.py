"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error feedback.

Each column is rounded onto its group's grid and the rounding error is spread over the columns
not yet rounded through the upper Cholesky factor of ``H^-1``, so later columns absorb what
earlier ones lost. Updates are applied lazily in blocks of columns to keep the work in matmuls.

Grids are stored in float16, so every scale and zero is rounded to a float16 value *before*
the integers are chosen against it: the solved grid is exactly the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.algorithms.grid import QuantizedWeight, effective_group_size, group_index, num_groups


@dataclass
class InverseHessian:
    """What GPTQ needs from ``H``, computed once and reusable across solves (decoupleQ)."""

    hinv: torch.Tensor  # float32 [in, in], upper Cholesky factor of (damped H)^-1, in processing order
    perm: torch.Tensor | None  # processing order of the columns (act_order), None for natural order
    dead: torch.Tensor  # bool [in], columns whose input is always zero


def to_fp16_grid(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value, kept as float32: the stored grid, exactly."""
    return t.half().float()


def masked_minmax_grid(
    w: torch.Tensor, bits: int, group_size: int, kept: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per group over the weights *not* kept in 16 bits, rounded to float16.

    Kept weights are stored exactly anyway; letting them set the range would waste the few
    levels a 2-bit grid has on them.
    """
    maxq = 2**bits - 1
    out_features, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    ng = num_groups(in_features, group_size)
    w = w.float()
    lo, hi = w, w
    if kept is not None:
        lo = w.masked_fill(kept, float("inf"))
        hi = w.masked_fill(kept, float("-inf"))
    pad = ng * gs - in_features
    if pad:
        lo = torch.nn.functional.pad(lo, (0, pad), value=float("inf"))
        hi = torch.nn.functional.pad(hi, (0, pad), value=float("-inf"))
    shape = (1, 1, -1) if group_size == 0 else (out_features, ng, gs)
    wmin = lo.reshape(shape).amin(dim=2)
    wmax = hi.reshape(shape).amax(dim=2)
    empty = torch.isinf(wmin)  # every weight of the group is kept: any grid will do
    wmin = wmin.masked_fill(empty, 0.0)
    wmax = wmax.masked_fill(empty, 0.0)
    scales = to_fp16_grid((wmax - wmin) / maxq)
    # A constant group has no range (or a range below float16 resolution): scale 1 keeps it exact with Q = 0.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return scales, to_fp16_grid(wmin)


def _safe_scales(s: torch.Tensor) -> torch.Tensor:
    """Divisor for rounding: a zero scale makes every level equal, so any integer (here 0) is exact."""
    return torch.where(s == 0, torch.ones_like(s), s)


def _round_to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest level of ``s * q + z`` (``s`` already made safe)."""
    return torch.round((w - z) / s).clamp_(0, maxq)


def _upper_triangular_inverse(r: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Inverse of an upper triangular matrix by 2x2 block recursion: mostly GEMMs, ~2x faster than TRSM."""
    n = r.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True)
    k = n // 2
    a = _upper_triangular_inverse(r[:k, :k], leaf)
    c = _upper_triangular_inverse(r[k:, k:], leaf)
    out = torch.zeros_like(r)
    out[:k, :k] = a
    out[k:, k:] = c
    out[:k, k:] = -(a @ r[:k, k:]) @ c
    return out


def shrink_hessian(hessian: torch.Tensor, shrink: float) -> torch.Tensor:
    """``(1 - shrink) * H + shrink * diag(H)``: the Hessian pulled toward its diagonal.

    Shrinkage of a sample covariance toward its diagonal (Ledoit and Wolf's target): the
    correlations between input channels estimated from a few thousand calibration tokens are
    what the solver's error compensation fits and other text does not share, while the
    diagonal (what llama.cpp's importance matrix keeps) carries over. Unlike ``damp``, which adds
    the same amount to every channel, it keeps each channel's own scale. Not in GPTQ or
    decoupleQ; measured per layer and end to end in ``benchmarks/RESULTS.md``.
    """
    if not 0.0 <= shrink < 1.0:
        raise ValueError(f"shrink must be in [0, 1), got {shrink!r}")
    if shrink == 0.0:
        return hessian
    return torch.lerp(hessian, torch.diag_embed(hessian.diagonal()), shrink)


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> InverseHessian:
    """Dampen ``H``, fix dead columns and factor its inverse (float64, the costly part of a solve).

    Dead columns get diagonal 1 so ``H`` stays invertible; their weights never reach the
    output, so GPTQ zeroes them. If rounding leaves ``H`` not quite positive definite, the
    dampening is raised tenfold until the factorization succeeds.
    """
    h = hessian.double().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    mean_diag = float(h.diagonal().mean())
    for attempt in range(6):
        hd = h.clone()
        hd.diagonal().add_(damp * 10**attempt * mean_diag)
        # H = R R^T with R upper triangular (Cholesky of the flipped matrix), so H^-1 = U^T U with U = R^-1.
        low, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
        if int(info) == 0:
            break
    else:
        raise ValueError("GPTQ: Hessian is not positive definite even after heavy dampening")
    hinv = _upper_triangular_inverse(low.flip(0, 1))
    return InverseHessian(hinv.float(), perm, dead)


def _blocks(in_features: int, block_size: int, group_starts: int | None) -> list[tuple[int, int]]:
    """Column blocks for the lazy updates; with dynamic groups every group also starts a block.

    A group's grid is read from its columns when the solve reaches them; cutting blocks there
    guarantees those columns already carry every earlier error update.
    """
    cuts = set(range(0, in_features, block_size))
    if group_starts is not None:
        cuts |= set(range(0, in_features, group_starts))
    edges = sorted(cuts) + [in_features]
    return list(zip(edges[:-1], edges[1:], strict=True))


def gptq_solve(
    w: torch.Tensor,
    inv: InverseHessian,
    bits: int,
    group_size: int,
    *,
    block_size: int = 128,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    kept: torch.Tensor | None = None,
    weight_grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """GPTQ with a precomputed :class:`InverseHessian` (see :func:`gptq_quantize`).

    ``weight_grid`` is a fixed ``(scale, zero)`` per weight ([out, in] each, e.g. SplitQuant's grid
    of each weight's cluster); it replaces ``grid``, and the result's scales and zeros are it.
    """
    maxq = 2**bits - 1
    out_features, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    perm = inv.perm
    w_orig = w.float()
    work = w_orig.clone()
    work[:, inv.dead] = 0.0
    if weight_grid is not None:
        grid = weight_grid
    elif grid is None and (perm is not None or group_size == 0):
        # act_order visits columns out of order, but stored groups are contiguous: the grid must be static.
        # So must a per-tensor grid, which spans columns the solve has not reached yet.
        grid = masked_minmax_grid(work, bits, group_size, kept)
    static = grid is not None
    gidx = group_index(in_features, group_size, w.device)
    if weight_grid is not None:  # one "group" per column: column j reads grid column j
        gidx = torch.arange(in_features, device=w.device)
    if static:
        scales, zeros = to_fp16_grid(grid[0].float()), to_fp16_grid(grid[1].float())
    else:
        ng = num_groups(in_features, group_size)
        scales, zeros = (torch.empty(out_features, ng, device=w.device) for _ in range(2))
    keep = kept
    if perm is not None:
        work, gidx_p = work[:, perm], gidx[perm]
        keep = None if keep is None else keep[:, perm]
    else:
        gidx_p = gidx
    # Kept weights are exact in 16 bits: their error is zero, so they feed nothing forward.
    feed = None if keep is None else (~keep).t().float()

    # Column-major ([in, out]) so that every per-column step touches contiguous memory.
    work_t = work.t().contiguous()
    scales_t, zeros_t = scales.t(), zeros.t()  # views: dynamic grids written below show up here
    hinv = inv.hinv
    q_t = torch.empty(in_features, out_features, device=w.device)
    for i1, i2 in _blocks(in_features, block_size, None if static else gs):
        if not static and i1 % gs == 0:
            k = None if keep is None else keep[:, i1 : i1 + gs]
            s_g, z_g = masked_minmax_grid(work_t[i1 : i1 + gs].t(), bits, -1, k)
            scales[:, i1 // gs], zeros[:, i1 // gs] = s_g[:, 0], z_g[:, 0]
        g1 = gidx_p[i1:i2]
        s1, z1 = scales_t[g1], zeros_t[g1]
        d1 = _safe_scales(s1)
        w1 = work_t[i1:i2]  # a view: column updates land in ``work_t`` directly
        h1 = hinv[i1:i2, i1:i2]
        err1 = torch.empty(i2 - i1, out_features, device=w.device)
        inv_diag = (1.0 / h1.diagonal()).tolist()
        # The column loop is the hot path: in-place ops with ``out=`` keep it to a few kernels per column.
        for i in range(i2 - i1):
            col, q_col, err = w1[i], q_t[i1 + i], err1[i]
            torch.sub(col, z1[i], out=q_col).div_(d1[i]).round_().clamp_(0, maxq)
            torch.addcmul(z1[i], q_col, s1[i], out=err)
            torch.sub(col, err, out=err).mul_(inv_diag[i])
            if feed is not None:
                err.mul_(feed[i1 + i])
            torch.addmm(w1[i:], h1[i, i:, None], err[None, :], alpha=-1.0, out=w1[i:])
        work_t[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)

    q = q_t.t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if kept is not None:
        # A kept weight's integer is never used for its value; plain rounding of it is enough.
        s_full, z_full = scales[:, gidx], zeros[:, gidx]
        q = torch.where(kept, _round_to_grid(w_orig, _safe_scales(s_full), z_full, maxq), q)
    return QuantizedWeight(q.to(torch.uint8).contiguous(), scales, zeros)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    kept: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] minimizing ``tr((W - W_hat) H (W - W_hat)^T)`` the GPTQ way.

    Args:
        hessian: ``H = X^T X`` [in, in] of the layer's calibration inputs.
        damp: added to the diagonal as a fraction of its mean, for a stable inverse.
        act_order: visit columns by decreasing ``diag(H)``; the grid is then static (min-max of
            the original weights), because the format has no per-column group index.
        grid: fixed ``(scales, zeros)`` [out, n_groups]; only the integers are solved.
            Without it (and without act_order) each group gets a min-max grid of its
            error-updated columns when the solve reaches it.
        kept: bool [out, in] of weights kept in 16 bits: they feed no error forward and
            are left out of min-max ranges; their integer is plain nearest rounding.
    """
    inv = prepare_hessian(hessian, damp, act_order)
    return gptq_solve(w, inv, bits, group_size, block_size=block_size, grid=grid, kept=kept)
