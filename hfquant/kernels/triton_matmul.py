"""GPU path of ``DecoupledLinear``: launches the Triton kernels of :mod:`hfquant.kernels._triton_kernels`.

Triton is optional: without it :func:`supports` is false and CUDA inputs take the torch reference
path. One input row (batch-1 decode) uses a GEMV kernel that reduces over K in registers; a few rows
(batched decode, short prompts) use a tiled ``tl.dot`` kernel; from :data:`DEQUANT_MIN_ROWS` rows on
(prefill) one kernel writes the weight on its grid in the activation dtype and cuBLAS multiplies:
the fused kernel re-unpacks every weight tile once per 64 rows and ran at 0.25x fp16 at 512 rows on
an H100 (RESULTS.md), while writing the dense weight costs one pass over it, amortized over the
rows (vLLM's AWQ path switches the same way, at 256 rows). That path holds a dense copy of one
layer's weight while it runs. Kept 16-bit weights are not in the kernels:
the caller adds them with one ``index_add`` on the output (``y[:, r] += x[:, c] * v``), which costs
O(rows x kept weights) and keeps the dense kernels branch-free.

Every launch configuration the dispatcher can pick is declared in :data:`LAUNCH_CONFIGS`, the one
table that :func:`launch_config` chooses from and that :mod:`hfquant.kernels.aot` compiles ahead of
time for each supported GPU architecture (tests/test_kernels_compile.py).

Under ``torch.compile`` each launch is one opaque custom operator (``hfquant::triton_qmatmul``,
``hfquant::triton_dequantize``) with a shape-only fake, so a compiled model keeps the kernels in one
graph with no break and CUDA graphs capture them; eager calls launch directly, because going through
the operator dispatcher costs microseconds per call, which add up over the 224 linears of a 7B decode
step.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

KERNELS = ("gemv", "gemm", "dequant")  # the kernels of hfquant.kernels._triton_kernels, less "_kernel"


@dataclass(frozen=True)
class LaunchConfig:
    """One way of launching a kernel: its tile sizes and Triton's ``num_warps`` / ``num_stages``."""

    kernel: str  # "gemv" (one input row), "gemm" (several rows, tl.dot) or "dequant" (the weight alone)
    block_m: int  # input rows per program (1 for the GEMV kernel; 0 for dequant, which reads no input)
    block_n: int  # output rows per program
    block_k: int  # reduction step
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # GEMV only: programs sharing one output row's reduction (atomic float32 adds)
    prefetch: bool = False  # GEMV only: the next step's packed words loaded before this step's arithmetic

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if (self.block_m == 0) != (self.kernel == "dequant"):
            raise ValueError(f"block_m must be 0 for the dequant kernel and only for it; got {self.block_m}")
        if self.split_k < 1 or (self.split_k > 1 and self.kernel != "gemv"):
            raise ValueError(
                f"split_k must be >= 1, and 1 for the gemm and dequant kernels; got {self.split_k} for {self.kernel!r}"
            )
        object.__setattr__(self, "prefetch", bool(self.prefetch))  # rebuilt from ``tiles`` as 0 / 1
        if self.prefetch and self.kernel != "gemv":
            raise ValueError(f"prefetch is a GEMV option (its K loop); got it for {self.kernel!r}")

    @property
    def tiles(self) -> list[int]:
        """Every field but the kernel, in order: ``LaunchConfig(kernel, *tiles)`` rebuilds the configuration."""
        return [self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages, self.split_k,
                int(self.prefetch)]

    @property
    def name(self) -> str:
        split = f" k{self.split_k}" if self.split_k > 1 else ""
        prefetch = " pf" if self.prefetch else ""
        return (
            f"{self.kernel} {self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
            f"{split}{prefetch}"
        )

    def constexprs(self) -> dict[str, int]:
        """The tile sizes (and the GEMV's split) as the kernel's compile-time arguments."""
        blocks = {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        if self.kernel == "gemv":
            return {**blocks, "SPLIT_K": self.split_k, "PREFETCH": self.prefetch}
        if self.kernel == "dequant":
            return blocks
        return {"BLOCK_M": self.block_m, **blocks}


# Tile sizes measured on an H100 (benchmarks/gpu.py ``tune``, RESULTS.md). BLOCK_K is a multiple of
# 32, so tiles start on a packing block. At batch 1 a 4096 x 4096 layer gives 256 row blocks of 16,
# each split 4 ways over K: 1024 programs of 2 steps. Replayed from a CUDA graph, that was the
# fastest of 12 candidates per Llama-7B block (191 us vs 203 us unsplit); eagerly, the zeroed
# buffer and the cast to the activation dtype cost two more launches.
GEMV = LaunchConfig("gemv", 1, 16, 512, split_k=4)
# tl.dot kernel: the first configuration whose BLOCK_M holds the rows, the last one beyond.
GEMM = (LaunchConfig("gemm", 16, 32, 256), LaunchConfig("gemm", 32, 64, 128), LaunchConfig("gemm", 64, 64, 128))
# Float32 tiles take twice the shared memory per pipeline stage: two stages of 64-wide K steps fit
# every target (99 KiB per program on sm_86/89).
GEMM_FP32 = tuple(replace(c, block_k=64, num_stages=2) for c in GEMM)
# Dequantize kernel: 32 x 128 values per program (no loop, no shared memory: one tile for every
# dtype). Not yet timed on a GPU, nor the crossover below: benchmarks/gpu.py ``tune`` times both.
DEQUANT = LaunchConfig("dequant", 0, 32, 128, num_stages=1)
DEQUANT_MIN_ROWS = 256
# Every configuration qmatmul launches, by activation dtype (the AOT test compiles each of them):
# the GEMV first, the dequantize kernel last, the tl.dot tiles between.
LAUNCH_CONFIGS: dict[torch.dtype, tuple[LaunchConfig, ...]] = {
    torch.float16: (GEMV, *GEMM, DEQUANT),
    torch.bfloat16: (GEMV, *GEMM, DEQUANT),
    torch.float32: (GEMV, *GEMM_FP32, DEQUANT),
}


def launch_config(rows: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration :func:`qmatmul` launches for ``rows`` input rows of ``dtype``."""
    gemv, *gemm, dequant = LAUNCH_CONFIGS[dtype]
    if rows == 1:
        return gemv
    if rows >= DEQUANT_MIN_ROWS:
        return dequant
    return next((c for c in gemm if rows <= c.block_m), gemm[-1])


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # found, not imported (see _kernels)


@cache
def _kernels() -> ModuleType:
    from hfquant.kernels import _triton_kernels

    return _triton_kernels


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the kernels apply: triton installed and a 2, 3 or 4-bit layer with per-row grids."""
    return bits in (2, 3, 4) and group_size != 0 and TRITON_INSTALLED


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``x @ W_grid.T (+ bias)`` in ``x``'s dtype for a 2-D ``x`` (fp16, bf16 or fp32) on the kernels' device.

    Products are summed in float32 and rounded once, when the kernel stores the output (the
    dequantize path: as cuBLAS sums, in float32 for these dtypes unless torch allows reduced
    precision reductions).

    ``config`` overrides :func:`launch_config` (benchmarks compare configurations with it).
    """
    config = config or launch_config(x.shape[0], x.dtype)
    if config.kernel == "dequant":
        w = dequantize(qweight, scales, zeros, bits, group_size, in_features, x.dtype, config)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    args = (x, qweight, scales, zeros, bias, bits, group_size, in_features)
    if torch.compiler.is_compiling():
        return torch.ops.hfquant.triton_qmatmul(*args, config.kernel, config.tiles)
    return _launch_fused(*args, config)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    config: LaunchConfig = DEQUANT,
) -> torch.Tensor:
    """The ``[out, in]`` weight on its grid, ``scale * q + zero``, in ``dtype``: one kernel launch."""
    if config.kernel != "dequant":
        raise ValueError(f"dequantize launches the dequant kernel, got a {config.kernel!r} configuration")
    args = (qweight, scales, zeros, bits, group_size, in_features, dtype)
    if torch.compiler.is_compiling():
        return torch.ops.hfquant.triton_dequantize(*args, config.tiles)
    return _launch_dequant(*args, config)


def _launch_fused(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    config: LaunchConfig,
) -> torch.Tensor:
    """One launch of the GEMV or tl.dot kernel: :func:`qmatmul`'s body."""
    mod = _kernels()
    m_rows, n_out = x.shape[0], qweight.shape[0]
    gs = in_features if group_size == -1 else group_size
    x = x.contiguous()
    split = config.split_k
    if split > 1:  # partial sums added atomically into a zeroed float32 buffer
        y = torch.zeros(m_rows, n_out, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m_rows, n_out, dtype=x.dtype, device=x.device)
    args = (qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bias if bias is not None else y, y)
    sizes = (n_out, in_features, qweight.shape[1], scales.shape[1])
    meta = dict(
        BITS=bits, GS=gs, HAS_BIAS=bias is not None, **config.constexprs(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    grid_n = -(-n_out // config.block_n)
    if config.kernel == "gemv":
        per_split = -(-in_features // (split * config.block_k)) * config.block_k
        mod.gemv_kernel[(m_rows, grid_n, split)](x, *args, *sizes, per_split, **meta)
    else:
        mod.gemm_kernel[(-(-m_rows // config.block_m), grid_n)](x, *args, m_rows, *sizes, **meta)
    return y.to(x.dtype)


def _launch_dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    config: LaunchConfig,
) -> torch.Tensor:
    """One launch of the dequant kernel: :func:`dequantize`'s body."""
    n_out = qweight.shape[0]
    w = torch.empty(n_out, in_features, dtype=dtype, device=qweight.device)
    grid = (-(-n_out // config.block_n), -(-in_features // config.block_k))
    _kernels().dequant_kernel[grid](
        qweight.contiguous(), scales.contiguous(), zeros.contiguous(), w,
        n_out, in_features, qweight.shape[1], scales.shape[1],
        BITS=bits, GS=in_features if group_size == -1 else group_size, **config.constexprs(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return w


# The same launches as custom operators for torch.compile (see the module docstring): a launch
# configuration travels as its kernel and tiles, the types an operator schema has.
@torch.library.custom_op("hfquant::triton_qmatmul", mutates_args=())
def _qmatmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    kernel: str,
    tiles: list[int],
) -> torch.Tensor:
    config = LaunchConfig(kernel, *tiles)
    return _launch_fused(x, qweight, scales, zeros, bias, bits, group_size, in_features, config)


@_qmatmul_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, in_features, kernel, tiles):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("hfquant::triton_dequantize", mutates_args=())
def _dequantize_op(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    tiles: list[int],
) -> torch.Tensor:
    config = LaunchConfig("dequant", *tiles)
    return _launch_dequant(qweight, scales, zeros, bits, group_size, in_features, dtype, config)


@_dequantize_op.register_fake
def _(qweight, scales, zeros, bits, group_size, in_features, dtype, tiles):
    return qweight.new_empty(qweight.shape[0], in_features, dtype=dtype)
