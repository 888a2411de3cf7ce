"""Projection of per-group float grids onto the values a GGUF block type stores.

A GGUF block type is an affine grid per group (the type's block or sub-block),
``w = s * q + z`` with ``q`` in ``[0, 2**bits - 1]``, whose ``(s, z)`` can only take some values:

* 32-wide blocks: ``s = d``, one float16 per block; the zero is tied, ``z = -offset * d``
  (``q4_0``, ``q5_0``, ``q8_0``), or a free float16 ``m`` (``q4_1``, held in ``dmin``).
* K-quants, super-blocks of 256: ``s = d * sc``, integer sub-block codes ``sc`` under one float16
  ``d`` per super-block (``q3_k``: signed codes with ``z = -4 s``); with mins (``q2_k``, ``q4_k``)
  ``z = -dmin * mn``, unsigned codes ``mn`` under their own float16 ``dmin``.

The type is described by a spec object with the attributes of :class:`GridSpec` (the format
``hfquant.formats.gguf`` defines them: formats may not import solvers, and this module imports
no format). :func:`project` maps any ``(scales, zeros)`` onto the nearest stored values and
returns the codes with the grid they encode, exactly as llama.cpp decodes it (float32 products
of a float16 factor and a small integer are exact). decoupleQ's float step projects after each
solve (:mod:`hfquant.algorithms.decoupleq`), so its integer step solves against the stored grid,
and block-wise minimization scores and keeps only projected grids
(:mod:`hfquant.algorithms.blockwise`).

Where this departs from llama.cpp's quantizers (``ggml-quants.c``), which fit each block to the
weights: here the grid to fit is a solver's per-group ``(s, z)``, not the weights. Sub-block
codes are chosen by searching the super-block factor: every ``d`` that puts the group of
largest magnitude exactly on a code (``ref / k`` for each nonzero code ``k``), each also refitted
by weighted least squares, keeping the candidate of least weighted squared error in ``(s, z)``
(llama.cpp takes ``max / code_max`` and rounds, ``make_qkx2_quants`` aside). Because a grid that is
already stored is among the candidates with error 0, projecting is idempotent: the codes of a
projected grid can always be read back from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hfquant.algorithms.grid import QuantizedWeight

# Rows projected at once by the K-quant code search (bounds its [rows, blocks, candidates, groups] tensors).
_ROW_CHUNK = 256


class GridSpec(Protocol):
    """What :func:`project` needs to know of a GGUF block type."""

    name: str
    bits: int  # width of the integers q
    group_size: int  # columns per (s, z): the type's block (32) or sub-block (16, 32)
    block_size: int  # columns per float16 factor d (32, or 256 for the K-quants)
    offset: int | None  # tied zero z = -offset * s; None: a free zero
    scale_codes: tuple[int, int] | None  # range of the sub-block scale codes; None: s = d
    min_codes: tuple[int, int] | None  # range of the sub-block min codes; None: z = dmin (or tied)


@dataclass
class BlockCodes:
    """The stored values of one weight's grid, and the grid they encode.

    ``d`` and ``dmin`` are float16 ``[out, in // block_size]`` (``dmin`` is None for tied zeros;
    it is ``q4_1``'s ``m`` and the K-quants' ``dmin``); ``sc``/``mn`` int8 ``[out, n_groups]`` or
    None; ``scales``/``zeros`` float32 ``[out, n_groups]``: ``d * sc`` (or ``d``) and
    ``-offset * scales``, ``dmin``, or ``-dmin * mn``.
    """

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    mn: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor


@dataclass
class BlockGridWeight(QuantizedWeight):
    """A solver's result on a GGUF type's grid: integers, the grid, and the codes that store it."""

    codes: BlockCodes | None = None


def project(
    spec: GridSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    importance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockCodes:
    """The stored values nearest to the grid ``(scales, zeros)`` ``[out, n_groups]``.

    ``importance`` weights each group's scale and zero error (non-negative ``[out, n_groups]``
    each; decoupleQ passes the diagonal of its float step's normal matrix); without it every group
    counts alike. A tied zero first gets the scale whose levels ``s * (q - offset)`` fit the given
    levels ``s * q + z`` best in least squares, so each integer keeps its place (a tied grid is
    returned as it is); a grid far from tied, such as a min-max start, goes through
    :func:`cover_range` first.
    """
    scales, zeros = scales.float(), zeros.float()
    ws, wz = importance if importance is not None else (torch.ones_like(scales), torch.ones_like(zeros))
    if spec.offset is not None:
        # Least squares over the levels, integer by integer: the integers keep their meaning.
        levels = torch.arange(2**spec.bits, dtype=torch.float64, device=scales.device)
        centred = levels - spec.offset
        given = scales.double()[..., None] * levels + zeros.double()[..., None]
        scales = ((given * centred).sum(-1) / (centred * centred).sum()).float()
    per = spec.block_size // spec.group_size  # groups per float16 factor
    if spec.scale_codes is None:
        d, sc = scales.half(), None
        eff_s = d.float()
    else:
        d, sc = _fit_codes(scales, ws, per, spec.scale_codes)
        eff_s = _decode(d, sc, per)
    if spec.offset is not None:
        return BlockCodes(d, None, sc, None, eff_s, -spec.offset * eff_s)
    if spec.min_codes is None:
        dmin = zeros.half()
        return BlockCodes(d, dmin, sc, None, eff_s, dmin.float())
    dmin, mn = _fit_codes(-zeros, wz, per, spec.min_codes)
    return BlockCodes(d, dmin, sc, mn, eff_s, -_decode(dmin, mn, per))


def cover_range(spec: GridSpec, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a tied type, the tied grid spanning the range of ``(scales, zeros)`` (e.g. min-max): the end
    level of larger magnitude goes to ``q = 0``, as llama.cpp's ``q4_0``/``q8_0``/``q3_k`` put a block's
    largest weight on ``-offset`` (the grid reaches one step further on that side; the scale turns
    negative when that weight is positive). Other types: unchanged."""
    if spec.offset is None:
        return scales, zeros
    first, last = zeros.float(), zeros.float() + (2**spec.bits - 1) * scales.float()
    tied = -torch.where(first.abs() >= last.abs(), first, last) / spec.offset
    return tied, -spec.offset * tied


