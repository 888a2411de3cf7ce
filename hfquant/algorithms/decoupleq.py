"""decoupleQ (Guo et al., 2024, arXiv:2404.12759): integers and float grid solved as two variables.

The layer problem ``min tr((W - W_hat) H (W - W_hat)^T)`` with ``W_hat = s * Q + z`` is split
into an integer part ``Q`` and a float part ``(s, z)``, minimized alternately.

Follows the paper and its reference code (bytedance/decoupleQ, LLaMA settings):
  * start: GPTQ with act_order on the min-max grid.
  * float step: with ``Q`` fixed, ``W_hat`` is linear in ``(s, z)``, so each output row's grid
    is the exact weighted least-squares solution ``(A^T H A)^-1 A^T H w``. All groups of a row
    are solved jointly, since ``H`` couples them.
  * integer step: with ``(s, z)`` fixed, GPTQ on that grid in act_order column order (a fixed
    grid lifts act_order's static-grid restriction). Dampening is used in both solves.
  * rows are independent, so every step is kept row by row only where it lowers that row's
    objective; the result is never worse than the start.

Chosen otherwise:
  * no ``H``-weighted shrink search for the first grid: the float step right after the start
    gives the exact optimum for the start's integers, which that search only approximates.
  * no relaxed projected-gradient integer step (Adam on a box-constrained relaxation, then
    rounding): the reference's LLaMA recipe uses the GPTQ step, and the relaxation costs
    hundreds of ``[out, in] @ [in, in]`` products per step, far beyond this CPU budget.
  * steps are judged on the undamped objective (the reference uses the damped one): dampening
    steers the solves, it is not the goal. It is read off the float step's quadratic form
    (``A^T H A`` built in float32, assembled in float64; within ~1e-5 of a float64 evaluation),
    which saves a separate ``[out, in] @ [in, in]`` product per step.
  * scales and zeros are rounded to float16 (their storage type) at every step, so the tracked
    objective is that of the weights actually stored.
  * ``act_order=False`` gives the plain-GPTQ variant (dynamic-group start, natural column order);
    on random ill-conditioned problems at 2 bits it ends about 30% higher in objective.
  * block-wise minimization (training the float parts through the whole block) is a separate
    stage of this package, not part of this layer solver.
  * weights kept in 16 bits (``kept``, TaCQ) are exact: they drop out of the float step's
    residual and feed no error in the integer step.
  * a per-tensor grid (``group_size=0``) is one ``(s, z)`` for all rows: its float step solves the
    sum of the rows' normal equations, and steps are accepted on the whole layer's objective.
  * on a GGUF type's grid (``grid_spec``, :mod:`hfquant.algorithms.gguf_grid`) the type fixes the
    width and groups; a tied zero (``z = -offset * s``: ``q4_0``, ``q8_0``, ``q3_k``) is solved
    exactly as one unknown per group; every float solve (and the start's min-max grid) is then
    projected onto the values the type stores, weighting each group by its diagonal in the normal
    matrix, and the objective is that of the projected grid. GPTQ rounds a given grid to float16
    before choosing integers: a K-quant sub-block scale ``d * sc`` (up to 17 significant bits) is
    off by at most half a float16 step there, which only moves an integer sitting that close to a
    rounding boundary; the float step and the objective use the exact grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.algorithms.gguf_grid import BlockGridWeight, GridSpec, cover_range, project
from hfquant.algorithms.gptq import gptq_solve, masked_minmax_grid, prepare_hessian, to_fp16_grid
from hfquant.algorithms.grid import QuantizedWeight, effective_group_size, num_groups


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x`` with ``a x = b`` for batched symmetric positive definite ``a [..., n, n]`` and ``b [..., n]``:
    by Cholesky, with least squares for any matrix that is not numerically positive definite.
    (Not ``torch.linalg.solve``: its batched LU fails on the CPU with 2 or more threads for n >= 160,
    "Pivots given to lu_solve must all be greater or equal to 1", torch 2.13 with MKL.)"""
    low, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b.unsqueeze(-1), low).squeeze(-1)
    bad = info > 0
    if bool(bad.any()):
        x[bad] = torch.linalg.lstsq(a[bad], b[bad].unsqueeze(-1)).solution.squeeze(-1)
    return x


