"""GGUF export for llama.cpp: ``save_gguf(model, tokenizer, path, type="q4_1")``.

The metadata (architecture hyperparameters, tokenizer, chat template) and the Hugging Face to GGUF
tensor names, with the Llama q/k row permutation, come from llama.cpp's own converter
(``convert_hf_to_gguf.py`` and its ``conversion`` package) in the llama.cpp source that ``make
llamacpp`` unpacks under ``.venv/llama.cpp`` (``$HFQUANT_LLAMACPP_SRC`` overrides). Tensors are
written with the ``gguf`` package's ``GGUFWriter``.

Block types (``GGUF_TYPES``): ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0`` (blocks of 32),
``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k`` (super-blocks of 256), ``f16`` / ``f32``, and
llama-quantize's per-tensor mixes ``q2_k_m`` (its ``Q2_K`` file), ``q3_k_s``, ``q3_k_m``, ``q3_k_l``,
``q4_k_s``, ``q4_k_m``, ``q5_k_s``, ``q5_k_m`` (each weight's type by its role and block,
:mod:`hfquant.formats.gguf_presets`). How each weight is written:

* **lossless**: a ``GGUFLinear`` (a model quantized with ``HfQuantConfig(gguf_type=...)``, solved
  on the type's grid, :mod:`hfquant.formats.gguf`) is written from its stored integers and codes
  when the type written is its own (its fallback included); so is a ``DecoupledLinear`` whose
  stored grid is exactly the type's grid (W4 g32 with float16 scale and zero is ``Q4_1``:
  ``w = d * q + m``; a W4 g32 grid with ``zero = -8 * scale`` is ``Q4_0``).
* **requantized**: any other weight is dequantized and quantized to the type: with
  ``gguf.quants.quantize`` for the 32-blocks, with :func:`quantize_k` (searched sub-block grids,
  4-, 6- or 8-bit sub-block scales under float16 super-block factors) for the K-quants, which
  ``gguf`` can only dequantize.
* **fallback**: a row length the type cannot hold gets the type llama.cpp's ``llama-quantize``
  falls back to (``tensor_type_fallback``): ``q2_k`` and ``q3_k`` -> ``q4_0``, ``q4_k`` -> ``q5_0``,
  ``q5_k`` -> ``q5_1``, ``q6_k`` -> ``q8_0``; a row that is not a multiple of 32 either -> ``f16``.
  The export summary lists every fallback.

Embedding and output head: ``embedding_type`` / ``output_type``. As in llama.cpp's presets the
output head defaults to ``q6_k`` (``q8_0`` for a ``q8_0`` file, the float type for a float file),
whose rows fall back to ``q8_0`` where they are not a multiple of 256 (the default model's 576);
with tied embeddings the token embedding is the output head and gets the output type, otherwise it
gets the main type (a preset's base type), with its fallback. 1-D tensors (norms, biases) are F32, and
so are the tensors llama.cpp never quantizes (MoE routers, ``ffn_gate_inp``: ``_F32_TENSORS``).

GGUF has no sparse 16-bit weights: models with kept weights (``kept_fraction > 0``) are refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfquant.export.llamacpp import LLAMACPP_SDIST_VERSION, llamacpp_source
from hfquant.formats.gguf import FALLBACK, GGUF_GRIDS, K_QUANTS, GGUFLinear
from hfquant.formats.gguf_presets import GGUF_PRESETS, LLAMA_QUANTIZE_NAMES, MixShape, block_index, layer_type
from hfquant.nn.experts import ExpertLinears, is_fused_experts

# Every type a tensor can be written as (the block grids hfquant solves on, and the float types):
# the allowed values of ``embedding_type`` / ``output_type``; ``type`` may also be a preset.
GGUF_TYPES = (*GGUF_GRIDS, "f16", "f32")
# The general.file_type written for each main type (llama.cpp's names for the mostly-X files).
_FILE_TYPE = {
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0",
    "q2_k": "MOSTLY_Q2_K",
    "q3_k": "MOSTLY_Q3_K_S",
    "q4_k": "MOSTLY_Q4_K_S",
    "q5_k": "MOSTLY_Q5_K_S",
    "q6_k": "MOSTLY_Q6_K",
    **{preset: f"MOSTLY_{name}" for preset, name in LLAMA_QUANTIZE_NAMES.items()},  # the mixes' own file types
    "f16": "MOSTLY_F16",
    "f32": "ALL_F32",
}
QK_K = 256


class GGUFExportError(ValueError):
    """A model, option or path that cannot be exported to GGUF (the message says why)."""


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dev dependency
        raise ImportError("GGUF export needs the 'gguf' package: pip install gguf") from err
    return gguf


def qtype_of(name: str):
    """``gguf.GGMLQuantizationType`` of a type name (``"q4_1"``, ``"Q4_K"``, ``"f16"``, ...)."""
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise GGUFExportError(f"unknown GGUF type {name!r}") from None


def check_type(name: str, what: str = "type", presets: bool = False) -> str:
    """``name`` lower-cased if it is a GGUF type (or, with ``presets``, a llama-quantize mix)."""
    key = str(name).lower()
    allowed = (*GGUF_TYPES, *GGUF_PRESETS) if presets else GGUF_TYPES
    if key not in allowed:
        raise GGUFExportError(f"unsupported GGUF {what} {name!r}: expected one of {', '.join(allowed)}")
    return key


# --------------------------------------------------------------------------------------------------
# Blocks: the integers and scales each type stores, packed into GGUF's byte layout.
# --------------------------------------------------------------------------------------------------


@dataclass
class GGUFBlocks:
    """The values one GGUF block type stores for a ``[rows, cols]`` weight, before byte packing.

    ``q`` holds the unsigned stored integers ``[rows, n_blocks, block_size]``; the other fields are
    per block (``[rows, n_blocks]``, float16) or per sub-block (``[rows, n_blocks, n_sub]``, the
    small integers). Dequantized weight, per type:

    * ``q4_0``: ``d * (q - 8)``; ``q4_1``: ``d * q + m``; ``q5_0``: ``d * (q - 16)``;
      ``q5_1``: ``d * q + m``; ``q8_0``: ``d * (q - 128)``
    * ``q2_k``: ``d * sc * q - dmin * mn`` (16 sub-blocks of 16, 4-bit ``sc``, ``mn``, 2-bit ``q``)
    * ``q3_k``: ``d * (sc - 32) * (q - 4)`` (16 sub-blocks of 16, 6-bit ``sc``, 3-bit ``q``)
    * ``q4_k`` / ``q5_k``: ``d * sc * q - dmin * mn`` (8 sub-blocks of 32, 6-bit ``sc``, ``mn``,
      4- or 5-bit ``q``)
    * ``q6_k``: ``d * sc * (q - 32)`` (16 sub-blocks of 16, signed 8-bit ``sc``, 6-bit ``q``)

    A solver that works on a type's grid hands these over and the export writes them unchanged.
    """

    qtype: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None  # q4_1, q5_1
    dmin: np.ndarray | None = None  # k-quants with mins
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, nb, bs = self.q.shape
        return rows, nb * bs

    def take_rows(self, index: np.ndarray) -> GGUFBlocks:
        def pick(a):
            return None if a is None else a[index]

        return GGUFBlocks(self.qtype, self.q[index], self.d[index], pick(self.m), pick(self.dmin), pick(self.sc), pick(self.mn))

    def dequantize(self) -> np.ndarray:
        """The weight these values encode (float32 ``[rows, cols]``), from the formulas above."""
        rows, cols = self.shape
        q = self.q.astype(np.float32)
        d = self.d.astype(np.float32)[..., None]
        t = self.qtype
        if t == "q4_0":
            w = d * (q - 8)
        elif t in ("q4_1", "q5_1"):
            w = d * q + self.m.astype(np.float32)[..., None]
        elif t == "q5_0":
            w = d * (q - 16)
        elif t == "q8_0":
            w = d * (q - 128)
        else:
            n_sub = self.sc.shape[-1]
            q = q.reshape(rows, -1, n_sub, QK_K // n_sub)
            sc = self.sc.astype(np.float32)[..., None]
            if t == "q3_k":
                w = d[..., None] * (sc - 32) * (q - 4)
            elif t == "q6_k":
                w = d[..., None] * sc * (q - 32)
            else:
                w = d[..., None] * sc * q - self.dmin.astype(np.float32)[..., None, None] * self.mn.astype(np.float32)[..., None]
        return w.reshape(rows, cols).astype(np.float32)

    def pack(self) -> np.ndarray:
        """GGUF's bytes: uint8 ``[rows, bytes_per_row]`` (what ``gguf.quants.quantize`` returns)."""
        rows, nb, _ = self.q.shape
        q = self.q.astype(np.uint8).reshape(rows * nb, -1)

        def f16(a):
            return np.ascontiguousarray(a, dtype=np.float16).reshape(rows * nb, 1).view(np.uint8)

        t = self.qtype
        if t in ("q4_0", "q4_1"):
            qs = q[:, :16] | (q[:, 16:] << 4)
            parts = [f16(self.d)] + ([f16(self.m)] if t == "q4_1" else []) + [qs]
        elif t in ("q5_0", "q5_1"):
            qh = ((q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
            qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
            m = [f16(self.m)] if t == "q5_1" else []
            parts = [f16(self.d), *m, qh.astype("<u4").reshape(-1, 1).view(np.uint8), qs]
        elif t == "q8_0":
            parts = [f16(self.d), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        elif t == "q2_k":
            sc = self.sc.astype(np.uint8).reshape(rows * nb, 16) | (self.mn.astype(np.uint8).reshape(rows * nb, 16) << 4)
            parts = [sc, _pack_2bit(q), f16(self.d), f16(self.dmin)]
        elif t == "q3_k":
            s = self.sc.astype(np.uint8).reshape(rows * nb, 16)
            low, high = s & 0xF, s >> 4
            scales = np.concatenate(
                [low[:, :8] | (low[:, 8:] << 4), (high.reshape(-1, 4, 4) << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(1, dtype=np.uint8)],
                axis=1,
            )
            hmask = ((q >> 2).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
            parts = [hmask, _pack_2bit(q & 3), scales, f16(self.d)]
        elif t in ("q4_k", "q5_k"):
            sc = self.sc.astype(np.uint8).reshape(rows * nb, 8)
            mn = self.mn.astype(np.uint8).reshape(rows * nb, 8)
            scales = np.concatenate(
                [
                    sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                    mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                    (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
                ],
                axis=1,
            )
            q4 = (q & 0xF).reshape(-1, 4, 2, 32)
            qs = (q4[:, :, 0] | (q4[:, :, 1] << 4)).reshape(-1, 128)
            if t == "q4_k":
                parts = [f16(self.d), f16(self.dmin), scales, qs]
            else:  # bit k of qh[j]: the fifth bit of value 32 k + j
                qh = ((q >> 4).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
                parts = [f16(self.d), f16(self.dmin), scales, qh, qs]
        elif t == "q6_k":
            # per 128 values: ql[l] = low nibbles of values l and l + 64, ql[32 + l] of l + 32 and l + 96;
            # qh[l] = the high 2 bits of values l, l + 32, l + 64, l + 96 at bits 0, 2, 4, 6
            q6 = q.reshape(-1, 2, 4, 32)
            low = q6 & 0xF
            ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
            qh = ((q6 >> 4) << (np.arange(4, dtype=np.uint8) * 2)[:, None]).sum(2, dtype=np.uint8)
            scales = self.sc.astype(np.int8).reshape(rows * nb, 16).view(np.uint8)
            parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), scales, f16(self.d)]
        else:
            raise GGUFExportError(f"no block packing for {t}")
        return np.concatenate(parts, axis=1).reshape(rows, -1)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """256 2-bit values per row into 64 bytes: value ``h*128 + s*32 + l`` at bits ``2s`` of byte ``h*32 + l``."""
    q = q.reshape(-1, 2, 4, 32)
    return (q << (np.arange(4, dtype=np.uint8) * 2)[:, None]).sum(2, dtype=np.uint8).reshape(-1, 64)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _search_subblock_grid(x: np.ndarray, weight: np.ndarray, nmax: int, symmetric: bool, steps: int = 20):
    """Per sub-block (last axis) float grid ``x ~ scale * L + offset``: try ``steps + 1`` inverse scales
    around the min-max one, round, fit scale (and offset <= 0 when asymmetric) by weighted least
    squares, keep the best (llama.cpp's make_qkx2_quants search, vectorized)."""
    delta = np.arange(steps + 1, dtype=np.float32) / steps * 2 - 1  # -1 .. 1
    flip = None
    if symmetric:
        # Signed grid -half .. half-1: put each sub-block's largest magnitude on the negative side,
        # where the grid reaches one step further.
        half = (nmax + 1) // 2
        big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
        flip = np.where(big > 0, -1.0, 1.0).astype(np.float32)
        x = x * flip
        amax = np.abs(big)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(amax > 0, (half + delta) / amax, 0)[..., None]
    else:
        lo = np.minimum(x.min(-1, keepdims=True), 0)
        span = x.max(-1, keepdims=True) - lo
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(span > 0, (nmax + delta) / span, 0)[..., None]  # [..., C, 1]
    xs, ws = x[..., None, :], weight[..., None, :]
    if symmetric:
        L = np.clip(np.rint(xs * iscale), -half, half - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            den = (ws * L * L).sum(-1)
            a = np.where(den > 0, (ws * xs * L).sum(-1) / den, 0)
        b = np.zeros_like(a)
    else:
        L = np.clip(np.rint((xs - lo[..., None]) * iscale), 0, nmax)
        sw, sl, sl2 = ws.sum(-1), (ws * L).sum(-1), (ws * L * L).sum(-1)
        sx, sxl = (ws * xs).sum(-1), (ws * xs * L).sum(-1)
        det = sw * sl2 - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(det > 0, (sw * sxl - sx * sl) / det, 0)
            b = np.where(det > 0, (sl2 * sx - sl * sxl) / det, 0)
            clipped = b > 0  # the K-quant offset is -dmin * mn <= 0
            a = np.where(clipped, np.where(sl2 > 0, sxl / sl2, 0), a)
            b = np.where(clipped, 0, b)
    err = (ws * (a[..., None] * L + b[..., None] - xs) ** 2).sum(-1)
    best = err.argmin(-1)[..., None]
    a, b = np.take_along_axis(a, best, -1)[..., 0], np.take_along_axis(b, best, -1)[..., 0]
    return (a * flip[..., 0], b) if symmetric else (a, b)


# Weights quantized at once by quantize_k: its grid search holds ~21 candidates per weight, so a large
# output head (e.g. 128k x 4096) goes through in row chunks of about this many weights.
_K_CHUNK = 1 << 20


def quantize_k(w: np.ndarray, qtype: str) -> GGUFBlocks:
    """Quantize ``[rows, cols]`` (cols a multiple of 256) to a K-quant's blocks, in row chunks of
    about ``_K_CHUNK`` weights (:func:`_quantize_k_rows`)."""
    step = max(1, _K_CHUNK // max(1, w.shape[1]))
    parts = [_quantize_k_rows(w[r : r + step], qtype) for r in range(0, w.shape[0], step)]
    if len(parts) == 1:
        return parts[0]

    def cat(name: str):
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else np.concatenate(values)

    return GGUFBlocks(qtype, *(cat(n) for n in ("q", "d", "m", "dmin", "sc", "mn")))


def _quantize_k_rows(w: np.ndarray, qtype: str) -> GGUFBlocks:
    """Quantize ``[rows, cols]`` (cols a multiple of 256) to a K-quant's blocks.

    Each sub-block's grid (scale and non-positive offset for ``q2_k`` / ``q4_k`` / ``q5_k``, a
    signed scale for ``q3_k`` / ``q6_k``) is searched as llama.cpp's reference quantizer does
    (weights ``|x|``, ``x**2`` or ``rms + |x|`` as it uses them), the sub-block scales are rounded to
    their 4-, 6- or 8-bit integers under the super-block's float16 factors, and the weights are
    rounded on the grid those stored values give.
    """
    rows, cols = w.shape
    n_sub = {"q2_k": 16, "q3_k": 16, "q4_k": 8, "q5_k": 8, "q6_k": 16}[qtype]
    sub = w.astype(np.float32).reshape(rows, cols // QK_K, n_sub, QK_K // n_sub)
    if qtype in ("q3_k", "q6_k"):
        # signed integers -half .. half - 1 (stored + half), signed codes: q3_k's 6-bit (stored + 32),
        # q6_k's int8; the sub-block of largest scale gets the most negative code, as in llama.cpp
        half, code = (4, 32) if qtype == "q3_k" else (32, 128)
        scale, _ = _search_subblock_grid(sub, np.ones_like(sub), 2 * half - 1, symmetric=True)
        jmax = np.abs(scale).argmax(-1)[..., None]
        d = _f16(-np.take_along_axis(scale, jmax, -1)[..., 0] / code)
        df = d.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(df[..., None] != 0, np.rint(scale / df[..., None]), 0).clip(-code, code - 1)
            step = (df[..., None] * sc)[..., None]
            qv = np.where(step != 0, np.rint(sub / step), 0).clip(-half, half - 1)
        stored_sc = (sc + 32).astype(np.uint8) if qtype == "q3_k" else sc.astype(np.int8)
        return GGUFBlocks(qtype, (qv + half).astype(np.uint8).reshape(rows, -1, QK_K), d, sc=stored_sc)
    nmax, smax = {"q2_k": (3, 15), "q4_k": (15, 63), "q5_k": (31, 63)}[qtype]
    if qtype == "q2_k":
        weight = np.abs(sub)
    else:
        weight = np.sqrt((sub * sub).mean(-1, keepdims=True)) + np.abs(sub)
    scale, offset = _search_subblock_grid(sub, weight, nmax, symmetric=False)
    mins = -offset
    d = _f16(scale.max(-1) / smax)
    dmin = _f16(mins.max(-1) / smax)
    df, dminf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df != 0, np.rint(scale / df), 0).clip(0, smax)
        mn = np.where(dminf != 0, np.rint(mins / dminf), 0).clip(0, smax)
        step = (df * sc)[..., None]
        qv = np.where(step != 0, np.rint((sub + (dminf * mn)[..., None]) / step), 0).clip(0, nmax)
    return GGUFBlocks(
        qtype, qv.astype(np.uint8).reshape(rows, -1, QK_K), d, dmin=dmin, sc=sc.astype(np.uint8), mn=mn.astype(np.uint8)
    )


def quantize_tensor(w: np.ndarray, qtype: str) -> np.ndarray:
    """Bytes (uint8 ``[..., rows, bytes_per_row]``) or float array of ``w`` (2D, or 3D experts) in ``qtype``.

    The K-quants go through :func:`quantize_k`; every other type is ``gguf.quants.quantize``.
    """
    if qtype in K_QUANTS:
        return quantize_k(w.reshape(-1, w.shape[-1]), qtype).pack().reshape(*w.shape[:-1], -1)
    return _gguf().quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype_of(qtype))


def block_size(qtype: str) -> int:
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[qtype_of(qtype)][0]


def stored_blocks(module: nn.Module, qtype: str) -> GGUFBlocks | None:
    """The blocks a quantized layer already stores in ``qtype`` (:func:`gguf_layer_blocks`,
    :func:`decoupled_blocks`), or None when it must be requantized."""
    if isinstance(module, GGUFLinear):
        return gguf_layer_blocks(module) if module.grid.name == qtype else None
    return decoupled_blocks(module, qtype)


def gguf_layer_blocks(module: GGUFLinear) -> GGUFBlocks:
    """A ``GGUFLinear``'s integers and codes as the blocks of its type."""
    grid, rows = module.grid, module.out_features
    q = module.integers().cpu().numpy().reshape(rows, -1, grid.block_size)

    def codes(name: str, shift: int = 0):
        t = getattr(module, name).detach().cpu()
        return (t.short() + shift).numpy().astype(np.uint8).reshape(rows, q.shape[1], -1)

    d = module.d.detach().cpu().numpy()
    if grid.scale_codes is None:
        m = None if grid.offset is not None else module.dmin.detach().cpu().numpy()
        return GGUFBlocks(grid.name, q, d, m=m)
    if grid.min_codes is None:  # q3_k: llama.cpp stores the signed code plus 32; q6_k: as int8
        if grid.name == "q6_k":
            return GGUFBlocks(grid.name, q, d, sc=module.sc.detach().cpu().numpy().reshape(rows, q.shape[1], -1))
        return GGUFBlocks(grid.name, q, d, sc=codes("sc", 32))
    return GGUFBlocks(grid.name, q, d, dmin=module.dmin.detach().cpu().numpy(), sc=codes("sc"), mn=codes("mn"))


def decoupled_blocks(module: nn.Module, qtype: str) -> GGUFBlocks | None:
    """The stored values of a ``DecoupledLinear`` as ``qtype`` blocks when its grid *is* that type's
    grid (W4 g32, float16 scale and zero: ``q4_1``; also ``q4_0`` when every zero is
    ``-8 * scale``), else None (the weight must be requantized)."""
    from hfquant.nn import DecoupledLinear

    if not isinstance(module, DecoupledLinear) or qtype not in ("q4_0", "q4_1"):
        return None
    if module.bits != 4 or module.group_size != 32 or module.in_features % 32 or kept_weights(module):
        return None
    scales, zeros = module.scales.detach().cpu(), module.zeros.detach().cpu()
    d, m = scales.to(torch.float16), zeros.to(torch.float16)
    if not (torch.equal(d.float(), scales.float()) and torch.equal(m.float(), zeros.float())):
        return None  # not float16 values: the stored grid is finer than GGUF's
    rows = module.out_features
    q = module.integers().cpu().numpy().reshape(rows, -1, 32)
    if qtype == "q4_1":
        return GGUFBlocks("q4_1", q, d.numpy(), m=m.numpy())
    if not torch.equal(m.float(), (-8 * d.float()).to(torch.float16).float()) or not torch.equal(
        (-8 * d.float()).to(torch.float16).float(), -8 * d.float()
    ):
        return None
    return GGUFBlocks("q4_0", q, d.numpy())


# --------------------------------------------------------------------------------------------------
# llama.cpp's converter and tools
# --------------------------------------------------------------------------------------------------


def _converter_class(arch: str):
    """llama.cpp's converter class for a Hugging Face architecture name."""
    src = llamacpp_source()
    if not (src / "conversion" / "__init__.py").is_file():
        raise GGUFExportError(
            f"llama.cpp's converter is not at {src}: run `make llamacpp` (it unpacks the llama.cpp source of "
            f"llama-cpp-python=={LLAMACPP_SDIST_VERSION}) or set HFQUANT_LLAMACPP_SRC to a llama.cpp checkout"
        )
    _gguf()  # the installed gguf package, imported first, is the one the converter then uses
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from conversion import get_model_class

    try:
        return get_model_class(arch)
    except NotImplementedError as err:
        raise GGUFExportError(f"llama.cpp's converter does not support the architecture {arch!r}") from err
    except AttributeError as err:  # a converter module naming a gguf constant the installed package lacks
        raise GGUFExportError(
            f"llama.cpp's converter at {src} needs a newer gguf package than the installed one ({err}): "
            f"pip install --no-deps --force-reinstall {src / 'gguf-py'} (`make llamacpp` does)"
        ) from err


@contextlib.contextmanager
def _quiet_converter():
    loggers = [logging.getLogger(name) for name in ("hf-to-gguf", "gguf.gguf_writer", "gguf.vocab", "gguf")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@dataclass
class TensorRecord:
    name: str  # GGUF name
    shape: tuple[int, ...]
    requested: str
    written: str
    how: str  # "lossless", "requantized" or "float", then " (fallback: ...)" where the type fell back


@dataclass
class GGUFExportSummary:
    path: Path
    type: str
    tensors: list[TensorRecord] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def weights(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """File bits over all tensor elements (metadata and vocabulary included)."""
        return 8 * self.file_bytes / max(1, self.weights)

    def rows(self) -> list[dict[str, object]]:
        """One row per (requested, written, how): the export summary table."""
        groups: Counter = Counter()
        examples: dict[tuple[str, str, str], str] = {}
        for t in self.tensors:
            key = (t.requested, t.written, t.how)
            groups[key] += 1
            examples.setdefault(key, t.name)
        return [
            {"requested": r, "written": w, "how": h, "tensors": n, "e.g.": examples[(r, w, h)]}
            for (r, w, h), n in sorted(groups.items())
        ]


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    from hfquant.nn import QUANTIZED_MODULES

    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)}


def kept_weights(module: nn.Module) -> int:
    """How many sparse 16-bit weights a quantized layer keeps (its ``outlier_values`` buffer)."""
    values = getattr(module, "outlier_values", None)
    return int(values.numel()) if isinstance(values, torch.Tensor) else 0


def _check_no_kept_weights(quantized: dict[str, nn.Module]) -> None:
    kept = [name for name, m in quantized.items() if kept_weights(m)]
    if kept:
        raise GGUFExportError(
            f"GGUF has no sparse 16-bit weights: {len(kept)} layer(s) keep weights in 16 bits "
            f"(kept_fraction > 0, e.g. {kept[0]}); export a model quantized without kept weights"
        )


@dataclass
class ExpertsSource:
    """One projection of an MoE layer's split experts (:class:`~hfquant.nn.experts.ExpertLinears`),
    written as the 3D tensor ``[experts, rows, cols]`` llama.cpp stores (``ffn_*_exps``)."""

    modules: list[nn.Module]  # one quantized linear per expert

    @property
    def out_features(self) -> int:
        return self.modules[0].out_features

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features


@dataclass
class ExpertLayerSource:
    """The split experts of one MoE layer as its checkpoint names them. Each projection's rows are
    numbered (expert ``e``'s row ``r`` of the projection at ``offset`` is ``offset + e * rows + r``)
    and the numbers are stored as transformers' fused 3D tensor, then put through transformers'
    reverse checkpoint conversion: ``checkpoint`` holds the numbers under the checkpoint's names
    (per expert for Mixtral's ``block_sparse_moe.experts.{e}.w1``, fused for others), which llama.cpp's
    converter takes and merges as it merges the real tensors."""

    projections: list[tuple[int, ExpertsSource]]  # (offset of its row numbers, experts)
    checkpoint: dict[str, torch.Tensor]  # checkpoint tensor name -> row numbers (float32)


def _check_experts_layout(model: nn.Module) -> None:
    """Split experts are written from the row numbers of transformers' fused 3D tensors; a norm after
    each expert (no converter writes one per expert) is refused."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinears) and module.has_post_expert_norm:
            raise GGUFExportError(
                f"GGUF export of the experts of {name} ({module.extra_repr()}) is not supported: a norm after "
                "each expert has no GGUF tensor"
            )


def _as_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (named as in the model) under the names and shapes of the architecture's checkpoints,
    which llama.cpp's converter reads: transformers' reverse of the architecture's load-time conversions.
    Not of those this model was loaded with (what ``save_pretrained`` reverses): transformers keeps only
    the conversions a checkpoint used, and an hfquant checkpoint stores the experts split, so a model
    reloaded from one would give the fused in-memory names back."""
    from transformers.core_model_loading import revert_weight_conversion

    architecture = copy.copy(model)  # shallow: the same modules, without the loaded conversions
    architecture.__dict__.pop("_weight_conversions", None)
    return revert_weight_conversion(architecture, tensors)


def _fused(module: ExpertLinears) -> list[tuple[str, nn.ModuleList]]:
    """Each projection's name in transformers' fused experts module, with its per-expert linears."""
    return [("gate_up_proj" if module.has_gate else "up_proj", getattr(module, module.up_name)), ("down_proj", module.down)]


def _expert_layer_source(model: nn.Module, prefix: str, module: ExpertLinears) -> ExpertLayerSource:
    projections, numbers, offset = [], {}, 0
    for fused, linears in _fused(module):
        source = ExpertsSource(list(linears))
        count = len(linears) * source.out_features
        # stored [experts, out, in], or [experts, in, out] (gpt-oss): the numbers stand in for the rows
        shape = (len(linears), 1, source.out_features) if module.is_transposed else (len(linears), source.out_features, 1)
        numbers[f"{prefix}{fused}"] = torch.arange(offset, offset + count, dtype=torch.float32).reshape(shape)
        projections.append((offset, source))
        offset += count
    if offset > 2**24:
        raise GGUFExportError(f"{prefix}: {offset} expert rows are more than a float32 row number holds exactly")
    return ExpertLayerSource(projections, _as_checkpoint(model, numbers))


def _source_tensors(model: nn.Module, quantized: dict[str, nn.Module]) -> dict[str, Any]:
    """Hugging Face tensor name -> float tensor, quantized module or split experts, as the checkpoint
    names them (experts, split or fused, through transformers' reverse checkpoint conversion)."""
    out: dict[str, Any] = {}
    experts = [name for name, m in model.named_modules() if isinstance(m, ExpertLinears)]
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, ExpertLinears):
            out[mod_name] = _expert_layer_source(model, prefix, module)
            if module.has_bias:  # float, as transformers fuses them: [experts, out]
                biases = {f"{prefix}{p}_bias": torch.stack([m.bias.detach() for m in ms]) for p, ms in _fused(module)}
                out.update(_as_checkpoint(model, biases))
            continue
        if any(mod_name.startswith(e + ".") for e in experts):
            continue
        if mod_name in quantized:
            out[f"{prefix}weight"] = module
            if getattr(module, "bias", None) is not None:
                out[f"{prefix}bias"] = module.bias.detach()
            continue
        if any(mod_name.startswith(q + ".") for q in quantized):
            continue
        own = {f"{prefix}{pname}": p.detach() for pname, p in module.named_parameters(recurse=False)}
        own.update(  # the buffers a checkpoint holds (DeepSeek's router bias e_score_correction_bias, ...)
            {f"{prefix}{b}": t for b, t in module.named_buffers(recurse=False) if b not in module._non_persistent_buffers_set}
        )
        out.update(_as_checkpoint(model, own) if is_fused_experts(module) else own)
    if _tied(model.config):
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    return out


def _tied(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def _dequantized(module: nn.Module) -> torch.Tensor:
    if not hasattr(module, "dequantize"):
        raise GGUFExportError(f"cannot read the weight of {type(module).__name__}")
    return module.dequantize(torch.float32).detach().cpu()


def save_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    type: str | None = None,  # noqa: A002 - the CLI's --type
    embedding_type: str | None = None,
    output_type: str | None = None,
    model_name: str | None = None,
) -> GGUFExportSummary:
    """Write ``model`` (float or hfquant-quantized) and ``tokenizer`` as one GGUF file for llama.cpp.

    ``type`` is the block type of the linear weights (``GGUF_TYPES``) or a llama-quantize mix
    (``q2_k_m``, ``q3_k_s`` ... ``q5_k_m``: ``GGUF_PRESETS``); default: the ``gguf_type`` the model was solved on, else
    ``q4_1``. ``embedding_type`` and ``output_type`` are those of the token embedding and output
    head (see the module docstring for defaults and fallbacks). The file is written to a temporary
    file in the same folder and moved into place: an error leaves no partial file. Returns a
    summary of how each tensor was written.
    """
    gguf = _gguf()
    quantized = _linear_modules(model)
    main = check_type(type or _solved_on(model, quantized), "type", presets=True)
    out_type = check_type(output_type, "output type") if output_type else _default_output_type(main)
    emb_type = check_type(embedding_type, "embedding type") if embedding_type else None
    _check_no_kept_weights(quantized)
    _check_experts_layout(model)
    target = Path(path)
    if target.is_dir():
        raise GGUFExportError(f"{target} is a folder: give the path of the .gguf file to write")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent.resolve())
    except OSError as err:
        raise GGUFExportError(f"cannot write {target}: {err.strerror or err}") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        summary = _write(model, tokenizer, tmp, main, emb_type, out_type, quantized, model_name, gguf)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary.path = target
    summary.file_bytes = target.stat().st_size
    return summary


def _solved_on(model: nn.Module, quantized: dict[str, nn.Module]) -> str:
    """The ``gguf_type`` (type or mix) the model was quantized with, else ``q4_1``."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    solved = qconfig.get("gguf_type") if isinstance(qconfig, dict) else getattr(qconfig, "gguf_type", None)
    if solved:
        return solved
    return next((m.gguf_type for m in quantized.values() if isinstance(m, GGUFLinear)), "q4_1")


def _default_output_type(main: str) -> str:
    """llama.cpp's output head type for a main type: the float type itself, ``q8_0`` for ``q8_0``,
    else ``q6_k`` (whose fallback takes rows that are not a multiple of 256)."""
    return main if main in ("f16", "f32", "q8_0") else "q6_k"


def _write(model, tokenizer, tmp: Path, main, emb_type, out_type, quantized, model_name, gguf) -> GGUFExportSummary:
    config = model.config
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    cls = _converter_class(arch)
    tied = _tied(config)
    if emb_type is None:
        emb_type = out_type if tied else GGUF_PRESETS.get(main, main)
    summary = GGUFExportSummary(tmp, main)
    with tempfile.TemporaryDirectory(prefix="hfquant-gguf-") as folder, _quiet_converter():
        folder = Path(folder)
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["architectures"] = [arch]
        (folder / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        name = model_name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
        conv = cls(folder, getattr(gguf.LlamaFileType, _FILE_TYPE[main]), tmp, eager=True, model_name=name)
        writer = conv.gguf_writer
        try:
            sources = _source_tensors(model, quantized)
            n_blocks = 1 + max((b for b in map(block_index, sources) if b is not None), default=-1)
            mix_shape = MixShape.of(config, n_blocks)
            for hf_name, source in sources.items():
                _add_tensor(conv, writer, hf_name, source, main, mix_shape, emb_type, out_type, summary)
            conv.prepare_metadata(vocab_only=False)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
    return summary


def _rows_as(module: nn.Module, rows: np.ndarray, qtype: str) -> tuple[np.ndarray, str]:
    """Rows of a quantized layer as ``qtype`` bytes: its own values where it stores that type's
    blocks (lossless), else its dequantized weight quantized to the type."""
    blocks = stored_blocks(module, qtype)
    if blocks is not None:
        return blocks.take_rows(rows).pack(), "lossless"
    return quantize_tensor(_dequantized(module).numpy()[rows], qtype), "requantized"


def _convert(conv, hf_name: str, data: torch.Tensor, bid: int | None) -> list[tuple[str, torch.Tensor]]:
    """The GGUF tensors llama.cpp's converter makes of checkpoint tensor ``hf_name`` holding ``data``,
    as it converts a checkpoint: its ``filter_tensors`` (renames, drops, fixes of the values) and then
    its ``modify_tensors``."""
    item = conv.filter_tensors((hf_name, lambda: data))
    if item is None:
        return []
    name, gen = item
    return list(conv.modify_tensors(gen(), name, bid))


def _expert_rows(conv, source: ExpertLayerSource, bid: int | None) -> list[tuple[str, ExpertsSource, np.ndarray]]:
    """Pass an MoE layer's expert row numbers through the converter; return each GGUF tensor it makes
    (gate and up apart) with its projection's experts and the rows it takes of each, ``[experts, rows']``."""
    made = [pair for name, t in source.checkpoint.items() for pair in _convert(conv, name, t, bid)]
    if not made:
        raise GGUFExportError(
            f"llama.cpp's converter wrote no tensor for the experts of block {bid} given {list(source.checkpoint)}"
        )
    out = []
    for name, t in made:
        taken = _rows_taken(t.round().long(), source.projections)
        if taken is None:
            raise GGUFExportError(
                f"llama.cpp's converter transforms the experts of block {bid} ({name}) beyond taking rows of each "
                "expert; quantized experts of this architecture cannot be exported"
            )
        out.append((name, *taken))
    return out


def _rows_taken(
    number: torch.Tensor, projections: list[tuple[int, ExpertsSource]]
) -> tuple[ExpertsSource, np.ndarray] | None:
    """The projection whose row numbers ``number`` holds and the rows it takes of each expert
    (``[experts, rows']``); None unless ``number`` is ``[experts, rows', 1]``, expert ``e``'s rows in
    slice ``e``, none twice."""
    below = [(offset, experts) for offset, experts in projections if offset <= number.min()]
    if not below or number.dim() != 3 or number.shape[2] != 1:
        return None
    offset, experts = below[-1]
    n, rows = len(experts.modules), experts.out_features
    if number.shape[0] != n:
        return None
    flat = number.reshape(n, -1) - offset
    if not torch.equal(flat // rows, torch.arange(n).unsqueeze(1).expand_as(flat)):
        return None
    if any(len(r.unique()) != len(r) for r in flat % rows):
        return None
    return experts, (flat % rows).numpy()


# Tensors llama.cpp never quantizes (its converter writes them F32 and ``llama-quantize`` leaves them):
# MoE routers above all, which choose the experts and are small.
_F32_TENSORS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D", "SHORTCONV_CONV")


def _kept_in_f32(conv, gguf_name: str, bid: int | None) -> bool:
    tensors = _gguf().MODEL_TENSOR
    return not gguf_name.endswith(".weight") or any(
        conv.match_model_tensor_name(gguf_name, getattr(tensors, key), bid) for key in _F32_TENSORS
    )


def _layer_rows(conv, module: nn.Module, hf_name: str, bid: int | None) -> list[tuple[str, nn.Module, np.ndarray]] | None:
    """Pass a quantized layer's row numbers through the converter to learn each GGUF tensor it makes
    and the row order (Llama's q/k permutation), so that its stored rows are moved, not requantized;
    ``None`` where the converter does more than reorder rows (DeepSeek's ``kv_b_proj`` becomes
    ``attn_k_b``, transposed per head, and ``attn_v_b``)."""
    rows = module.out_features
    index = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    pairs = []
    for name, t in _convert(conv, hf_name, index, bid):
        perm = t.reshape(-1).round().long()
        if t.shape != (rows, 1) or not torch.equal(perm.sort().values, torch.arange(rows)):
            return None
        pairs.append((name, module, perm.numpy()))
    return pairs


def _add_tensor(
    conv, writer, hf_name: str, source: Any, main, mix_shape: MixShape, emb_type, out_type, summary
) -> None:
    """Write one checkpoint tensor (its GGUF name, row order and type from ``main``, a type or a mix
    over a model of ``mix_shape``, and the embedding/output types) and record how."""
    gguf = _gguf()
    bid = block_index(hf_name)
    reshaped = ""
    if isinstance(source, torch.Tensor):
        pairs = [(n, t, None) for n, t in _convert(conv, hf_name, source.float().cpu(), bid)]
    elif isinstance(source, ExpertLayerSource):
        pairs = _expert_rows(conv, source, bid)
    else:
        pairs = _layer_rows(conv, source, hf_name, bid)
        if pairs is None:  # reshaped by the converter: its dequantized weight goes through instead
            pairs = [(n, t, None) for n, t in _convert(conv, hf_name, _dequantized(source), bid)]
            reshaped = " (reshaped by llama.cpp's converter)"
    for new_name, data, perm in pairs:
        shape = tuple(data.shape) if perm is None else (*perm.shape, data.in_features)
        if len(shape) <= 1 or new_name.endswith("_norm.weight") or _kept_in_f32(conv, new_name, bid):
            requested = "f32"
        elif new_name == "token_embd.weight":
            requested = emb_type
        elif new_name == "output.weight":
            requested = out_type
        else:
            requested = layer_type(main, new_name, mix_shape)
        written, fallback = requested, None
        cols = shape[-1]
        if len(shape) > 1 and cols % block_size(written):
            fallback = f"fallback: {cols} columns not a multiple of {block_size(written)}"
            written = FALLBACK.get(written, "f16")
            if cols % block_size(written):
                written = "f16"
        qtype = qtype_of(written)
        if isinstance(data, ExpertsSource):
            per_expert = [_rows_as(module, rows, written) for module, rows in zip(data.modules, perm, strict=True)]
            array = np.stack([a for a, _ in per_expert])
            how = per_expert[0][1] if len({h for _, h in per_expert}) == 1 else "lossless and requantized"
        elif perm is not None:
            array, how = _rows_as(data, perm, written)
        else:
            w = data.numpy().astype(np.float32)
            array = quantize_tensor(w, written)
            how = ("float" if written in ("f32", "f16") else "requantized") + reshaped
        if fallback:
            how = f"{how} ({fallback})"
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(new_name, np.ascontiguousarray(array))
        else:
            writer.add_tensor(new_name, np.ascontiguousarray(array), raw_shape=None, raw_dtype=qtype)
        summary.tensors.append(TensorRecord(new_name, shape, requested, written, how))