def _decode(factor: torch.Tensor, codes: torch.Tensor, per: int) -> torch.Tensor:
    """``factor * code`` per group (float32, exact), ``factor`` shared by ``per`` consecutive groups."""
    return factor.float().repeat_interleave(per, dim=1) * codes.float()


def _fit_codes(
    values: torch.Tensor, weight: torch.Tensor, per: int, code_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 factor per ``per`` groups and integer codes in ``code_range`` with ``factor * code``
    nearest to ``values`` in weighted squared error (see the module docstring for the search)."""
    rows = values.shape[0]
    d_out, c_out = [], []
    for r0 in range(0, rows, _ROW_CHUNK):
        v = values[r0 : r0 + _ROW_CHUNK].float()
        w = weight[r0 : r0 + _ROW_CHUNK].float()
        d, c = _fit_codes_rows(v.reshape(v.shape[0], -1, per), w.reshape(w.shape[0], -1, per), code_range)
        d_out.append(d)
        c_out.append(c.reshape(v.shape))
    return torch.cat(d_out), torch.cat(c_out)


def _fit_codes_rows(
    v: torch.Tensor, w: torch.Tensor, code_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = code_range
    ks = torch.tensor([k for k in range(lo, hi + 1) if k], dtype=torch.float32, device=v.device)
    ref = v.gather(-1, v.abs().argmax(-1, keepdim=True))  # [R, B, 1]: the group of largest magnitude
    w = w + 1e-12 * w.mean().clamp_min(1e-30)  # a zero-weight group still breaks ties toward its value

    def codes_for(d: torch.Tensor) -> torch.Tensor:  # d [R, B, K] -> codes [R, B, K, per]
        safe = torch.where(d == 0, torch.ones_like(d), d)
        c = torch.round(v[..., None, :] / safe[..., None]).clamp(lo, hi)
        return torch.where(d[..., None] == 0, torch.zeros_like(c), c)

    d_hit = (ref / ks).half().float()  # [R, B, K]: ref lands exactly on code k
    c_hit = codes_for(d_hit)
    wc = w[..., None, :] * c_hit
    den = (wc * c_hit).sum(-1)
    d_ls = torch.where(den > 0, (wc * v[..., None, :]).sum(-1) / den.clamp_min(1e-30), d_hit).half().float()
    d_all = torch.cat([d_hit, d_ls], dim=-1)
    c_all = torch.cat([c_hit, codes_for(d_ls)], dim=-2)
    err = (w[..., None, :] * (v[..., None, :] - d_all[..., None] * c_all) ** 2).sum(-1)
    best = err.argmin(-1, keepdim=True)  # [R, B, 1]
    d = d_all.gather(-1, best)[..., 0]
    c = c_all.gather(-2, best[..., None].expand(*best.shape, v.shape[-1]))[..., 0, :]
    return d.half(), c.to(torch.int8)
