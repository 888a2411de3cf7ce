"""The value grids that solvers round to and stored formats decode, shared by both.

The per-group affine grid of most methods, ``W_hat = scales * Q + zeros``; SplitQuant's
per-cluster affine grids; INQ's signed powers of two. Formats (:mod:`hfquant.formats`) import
this module and nothing else of :mod:`hfquant.algorithms`, so loading a checkpoint imports no
solver.

``Q`` holds integers in ``[0, 2**bits - 1]``; ``scales`` and ``zeros`` are floats per
(output row, input group). Groups are contiguous column ranges of ``group_size``; when
``group_size`` does not divide the input width the last group is shorter (576-wide layers
with group 128 end in a group of 64). ``group_size=-1`` means one group per output row; ``group_size=0`` means one scale and zero for
the whole matrix, stored once as ``[1, 1]`` tensors that broadcast over the rows (per-tensor).
The offset form (decoupleQ's ``s * Q + z``) keeps the float part linear in its unknowns,
which is what makes the closed-form float step of decoupleQ a plain least-squares solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Integers and float grid of one linear weight, before packing."""

    qweight: torch.Tensor  # uint8 [out, in], values in [0, 2**bits - 1]
    scales: torch.Tensor  # float32 [out, n_groups], or [1, 1] per tensor
    zeros: torch.Tensor  # float32 [out, n_groups], or [1, 1] per tensor

    def dequantize(self, group_size: int) -> torch.Tensor:
        return dequantize_grid(self.qweight, self.scales, self.zeros, group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """Group width in columns; ``-1`` (per output channel) and ``0`` (per tensor) span the whole row."""
    return in_features if group_size in (-1, 0) else group_size


def grid_shape(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """Shape of the stored scales and zeros: ``[out, n_groups]``, or ``[1, 1]`` per tensor."""
    if group_size == 0:
        return 1, 1
    return out_features, num_groups(in_features, group_size)


def num_groups(in_features: int, group_size: int) -> int:
    gs = effective_group_size(in_features, group_size)
    return -(-in_features // gs)


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group number of every input column (long ``[in]``), ragged last group included."""
    gs = effective_group_size(in_features, group_size)
    return torch.arange(in_features, device=device) // gs


def expand_groups(params: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Broadcast ``[out, n_groups]`` grid parameters to ``[out, in]`` (``[1, in]`` per tensor)."""
    return params[:, group_index(in_features, group_size, params.device)]


def minmax_grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid per group: the range of each group maps onto ``[0, 2**bits-1]``."""
    maxq = 2**bits - 1
    out_features, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    ng = num_groups(in_features, group_size)
    w = w.float()
    pad = ng * gs - in_features
    if pad:
        # Pad the ragged last group with its own first value so padding never widens the range.
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    groups = w.reshape(out_features, ng, gs)
    if group_size == 0:
        groups = groups.reshape(1, 1, -1)
    wmin = groups.amin(dim=2)
    wmax = groups.amax(dim=2)
    scales = (wmax - wmin) / maxq
    # A constant group has no range: any positive scale reproduces it exactly with Q = 0.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return scales, wmin


def quantize_to_grid(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Nearest integer on a fixed grid, clamped to the bit range (uint8 ``[out, in]``)."""
    in_features = w.shape[1]
    s = expand_groups(scales, in_features, group_size)
    z = expand_groups(zeros, in_features, group_size)
    q = torch.round((w.float() - z) / s).clamp_(0, 2**bits - 1)
    return q.to(torch.uint8)


def dequantize_grid(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``scales * Q + zeros`` as a float32 ``[out, in]`` matrix."""
    in_features = qweight.shape[1]
    s = expand_groups(scales.float(), in_features, group_size)
    z = expand_groups(zeros.float(), in_features, group_size)
    return qweight.float() * s + z


def grid_at(params: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, in_features: int, group_size: int):
    """Grid parameters of the weights at ``(rows, cols)`` (a per-tensor grid has one value for all)."""
    groups = cols // effective_group_size(in_features, group_size)
    return params[rows if params.shape[0] > 1 else torch.zeros_like(rows), groups]


def layer_objective(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the layer's output error on its calibration inputs."""
    err = (w.float() - w_hat.float()).double()
    return float(torch.einsum("oi,ij,oj->", err, hessian.double(), err))


def grid_values(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``scales * Q + zeros`` at the positions ``(rows, cols)`` only, in float32, with the same
    arithmetic as :func:`dequantize_grid`."""
    in_features = qweight.shape[1]
    s = grid_at(scales.float(), rows, cols, in_features, group_size)
    return qweight[rows, cols].float() * s + grid_at(zeros.float(), rows, cols, in_features, group_size)


# SplitQuant: k affine grids per (row, group), each weight on its own cluster's grid.


def index_bits(clusters: int) -> int:
    """Bits of one packed cluster index."""
    return max(1, math.ceil(math.log2(clusters)))


def cluster_grid(
    scales: torch.Tensor, zeros: torch.Tensor, cluster: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's own scale and zero (float32 ``[out, in]``), read from its cluster's grid."""
    out_features, in_features = cluster.shape
    rows = torch.arange(out_features, device=cluster.device)[:, None] if scales.shape[1] > 1 else 0
    groups = group_index(in_features, group_size, cluster.device)[None, :]
    index = (cluster.long(), rows, groups)  # broadcast to [out, in]
    return scales.float()[index], zeros.float()[index]


# INQ: zero or a signed power of two, ``2^(bits-2)`` exponents below each row's top exponent n1.

EXPONENT_RANGE = (-100, 100)  # n1 is stored as int8; rows of all zeros get the lowest


def exponent_count(bits: int) -> int:
    """Exponents ``n1 - n2 + 1 = 2^(b-1) / 2`` of a ``bits``-bit INQ code."""
    return 2 ** (bits - 2)


def top_exponents(w: torch.Tensor) -> torch.Tensor:
    """``n1 = floor(log2(4 * max|w| / 3))`` of every row (int8 ``[out]``)."""
    peak = w.detach().float().abs().amax(dim=1)
    n1 = torch.floor(torch.log2(4.0 * peak / 3.0))
    n1 = torch.where(peak > 0, n1, torch.full_like(n1, EXPONENT_RANGE[0]))
    return n1.clamp(*EXPONENT_RANGE).to(torch.int8)


def power_of_two_codes(w: torch.Tensor, n1: torch.Tensor, bits: int) -> torch.Tensor:
    """Code of the nearest allowed value of every weight (uint8 ``[out, in]``).

    ``|w|`` in ``[3/4 2^m, 3/2 2^m)`` is nearest to ``2^m``, so ``m = floor(log2(4|w|/3))``, capped at
    ``n1``; below ``2^n2`` the choice is between ``2^n2`` and zero, split at ``2^(n2-1)``.
    """
    e = exponent_count(bits)
    a = w.detach().float().abs()
    top = n1.float()[:, None]
    m = torch.floor(torch.log2(4.0 * a / 3.0)).clamp_max(top)  # -inf for a zero weight
    step = (top - m).clamp_max(e - 1)
    zero = a < torch.exp2(top - e)  # half of the smallest power 2^n2 = 2^(n1 - e + 1)
    code = torch.where(zero, torch.zeros_like(step), step + 1 + e * (w < 0))
    return code.to(torch.uint8)


def power_of_two_values(codes: torch.Tensor, n1: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`power_of_two_codes` (float32 ``[out, in]``)."""
    e = exponent_count(bits)
    c = codes.long()
    negative = c > e
    step = torch.where(negative, c - e, c) - 1  # exponent below n1; -1 for zero
    value = torch.exp2(n1.float()[:, None] - step.clamp_min(0))
    value = torch.where(c == 0, torch.zeros_like(value), value)
    return torch.where(negative, -value, value)