@dataclass
class _FloatProblem:
    """What the float step reuses across decoupleQ rounds: everything that depends only on ``W`` and ``H``."""

    hessian: torch.Tensor  # [in_p, in_p], zero-padded to whole groups
    mask: torch.Tensor  # [out or 1, G, gs]: 1 where a weight is quantized, 0 where kept or padding
    masked: bool  # whether some weights are kept (the indicator columns then differ per row)
    w: torch.Tensor  # [out, G, gs], kept weights zeroed
    hw: torch.Tensor  # [out, G, gs]: H w per row
    wtw: torch.Tensor  # float64 [out]: w^T H w
    ind_hw: torch.Tensor  # [out, G]: 1_g^T H w, the indicators' part of A^T H w
    ind_w: torch.Tensor  # [out, G]: 1_g^T w, the indicators' part of A^T w (dampening)
    counts: torch.Tensor  # [out or 1, G]: 1_g^T 1_g, quantized weights per group
    group_sums: torch.Tensor  # [G, G, gs]: 1_g^T H restricted to group h
    delta: float  # absolute dampening added to H's diagonal in the solve
    shared: bool  # one grid for all rows (per tensor): the rows' normal equations are summed
    spec: GridSpec | None = None  # a GGUF type's grid: each solve is projected onto it

    @classmethod
    def build(
        cls,
        w: torch.Tensor,
        hessian: torch.Tensor,
        group_size: int,
        keep: torch.Tensor | None,
        damp: float,
        spec: GridSpec | None = None,
    ) -> _FloatProblem:
        out_features, in_features = w.shape
        gs = effective_group_size(in_features, group_size)
        ng = num_groups(in_features, group_size)
        pad = ng * gs - in_features
        w = w.to(hessian.dtype)
        if keep is None:
            mask = torch.ones(1, in_features, dtype=hessian.dtype, device=hessian.device)
        else:
            mask = (~keep).to(hessian.dtype)
            w = w * mask
        hw = w @ hessian

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, pad)).reshape(t.shape[0], ng, gs)

        h_pad = torch.nn.functional.pad(hessian, (0, pad, 0, pad))
        mask, w, hw = grouped(mask), grouped(w), grouped(hw)
        return cls(
            hessian=h_pad,
            mask=mask,
            masked=keep is not None,
            w=w,
            hw=hw,
            wtw=(w * hw).sum(dim=(1, 2), dtype=torch.float64),
            ind_hw=torch.linalg.vecdot(mask, hw),
            ind_w=torch.linalg.vecdot(mask, w),
            counts=mask.sum(dim=2),
            group_sums=h_pad.reshape(ng, gs, ng, gs).sum(dim=1),
            delta=damp * float(hessian.diagonal().mean()),
            shared=group_size == 0,
            spec=spec,
        )

    def solve(
        self, qweight: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None, round_fp16: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Grid minimizing the objective for fixed integers, and the undamped objective per row.

        Row ``r`` solves ``min_theta (w - A theta)^T H (w - A theta)`` where ``A`` [in, 2G] holds,
        per group, the integers restricted to it and its indicator (kept weights zeroed in both).
        ``A^T H A`` is built from ``Q_g H_{g, g:}`` products, group by group over the upper
        triangle only: about half an ``[out, in] @ [in, in]`` matmul. Dampening adds
        ``delta * A^T A``. A tiny ridge toward ``prev`` pins directions the data cannot identify
        (a group whose integers are all equal has no identifiable scale) at their previous values.
        Returns ``(scales, zeros, objective, objective of prev)``.
        """
        out_features, ng, gs = self.w.shape
        dtype = self.hessian.dtype
        xq = torch.nn.functional.pad(qweight.to(dtype), (0, ng * gs - qweight.shape[1]))
        xq = xq.reshape(out_features, ng, gs)
        xm = self.mask
        masked = self.masked
        if masked:
            xq = xq * xm
        # Blocks of A^T H A over group pairs (g, h): integers x integers, integers x indicators,
        # indicators x indicators. The loop fills h >= g; the rest follows by symmetry.
        p11, p12, p22 = (torch.zeros(out_features, ng, ng, dtype=dtype, device=xq.device) for _ in range(3))
        p21 = torch.zeros(out_features, ng, ng, dtype=dtype, device=xq.device) if masked else None
        for g in range(ng):
            h_g = self.hessian[g * gs : (g + 1) * gs, g * gs :]
            vq = (xq[:, g] @ h_g).reshape(out_features, ng - g, gs)
            p11[:, g, g:] = torch.linalg.vecdot(vq, xq[:, g:])
            if masked:
                vm = (xm[:, g] @ h_g).reshape(out_features, ng - g, gs)
                p12[:, g, g:] = torch.linalg.vecdot(vq, xm[:, g:])
                p21[:, g, g:] = torch.linalg.vecdot(vm, xq[:, g:])
                p22[:, g, g:] = torch.linalg.vecdot(vm, xm[:, g:])
        strict = torch.ones(ng, ng, dtype=torch.bool, device=xq.device).triu(1)

        def mirror(t: torch.Tensor) -> torch.Tensor:
            return t + (t * strict).transpose(1, 2)

        p11 = mirror(p11)
        if masked:
            p12 = p12 + (p21 * strict).transpose(1, 2)
            p22 = mirror(p22)
        else:
            # Indicators are the same for every row: 1_g^T H_{gh} q_h in one batched matmul over h.
            p21 = torch.bmm(xq.transpose(0, 1), self.group_sums.permute(1, 2, 0)).permute(1, 2, 0)
            p12 = p21.transpose(1, 2)
            p22 = self.group_sums.sum(dim=2).expand(out_features, -1, -1)
        p = torch.empty(out_features, 2 * ng, 2 * ng, dtype=torch.float64, device=xq.device)
        p[:, :ng, :ng] = p11
        p[:, :ng, ng:] = p12
        p[:, ng:, :ng] = p12.transpose(1, 2)
        p[:, ng:, ng:] = p22
        b = torch.cat([torch.linalg.vecdot(xq, self.hw), self.ind_hw], dim=1).double()

        # Dampened system: A^T (H + delta I) A theta = A^T (H + delta I) w. A^T A is block-diagonal
        # per group: it touches only the diagonal and the (scale_g, zero_g) pairs.
        p_damped = p.clone()
        diag = p_damped.diagonal(dim1=1, dim2=2)
        diag += (
            self.delta
            * torch.cat([torch.linalg.vecdot(xq, xq), self.counts.expand(out_features, -1)], 1).double()
        )
        idx = torch.arange(ng, device=xq.device)
        q_sums = self.delta * xq.sum(dim=2).double()
        p_damped[:, idx, idx + ng] += q_sums
        p_damped[:, idx + ng, idx] += q_sums
        rhs = b + self.delta * torch.cat([torch.linalg.vecdot(xq, self.w), self.ind_w], dim=1).double()
        if self.shared:
            p_damped, rhs = p_damped.sum(dim=0, keepdim=True), rhs.sum(dim=0, keepdim=True)
        diag = p_damped.diagonal(dim1=1, dim2=2)
        # The ridge must dominate the rounding noise of A^T H A (built in ``dtype``) to pin null directions.
        ridge_rel = 1e-6 if dtype == torch.float32 else 1e-10
        ridge = ridge_rel * diag.mean(dim=1, keepdim=True).clamp_min(1e-30)
        diag += ridge
        theta_prev = None if prev is None else torch.cat(prev, dim=1).double()
        if theta_prev is not None:
            rhs = rhs + ridge * theta_prev
        offset = None if self.spec is None else self.spec.offset
        if offset is None:
            theta = solve_spd(p_damped, rhs)
        else:
            # Tied zero: theta = T phi with T = [I; -offset I], one unknown per group.
            eye = torch.eye(ng, dtype=p.dtype, device=p.device)
            tie = torch.cat([eye, -offset * eye])
            theta = solve_spd(tie.T @ p_damped @ tie, rhs @ tie) @ tie.T
        if self.spec is not None:
            importance = (p[:, idx, idx].clamp_min(0).float(), p[:, idx + ng, idx + ng].clamp_min(0).float())
            stored = project(self.spec, theta[:, :ng].float(), theta[:, ng:].float(), importance)
            theta = torch.cat([stored.scales, stored.zeros], dim=1).double()
        elif round_fp16:
            theta = to_fp16_grid(theta.float()).double()

        def objective(t: torch.Tensor) -> torch.Tensor:
            t = t.expand(out_features, -1)
            return self.wtw - 2.0 * (t * b).sum(dim=1) + torch.einsum("ri,rij,rj->r", t, p, t)

        obj_prev = None if theta_prev is None else objective(theta_prev)
        return theta[:, :ng].float(), theta[:, ng:].float(), objective(theta), obj_prev


def solve_float_step(
    w: torch.Tensor,
    hessian: torch.Tensor,
    qweight: torch.Tensor,
    group_size: int,
    kept: torch.Tensor | None = None,
    *,
    damp: float = 0.0,
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    round_fp16: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ``(scales, zeros)`` [out, n_groups] for fixed integers ``qweight`` (decoupleQ's float step).

    Minimizes ``tr((W - W_hat) H (W - W_hat)^T)`` exactly, all groups of a row jointly; kept
    weights (``kept``) are exact and so leave the residual. ``damp`` (a fraction of the
    mean diagonal of ``H``) pulls ``W_hat`` toward ``W`` entrywise; ``prev`` is the grid that
    unidentifiable directions keep. Computes in ``hessian``'s dtype (float32 or float64);
    ``round_fp16`` rounds the result to its float16 storage values.
    """
    problem = _FloatProblem.build(w, hessian, group_size, kept, damp)
    scales, zeros, _, _ = problem.solve(qweight, prev, round_fp16)
    return scales, zeros


def decoupleq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    iters: int = 4,
    damp: float = 0.01,
    kept: torch.Tensor | None = None,
    act_order: bool = True,
    block_size: int = 128,
    history: list[float] | None = None,
    grid_spec: GridSpec | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] by alternating exact float steps and GPTQ integer steps.

    Args:
        iters: integer steps after the GPTQ start; every integer solve (the start included) is
            followed by a float step, so ``iters=0`` is GPTQ with its grid re-solved once.
        damp: dampening of both solves, as a fraction of the mean diagonal of ``H``.
        kept: bool [out, in] of weights kept in 16 bits (exact; their error counts as zero).
        act_order: GPTQ column order by decreasing ``diag(H)`` (min-max start grid); off, the start
            is GPTQ with dynamic groups and columns go in natural order.
        history: if given, receives the objective (undamped, kept weights exact) of the start
            and after every step; non-increasing, since steps are accepted per row only where
            they help.
        grid_spec: solve on a GGUF type's grid (:mod:`hfquant.algorithms.gguf_grid`); its ``bits``
            and ``group_size`` replace the arguments, and the result is a ``BlockGridWeight``
            carrying the codes that store its grid.
    """
    w = w.float()
    if grid_spec is not None:
        bits, group_size = grid_spec.bits, grid_spec.group_size
    inv = prepare_hessian(hessian, damp, act_order)
    problem = _FloatProblem.build(w, hessian.float(), group_size, kept, damp, grid_spec)

    def integer_step(grid: tuple[torch.Tensor, torch.Tensor] | None) -> QuantizedWeight:
        result = gptq_solve(w, inv, bits, group_size, block_size=block_size, grid=grid, kept=kept)
        if grid_spec is not None:  # GPTQ's float16 copy of the grid is not the stored one
            result.scales, result.zeros = grid[0].clone(), grid[1].clone()
        return result

    start = None
    if grid_spec is not None:
        stored = project(grid_spec, *cover_range(grid_spec, *masked_minmax_grid(w, bits, group_size, kept)))
        start = (stored.scales, stored.zeros)
    best = integer_step(start)
    # Each float step also prices the integers it starts from on the grid they were solved on.
    s, z, obj, best_obj = problem.solve(best.qweight, (best.scales, best.zeros), round_fp16=True)
    if history is not None:
        history.append(float(best_obj.sum()))

    def accept(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, obj: torch.Tensor) -> None:
        nonlocal best_obj
        if problem.shared:  # one grid for all rows: a step is taken whole or not at all
            better = torch.full_like(best_obj, float(obj.sum()) < float(best_obj.sum()), dtype=torch.bool)
        else:
            better = obj < best_obj
        best.qweight[better] = q[better]
        grid_rows = better[: best.scales.shape[0]]
        best.scales[grid_rows] = s[grid_rows]
        best.zeros[grid_rows] = z[grid_rows]
        best_obj = torch.where(better, obj, best_obj)
        if history is not None:
            history.append(float(best_obj.sum()))

    accept(best.qweight, s, z, obj)
    for _ in range(iters):
        cand = integer_step((best.scales, best.zeros))
        s, z, obj, obj_cand = problem.solve(cand.qweight, (cand.scales, cand.zeros), round_fp16=True)
        accept(cand.qweight, cand.scales, cand.zeros, obj_cand)
        accept(cand.qweight, s, z, obj)
    if grid_spec is None:
        return best
    # Projection is idempotent: the kept grid's codes are read back from it exactly.
    return BlockGridWeight(best.qweight, best.scales, best.zeros, project(grid_spec, best.scales, best.zeros))
