"""Triton kernels: fused unpack + dequantize + matmul straight from the packed format, and a
dequantize-only kernel for long prompts (its output goes to cuBLAS).

Imported only through :mod:`hfquant.kernels.triton_matmul` on first use, because importing this
module imports triton and ``@triton.jit`` decides at definition time whether kernels run compiled
or under the interpreter (``TRITON_INTERPRET=1``, which is how CI tests them on CPU).

Value ``k`` of a row sits at stream bits ``[k*BITS, (k+1)*BITS)`` (:mod:`hfquant.formats.packing`):
every 32 values take exactly ``BITS`` int32 words. A tile of ``BLOCK_K`` values (a multiple of 32,
starting on a 32-value boundary) is therefore read one word at a time, never one value at a time:
for 2 and 4 bits a word holds ``32 // BITS`` whole values, unpacked with a vector of shifts; for 3
bits the three words of each 32-value block are loaded side by side and values 10 and 21, which
straddle two words, take their high bits from the next one.

Grids: value ``k`` of row ``n`` is ``scale[n, k // GS] * q + zero[n, k // GS]``. When a tile holds
whole groups (``BLOCK_K % GS == 0``) or lies inside one (``GS % BLOCK_K == 0``), the grid is loaded
once per group and broadcast; any other group size (one group per row of odd width) loads it per
value. Ragged last groups need no special case: values past ``K`` meet zeros of ``x``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _units(qw_ptr, offs_n, k0, N, WORDS, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of rows ``offs_n``, values ``k0 .. k0 + BLOCK_K``, as ``[BLOCK_N, units, values per unit]``.

    A unit is a word for 2 and 4 bits (``32 // BITS`` values) and a 32-value block of three words
    for 3 bits; units never straddle a tile, so they are the grain the GEMV applies grids at.
    """
    row = qw_ptr + offs_n.to(tl.int64)[:, None] * WORDS
    row_ok = (offs_n < N)[:, None]
    if BITS == 3:
        blocks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        first = row + (blocks * 3)[None, :]
        ok = row_ok & (blocks * 3 < WORDS)[None, :]
        w0 = tl.load(first, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w1 = tl.load(first + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w2 = tl.load(first + 2, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        bit = tl.arange(0, 32) * 3
        word = (bit // 32)[None, None, :]
        off = (bit % 32).to(tl.uint32)[None, None, :]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        hi = tl.where(word == 0, w1, w2)
        cross = off > 29  # the value's top bits are in the next word
        v = (lo >> off) | tl.where(cross, hi << tl.where(cross, 32 - off, 0), 0)
    else:
        PER: tl.constexpr = 32 // BITS
        words = k0 // PER + tl.arange(0, BLOCK_K // PER)
        packed = tl.load(row + words[None, :], mask=row_ok & (words < WORDS)[None, :], other=0)
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        v = packed.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]
    return (v & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _codes(qw_ptr, offs_n, k0, N, WORDS, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` integer codes of rows ``offs_n``, values ``k0 .. k0 + BLOCK_K``."""
    return tl.reshape(_units(qw_ptr, offs_n, k0, N, WORDS, BITS, BLOCK_N, BLOCK_K), (BLOCK_N, BLOCK_K))


@triton.jit
def _grid(ptr, offs_n, k0, N, G, GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales (or zeros) of the tile's groups, ``[BLOCK_N, BLOCK_K // GS]``, for ``BLOCK_K % GS == 0``."""
    groups = k0 // GS + tl.arange(0, BLOCK_K // GS)
    ok = (offs_n < N)[:, None] & (groups < G)[None, :]
    return tl.load(ptr + offs_n.to(tl.int64)[:, None] * G + groups[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _dequant(q, s_ptr, z_ptr, offs_n, k0, N, K, G, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``scale * q + zero`` for the codes ``q`` of a ``[BLOCK_N, BLOCK_K]`` tile."""
    if BLOCK_K % GS == 0:  # whole groups in the tile
        s = _grid(s_ptr, offs_n, k0, N, G, GS, BLOCK_K)[:, :, None]
        z = _grid(z_ptr, offs_n, k0, N, G, GS, BLOCK_K)[:, :, None]
        w = tl.reshape(tl.reshape(q, (BLOCK_N, BLOCK_K // GS, GS)) * s + z, (BLOCK_N, BLOCK_K))
    elif GS % BLOCK_K == 0:  # the tile inside one group
        at = offs_n.to(tl.int64) * G + k0 // GS
        s = tl.load(s_ptr + at, mask=offs_n < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=offs_n < N, other=0.0).to(tl.float32)
        w = q * s[:, None] + z[:, None]
    else:  # groups not aligned to tiles: the grid per value
        offs_k = k0 + tl.arange(0, BLOCK_K)
        at = offs_n.to(tl.int64)[:, None] * G + (offs_k // GS)[None, :]
        ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        w = q * tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32) + tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return w


@triton.jit
def _plane_code(w0, w1, w2, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of each unit (``[BLOCK_N, units]``): word ``w0`` for 2/4 bits; ``w0..w2`` for 3 bits,
    where codes 10 and 21 straddle two words and take their high bits from the next one."""
    if BITS == 3:
        OFF: tl.constexpr = (3 * j) % 32
        WORD: tl.constexpr = (3 * j) // 32
        if WORD == 0:
            v = w0 >> OFF
            if OFF > 29:
                v = v | (w1 << (32 - OFF))
        elif WORD == 1:
            v = w1 >> OFF
            if OFF > 29:
                v = v | (w2 << (32 - OFF))
        else:
            v = w2 >> OFF
    else:
        v = w0 >> (j * BITS)
    return (v & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _unit_words(row, row_ok, k0, k_stop, WORDS, BITS: tl.constexpr, U: tl.constexpr, NU: tl.constexpr):
    """The packed words of ``NU`` units from value ``k0`` on, ``[BLOCK_N, NU]`` each: the unit's only
    word for 2/4 bits (``w1``, ``w2`` repeat it), its three words for 3 bits; zeros (no load) for
    units from value ``k_stop`` on."""
    units = k0 // U + tl.arange(0, NU)
    first = units * 3 if BITS == 3 else units  # each unit's first word
    ok = row_ok & ((first < WORDS) & (units * U < k_stop))[None, :]
    w0 = tl.load(row + first[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    if BITS == 3:
        w1 = tl.load(row + first[None, :] + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(row + first[None, :] + 2, mask=ok, other=0).to(tl.uint32, bitcast=True)
    return w0, w1, w2


@triton.jit
def _gemv_planes(
    x_ptr, qw_ptr, s_ptr, z_ptr, pid_m, offs_n, k_start, k_end, N, K, WORDS, G,
    BITS: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """Rows ``offs_n`` of ``W x`` over values ``k_start .. k_end`` for ``GS`` a multiple of the unit.

    The tile stays two-dimensional, ``[BLOCK_N, units]``, the layout the packed words load in:
    code ``j`` of every unit (a "plane") is shifted out of the words and multiplied by the input
    values ``x[unit * U + j]`` (a strided load of ``x``, which stays in L1), and partial sums are
    kept per (row, unit) until one reduction at the end: no reshape and no cross-thread reduction
    inside the loop. The grid is applied per unit after its reduction, ``sum_k (s q_k + z) x_k =
    s * sum_k q_k x_k + z * sum_k x_k``. Measured on an H100 (RESULTS.md, gpu.py ``tune``): 1.4x
    faster per Llama-7B block than the 3-D ``[rows, units, values]`` tile it replaced, whose
    per-step reductions compiled to shuffles and barriers (1078 PTX instructions vs 529 at W2).

    ``PREFETCH``: the next step's words are loaded before this step's arithmetic (double buffering
    in registers), so that their memory latency overlaps it; Triton's pipeliner (``num_stages``)
    does this only for loads that feed ``tl.dot``, and the compiled loop otherwise waits on each
    step's loads before its arithmetic (sm_90 SASS of the 16 x 512 tile).
    """
    U: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # values per unit
    NU: tl.constexpr = BLOCK_K // U
    row = qw_ptr + offs_n.to(tl.int64)[:, None] * WORDS
    row_ok = (offs_n < N)[:, None]
    acc = tl.zeros((BLOCK_N, NU), dtype=tl.float32)
    if PREFETCH:
        n0, n1, n2 = _unit_words(row, row_ok, k_start, k_end, WORDS, BITS, U, NU)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            w0, w1, w2 = n0, n1, n2
            n0, n1, n2 = _unit_words(row, row_ok, k0 + BLOCK_K, k_end, WORDS, BITS, U, NU)
        else:
            w0, w1, w2 = _unit_words(row, row_ok, k0, k_end, WORDS, BITS, U, NU)
        units = k0 // U + tl.arange(0, NU)
        xu = x_ptr + pid_m * K + units * U
        qx = tl.zeros((BLOCK_N, NU), dtype=tl.float32)
        xs = tl.zeros((NU,), dtype=tl.float32)
        for j in tl.static_range(U):
            xj = tl.load(xu + j, mask=units * U + j < K, other=0.0).to(tl.float32)
            qx += _plane_code(w0, w1, w2, j, BITS) * xj[None, :]
            xs += xj
        groups = units * U // GS
        at = offs_n.to(tl.int64)[:, None] * G + groups[None, :]
        gok = row_ok & (groups < G)[None, :]
        s = tl.load(s_ptr + at, mask=gok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=gok, other=0.0).to(tl.float32)
        acc += s * qx + z * xs[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, WORDS, G, K_PER_SPLIT,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """Decode: one input row, ``BLOCK_N`` output rows per program, reduction over K in registers.

    Groups of whole units (``GS`` a multiple of the unit, as for groups of 32/64/128) take the
    code-plane loop of :func:`_gemv_planes`; other group sizes dequantize each tile per value.

    Split-K (``SPLIT_K > 1``): program ``(m, n, s)`` reduces only ``K_PER_SPLIT`` values (a multiple
    of ``BLOCK_K``) starting at ``s * K_PER_SPLIT`` and adds its partial sums atomically into ``y``,
    a zeroed float32 buffer: ``SPLIT_K`` times the programs, each with fewer serial steps, which
    hides memory latency at batch 1.
    """
    U: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # values per unit
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_k = tl.program_id(2)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    if GS % U == 0:
        acc = _gemv_planes(x_ptr, qw_ptr, s_ptr, z_ptr, pid_m, offs_n, k_start, k_end, N, K, WORDS, G,
                           BITS, GS, BLOCK_N, BLOCK_K, PREFETCH)  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + pid_m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            q = _codes(qw_ptr, offs_n, k0, N, WORDS, BITS, BLOCK_N, BLOCK_K)
            w = _dequant(q, s_ptr, z_ptr, offs_n, k0, N, K, G, GS, BLOCK_N, BLOCK_K)
            acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        if pid_k == 0:  # once per output row
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + pid_m * N + offs_n, acc, mask=offs_n < N)
    else:
        tl.atomic_add(y_ptr + pid_m * N + offs_n, acc, mask=offs_n < N, sem="relaxed")


@triton.jit
def gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, WORDS, G,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Small batches and prefill: dequantized ``[BLOCK_N, BLOCK_K]`` tiles fed to ``tl.dot``.

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
        q = _codes(qw_ptr, offs_n, k0, N, WORDS, BITS, BLOCK_N, BLOCK_K)
        w = _dequant(q, s_ptr, z_ptr, offs_n, k0, N, K, G, GS, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=y_mask)


@triton.jit
def dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, WORDS, G,
    BITS: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Prefill: the ``[N, K]`` weight on its grid, written once in ``w``'s dtype for a cuBLAS GEMM.

    One ``[BLOCK_N, BLOCK_K]`` tile per program; the values are computed in float32, as in the fused
    kernels, and rounded once when stored.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    q = _codes(qw_ptr, offs_n, k0, N, WORDS, BITS, BLOCK_N, BLOCK_K)
    w = _dequant(q, s_ptr, z_ptr, offs_n, k0, N, K, G, GS, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(
        w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask
    )
