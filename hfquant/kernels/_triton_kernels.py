"""Triton kernels: fused unpack + dequantize + matmul straight from the packed format.

Imported only through :mod:`hfquant.kernels.triton_matmul` on first use, because importing this
module imports triton and ``@triton.jit`` decides at definition time whether kernels run compiled
or under the interpreter (``TRITON_INTERPRET=1``, which is how CI tests them on CPU).

Value ``k`` of a row sits at stream bits ``[k*BITS, (k+1)*BITS)``: word ``k*BITS // 32``, offset
``k*BITS % 32``. For 2 and 4 bits a value never leaves its word; for 3 bits values 10 and 21 of every
32 straddle two words and take their high bits from the next word. Each element of a weight tile
loads its own word (neighbouring elements hit the same cache line), is shifted, masked, and mapped
onto its group's grid ``scale * q + zero`` before the multiply; groups need not be aligned to the
tile, so ragged last groups and one-group-per-row (``GS = in_features``) need no special case.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, WORDS, G, BITS: tl.constexpr, GS: tl.constexpr):
    """``scale * q + zero`` (float32) at the broadcast grid of ``offs_n`` x ``offs_k``; 0 outside."""
    valid = (offs_n < N) & (offs_k < K)
    bitpos = offs_k * BITS
    word = bitpos // 32
    off = bitpos % 32
    row = qw_ptr + offs_n.to(tl.int64) * WORDS
    lo = tl.load(row + word, mask=valid, other=0).to(tl.uint32, bitcast=True)
    v = lo >> off.to(tl.uint32)
    if BITS == 3:
        cross = valid & (off + BITS > 32)
        hi = tl.load(row + word + 1, mask=cross, other=0).to(tl.uint32, bitcast=True)
        shift = tl.where(cross, 32 - off, 0).to(tl.uint32)
        v = v | tl.where(cross, hi << shift, 0)
    q = (v & ((1 << BITS) - 1)).to(tl.float32)
    g = offs_k // GS
    grid = offs_n.to(tl.int64) * G + g
    s = tl.load(s_ptr + grid, mask=valid, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + grid, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, q * s + z, 0.0)


@triton.jit
def gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, WORDS, G,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Decode: one input row, ``BLOCK_N`` output rows per program, reduction over K in registers."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + pid_m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n[:, None], offs_k[None, :], N, K, WORDS, G, BITS, GS)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, WORDS, G,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Small batches and prefill: dequantized ``[BLOCK_K, BLOCK_N]`` tiles fed to ``tl.dot``.

    The tile is cast to the activation dtype (fp16/bf16 tensor cores; float32 stays float32) and
    accumulated in float32.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n[None, :], offs_k[:, None], N, K, WORDS, G, BITS, GS)
        acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=y_mask)
