"""SplitQuant (Song & Lin, 2025, arXiv:2501.12428): split each layer by weight value, one grid per part.

The paper clusters a layer's weights with k-means into lower, middle and upper clusters (k=3) and
rewrites the layer as the sum of k layers, each holding its cluster's weights and zeros elsewhere
(:func:`split_linear`); the sum computes the same function. Each part is then quantized with its
own scale and zero, so its grid spans only its cluster's narrow value range: the outliers keep
their values without stretching the grid of the many small weights.

Storage (:class:`~hfquant.nn.split_linear.SplitLinear`), chosen over storing the k parts:
  * k parts as k dense ``bits``-wide planes would cost ``k * bits`` bits per weight, almost all of
    them spent on the zeros; and a part's grid would have to include 0, widening it again.
  * instead each weight stores one ``bits``-wide integer, on its own cluster's grid, plus a packed
    ``ceil(log2 k)``-bit cluster index, and every (row, group) stores k scale/zero pairs:
    ``W_hat[r, j] = scales[c, r, g] * Q[r, j] + zeros[c, r, g]`` with ``c`` the weight's cluster and
    ``g`` its group. This equals the sum of the k quantized parts, each zero outside its cluster.
  * bits per weight: ``bits + ceil(log2 k) + 2 * 16 * k / group_size`` (the per-tensor grid adds
    ``2 * 16 * k`` bits per matrix); W2 g64 with k=3 is 2 + 2 + 1.5 = 5.5.
Clusters are per layer (as in the paper), from 1-D k-means on all its weights with quantile
initialisation and Lloyd iterations (deterministic). Biases stay in full precision, as in every
hfquant layer, so their split (the paper also clusters them) would change nothing.

Solvers: ``rtn`` rounds each weight on its cluster's min-max grid. ``gptq`` runs GPTQ with that
per-weight grid (a weight is rounded on its own cluster's grid and the error is fed forward as
usual). ``decoupleq`` alternates that integer step with the exact least-squares float step over
all ``k * n_groups`` (scale, zero) pairs of a row: the split layer is the unsplit problem on a
k-times wider input ``[x, x, .., x]`` whose c-th copy holds cluster c's weights (the others masked
out), so decoupleQ's masked float step solves it unchanged, at about ``k**2`` times its cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from hfquant.algorithms.decoupleq import _FloatProblem
from hfquant.algorithms.gptq import gptq_solve, masked_minmax_grid, prepare_hessian
from hfquant.algorithms.grid import cluster_grid, effective_group_size, num_groups

KMEANS_ITERS = 50


@dataclass
class SplitWeight:
    """Integers, cluster index and per-cluster grids of one split linear weight, before packing."""

    qweight: torch.Tensor  # uint8 [out, in], each on its cluster's grid
    cluster: torch.Tensor  # uint8 [out, in], values in [0, k)
    scales: torch.Tensor  # float32 [k, out, n_groups] ([k, 1, 1] per tensor)
    zeros: torch.Tensor  # float32 [k, out, n_groups]

    def dequantize(self, group_size: int) -> torch.Tensor:
        s, z = cluster_grid(self.scales, self.zeros, self.cluster, group_size)
        return self.qweight.float() * s + z


def kmeans_1d(values: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Boundaries (``k - 1``, ascending) of 1-D k-means clusters of ``values``.

    Quantile initialisation, then Lloyd iterations; in 1-D every cluster is an interval of the
    sorted values, so an iteration is a search of the midpoints plus prefix sums.
    """
    v = values.detach().float().flatten().sort().values
    n = v.numel()
    centers = v[((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp_max(n - 1)].double()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), v.double().cumsum(0)])
    for _ in range(iters):
        bounds = (centers[1:] + centers[:-1]) / 2
        edges = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(v.double(), bounds), torch.tensor([n])])
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        if torch.equal(new, centers):
            break
        centers = new
    return ((centers[1:] + centers[:-1]) / 2).float()


def cluster_weights(w: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster of every weight (uint8 ``[out, in]``): 0 the lowest values, ``k - 1`` the highest."""
    bounds = kmeans_1d(w, k)
    return torch.bucketize(w.float(), bounds, right=True).to(torch.uint8)


def split_linear(linear: nn.Linear, k: int = 3) -> nn.ModuleList:
    """The paper's split: k linears whose outputs sum to ``linear``'s, each holding one weight cluster.

    Weights and bias are clustered separately by value; each part keeps its clusters' entries and
    zeros elsewhere.
    """
    w = linear.weight.detach()
    wc = cluster_weights(w, k)
    bias = linear.bias
    bc = None if bias is None else cluster_weights(bias.detach()[None], k)[0]
    parts = nn.ModuleList()
    for c in range(k):
        part = nn.Linear(
            linear.in_features, linear.out_features, bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            part.weight.copy_(torch.where(wc == c, w, torch.zeros_like(w)))
            if bias is not None:
                part.bias.copy_(torch.where(bc == c, bias, torch.zeros_like(bias)))
        parts.append(part)
    return parts


def split_minmax_grid(
    w: torch.Tensor, cluster: torch.Tensor, k: int, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of every cluster over its own weights only, per (row, group), in float16 values.

    A (row, group) with no weight of a cluster gets scale 1 and zero 0 (never read).
    """
    grids = [masked_minmax_grid(w, bits, group_size, cluster != c) for c in range(k)]
    return torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids])


