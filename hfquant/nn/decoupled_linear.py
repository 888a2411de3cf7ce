"""``DecoupledLinear``: a linear layer stored as packed integers, a float grid and sparse 16-bit weights.

``W_hat = scales * Q + zeros`` per (output row, input group) -- or one pair for the whole matrix
when ``group_size=0`` (scales and zeros are then ``[1, 1]``) -- plus a sparse set of kept weights
added on top (``W_hat[r, c] += outlier_values[i]``). Integers live packed in int32 words
(see :mod:`hfquant.nn.packing`); scales, zeros and the kept values are stored in 16 bits on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.grid import QuantizedWeight, dequantize_grid, grid_shape
from hfquant.kernels import cpu as cpu_kernel
from hfquant.kernels import triton_matmul
from hfquant.nn.packing import pack_int, packed_width, unpack_int

STORAGE_DTYPE = torch.float16  # on-disk dtype of scales, zeros and kept weights


def frozen_bias(
    out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Parameter | None:
    """The bias of a quantized layer: a parameter (so ``model.to`` and accelerate move it) that
    training never updates."""
    if not bias:
        return None
    return nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)


class DecoupledLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` holding a decoupled integer/float quantized weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        num_outliers: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        dtype = dtype or torch.get_default_dtype()
        shape = grid_shape(out_features, in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device),
        )
        self.register_buffer("scales", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("outlier_rows", torch.zeros(num_outliers, dtype=torch.int32, device=device))
        self.register_buffer("outlier_cols", torch.zeros(num_outliers, dtype=torch.int32, device=device))
        self.register_buffer("outlier_values", torch.zeros(num_outliers, dtype=dtype, device=device))
        self.bias = frozen_bias(out_features, bias, dtype, device)

    @classmethod
    def from_quantized(
        cls,
        quantized: QuantizedWeight,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecoupledLinear:
        """Build the module from a solver's result; ``outliers`` is ``(rows, cols, values)``.

        Float parts are rounded to their 16-bit storage values here, so the live module and its
        saved checkpoint compute the same function.
        """
        out_features, in_features = quantized.qweight.shape
        dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
        device = quantized.qweight.device
        n_out = 0 if outliers is None else int(outliers[0].numel())
        module = cls(in_features, out_features, bits, group_size, bias is not None, n_out, dtype, device)
        module.qweight.copy_(pack_int(quantized.qweight, bits))
        module.scales.copy_(quantized.scales.to(STORAGE_DTYPE))
        module.zeros.copy_(quantized.zeros.to(STORAGE_DTYPE))
        if outliers is not None:
            rows, cols, values = outliers
            module.outlier_rows.copy_(rows)
            module.outlier_cols.copy_(cols)
            module.outlier_values.copy_(values.to(STORAGE_DTYPE))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @property
    def num_outliers(self) -> int:
        return self.outlier_values.numel()

    def integers(self) -> torch.Tensor:
        """The unpacked integer matrix ``Q`` (uint8 ``[out, in]``)."""
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat`` (``[out, in]``): the integer part on its grid plus the kept 16-bit weights."""
        dtype = dtype or self.scales.dtype
        w = dequantize_grid(self.integers(), self.scales, self.zeros, self.group_size)
        if self.num_outliers:
            w = w.index_put(
                (self.outlier_rows.long(), self.outlier_cols.long()),
                self.outlier_values.float(),
                accumulate=True,
            )
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused kernels where they apply (Triton on CUDA, C++ for few rows on CPU), else the reference.

        The reference dequantizes the whole matrix and calls ``F.linear``: exact, and the right
        choice for long prompts on CPU, where one GEMM amortizes the dequantization.
        """
        rows = x.numel() // self.in_features
        if x.is_cuda and triton_matmul.supports(self.bits, self.group_size, self.in_features):
            x2d = x.reshape(rows, self.in_features)
            y = triton_matmul.qmatmul(
                x2d,
                self.qweight,
                self.scales,
                self.zeros,
                self.bits,
                self.group_size,
                self.in_features,
                self.bias,
            )
            bias = None  # fused into the kernel
        elif (
            x.device.type == "cpu"
            and rows <= cpu_kernel.MAX_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad))
            and cpu_kernel.supports(self.bits, self.group_size, self.in_features)
            and cpu_kernel.available()
        ):
            x2d = x.reshape(rows, self.in_features)
            y = cpu_kernel.qmatmul(
                x2d, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
            )
            bias = self.bias
        else:
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.num_outliers:
            # Kept weights: y[:, r] += x[:, c] * v for every (r, c, v), a scatter-add on the output.
            kept = x2d[:, self.outlier_cols.long()].to(y.dtype) * self.outlier_values.to(y.dtype)
            y = y.index_add(1, self.outlier_rows.long(), kept)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def storage_bits(self) -> int:
        """Bits this layer takes on disk: packed integers, 16-bit grid, kept weights with their indices."""
        n = self.num_outliers
        grid = self.scales.numel() + self.zeros.numel()
        return self.qweight.numel() * 32 + grid * 16 + n * (16 + 32 + 32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, outliers={self.num_outliers}"
        )
