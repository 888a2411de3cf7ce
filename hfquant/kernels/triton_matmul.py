"""GPU path of ``DecoupledLinear``: launches the Triton kernels of :mod:`hfquant.kernels._triton_kernels`.

Triton is optional: without it :func:`supports` is false and CUDA inputs take the torch reference
path. One input row (batch-1 decode) uses a GEMV kernel that reduces over K in registers; more rows
(batched decode, prefill) use a tiled ``tl.dot`` kernel. Kept 16-bit weights are not in the kernels:
the caller adds them with one ``index_add`` on the output (``y[:, r] += x[:, c] * v``), which costs
O(rows x kept weights) and keeps the dense kernels branch-free.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from types import ModuleType

import torch


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _kernels() -> ModuleType:
    from hfquant.kernels import _triton_kernels

    return _triton_kernels


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the kernels apply: triton installed and a 2, 3 or 4-bit layer with per-row grids."""
    return bits in (2, 3, 4) and group_size != 0 and triton_installed()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W_grid.T (+ bias)`` in float32 for a 2-D ``x`` (fp16, bf16 or fp32) on the kernels' device."""
    mod = _kernels()
    m_rows, n_out = x.shape[0], qweight.shape[0]
    gs = in_features if group_size == -1 else group_size
    x = x.contiguous()
    y = torch.empty(m_rows, n_out, dtype=torch.float32, device=x.device)
    args = (qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bias if bias is not None else y, y)
    if m_rows == 1:
        block_n, block_k = 32, 128
        grid = (1, -(-n_out // block_n))
        mod.gemv_kernel[grid](
            x, *args, n_out, in_features, qweight.shape[1], scales.shape[1],
            BITS=bits, GS=gs, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    else:
        block_m = min(64, max(16, _next_pow2(m_rows)))
        block_n, block_k = 64, 64
        grid = (-(-m_rows // block_m), -(-n_out // block_n))
        mod.gemm_kernel[grid](
            x, *args, m_rows, n_out, in_features, qweight.shape[1], scales.shape[1],
            BITS=bits, GS=gs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return y