def split_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    clusters: int,
    *,
    method: str = "rtn",
    iters: int = 4,
    damp: float = 0.01,
    act_order: bool = True,
) -> SplitWeight:
    """Split ``w`` [out, in] into ``clusters`` value clusters and quantize it with ``method``.

    ``rtn`` needs no ``hessian``; ``gptq`` and ``decoupleq`` minimize
    ``tr((W - W_hat) H (W - W_hat)^T)`` as their unsplit versions do; ``decoupleq`` only accepts a
    step where it lowers a row's objective (the whole layer's for a per-tensor grid).
    """
    w = w.float()
    maxq = 2**bits - 1
    cluster = cluster_weights(w, clusters)
    scales, zeros = split_minmax_grid(w, cluster, clusters, bits, group_size)
    if method == "rtn":
        s, z = cluster_grid(scales, zeros, cluster, group_size)
        q = torch.round((w - z) / s).clamp_(0, maxq).to(torch.uint8)
        return SplitWeight(q, cluster, scales, zeros)
    if method not in ("gptq", "decoupleq"):
        raise ValueError(f"split_quantize: method must be 'rtn', 'gptq' or 'decoupleq', got {method!r}")
    inv = prepare_hessian(hessian, damp, act_order)

    def integer_step(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        grid = cluster_grid(scales, zeros, cluster, group_size)
        return gptq_solve(w, inv, bits, group_size, weight_grid=grid).qweight

    best = SplitWeight(integer_step(scales, zeros), cluster, scales, zeros)
    if method == "gptq":
        return best
    problem, unwide = _wide_problem(w, hessian.float(), cluster, clusters, group_size, damp)
    # Each float step also prices the integers it starts from on the grid they were solved on.
    s, z, obj, best_obj = problem.solve(_wide(best.qweight, clusters, group_size), _wide_grid(best), True)

    def accept(q: torch.Tensor, theta: tuple[torch.Tensor, torch.Tensor], obj: torch.Tensor) -> None:
        nonlocal best_obj
        if problem.shared:  # one grid for all rows: a step is taken whole or not at all
            better = torch.full_like(best_obj, float(obj.sum()) < float(best_obj.sum()), dtype=torch.bool)
        else:
            better = obj < best_obj
        s, z = unwide(theta[0]), unwide(theta[1])
        best.qweight[better] = q[better]
        rows = better[: best.scales.shape[1]]
        best.scales[:, rows] = s[:, rows]
        best.zeros[:, rows] = z[:, rows]
        best_obj = torch.where(better, obj, best_obj)

    accept(best.qweight, (s, z), obj)
    for _ in range(iters):
        grid = _wide_grid(best)
        q = integer_step(best.scales, best.zeros)
        s, z, obj, obj_q = problem.solve(_wide(q, clusters, group_size), grid, True)
        accept(q, grid, obj_q)
        accept(q, (s, z), obj)
    return best


def _group_width(in_features: int, group_size: int) -> tuple[int, int]:
    gs = effective_group_size(in_features, group_size)
    return gs, num_groups(in_features, group_size) * gs


def _wide(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``[out, in]`` to ``[out, k * in_padded]``: k copies, each padded to whole groups."""
    _, padded = _group_width(t.shape[1], group_size)
    t = torch.nn.functional.pad(t.float(), (0, padded - t.shape[1]))
    return t.repeat(1, k)


def _wide_grid(split: SplitWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k, rows, G]`` grids as the wide problem's ``[rows, k * G]`` (cluster-major)."""
    return tuple(t.permute(1, 0, 2).reshape(t.shape[1], -1) for t in (split.scales, split.zeros))


def _wide_problem(
    w: torch.Tensor, hessian: torch.Tensor, cluster: torch.Tensor, k: int, group_size: int, damp: float
):
    """decoupleQ's float problem of the split layer on the k-times wider input ``[x, .., x]``.

    Copy c of the weights holds cluster c (the rest is masked out like kept weights), so
    ``sum_c W_c x = W x`` and its objective is the layer's; ``H`` becomes a k x k tiling of ``H``.
    """
    out_features, in_features = w.shape
    gs, padded = _group_width(in_features, group_size)
    pad = padded - in_features
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad)).repeat(k, k)
    member = torch.nn.functional.pad(cluster.long(), (0, pad), value=-1)
    keep = torch.cat([member != c for c in range(k)], dim=1)
    # Dampening is relative to the mean diagonal of H, which the tiling leaves unchanged.
    problem = _FloatProblem.build(_wide(w, k, group_size), h, gs, keep, damp)
    problem = dataclasses.replace(problem, shared=group_size == 0)
    rows = 1 if group_size == 0 else out_features

    def unwide(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows, k, -1).permute(1, 0, 2).contiguous()

    return problem, unwide
