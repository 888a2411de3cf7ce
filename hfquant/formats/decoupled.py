"""``DecoupledLinear``: packed integers on a float grid, plus sparse kept 16-bit weights.

``W_hat = scales * Q + zeros`` per (output row, input group) -- or one pair for the whole matrix
when ``group_size=0`` (scales and zeros are then ``[1, 1]``) -- plus the kept weights added on top
(``W_hat[r, c] += outlier_values[i]``: each stores the 16-bit residual of the original weight over
the grid). Integers live packed in int32 words (see :mod:`hfquant.formats.packing`); scales, zeros
and the kept values are stored in 16 bits on disk. The on-disk names of the kept weights,
``outlier_rows/cols/values``, are kept for compatibility with saved checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfquant.algorithms.grid import QuantizedWeight, dequantize_grid, grid_shape, grid_values
from hfquant.formats.base import (
    FLOAT_DTYPES,
    STORAGE_DTYPE,
    CheckpointError,
    InputGradThroughFrozenWeight,
    QuantizedLinear,
    TensorInfo,
    TensorSpecs,
    check_tensor,
)
from hfquant.formats.packing import pack_int, packed_width, unpack_int
from hfquant.kernels import cpu as cpu_kernel
from hfquant.kernels import triton_matmul

# The kept weights' stored tensor names. "outlier" is their old name; these names are a file format
# (checkpoints already saved use them), so they stay as they are while the code says "kept".
KEPT_TENSORS = ("outlier_rows", "outlier_cols", "outlier_values")


class DecoupledLinear(QuantizedLinear):
    """Drop-in replacement of ``nn.Linear`` holding a decoupled integer/float quantized weight."""

    name = "decoupled"
    tunable_grid = True
    optional_tensors = KEPT_TENSORS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        num_kept: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bits, bias, dtype, device)
        self.group_size = group_size
        dtype = dtype or torch.get_default_dtype()
        shape = grid_shape(out_features, in_features, group_size)
        words = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("outlier_rows", torch.zeros(num_kept, dtype=torch.int32, device=device))
        self.register_buffer("outlier_cols", torch.zeros(num_kept, dtype=torch.int32, device=device))
        self.register_buffer("outlier_values", torch.zeros(num_kept, dtype=dtype, device=device))

    @classmethod
    def expected_tensors(cls, config: Any, out_features: int, in_features: int) -> TensorSpecs:
        grid = grid_shape(out_features, in_features, config.group_size)
        return {
            "qweight": (("I32",), (out_features, packed_width(in_features, config.bits))),
            "scales": (FLOAT_DTYPES, grid),
            "zeros": (FLOAT_DTYPES, grid),
        }

    @classmethod
    def check_header(
        cls, tensors: dict[str, TensorInfo], name: str, linear: nn.Linear, config: Any
    ) -> dict[str, Any]:
        """The grid tensors, and the kept weights: all three tensors or none, of one length."""
        planned = super().check_header(tensors, name, linear, config)
        present = [s for s in KEPT_TENSORS if f"{name}.{s}" in tensors]
        if present and len(present) != len(KEPT_TENSORS):
            missing = sorted(set(KEPT_TENSORS) - set(present))
            raise CheckpointError(f"layer {name} has kept-weight tensors {present} but is missing {missing}")
        n = tensors[f"{name}.outlier_values"].shape[0] if present else 0
        if present:
            for suffix, dtypes in zip(KEPT_TENSORS, (("I32",), ("I32",), FLOAT_DTYPES), strict=True):
                check_tensor(tensors, f"{name}.{suffix}", dtypes, (n,), config)
        return {**planned, "num_kept": n}

    @classmethod
    def skeleton(cls, linear: nn.Linear, config: Any, num_kept: int = 0) -> DecoupledLinear:
        return cls(
            linear.in_features, linear.out_features, config.bits, config.group_size, num_kept=num_kept,
            **cls._layout(linear),
        )

    @classmethod
    def from_result(
        cls, result: QuantizedWeight, linear: nn.Linear, config: Any, kept: torch.Tensor | None = None
    ) -> DecoupledLinear:
        """Pack a solver's integers and grid; store each kept weight as its residual over the grid.

        Float parts are rounded to their 16-bit storage values here, so the live module and its
        saved checkpoint compute the same function.
        """
        rows = cols = None
        if kept is not None and kept.any():
            rows, cols = kept.nonzero(as_tuple=True)
        n = 0 if rows is None else int(rows.numel())
        layout = {**cls._layout(linear), "device": result.qweight.device}
        module = cls(linear.in_features, linear.out_features, config.bits, config.group_size, num_kept=n, **layout)
        module.qweight.copy_(pack_int(result.qweight, config.bits))
        module.scales.copy_(result.scales.to(STORAGE_DTYPE))
        module.zeros.copy_(result.zeros.to(STORAGE_DTYPE))
        if rows is not None:
            grid = grid_values(
                result.qweight,
                result.scales.to(STORAGE_DTYPE),
                result.zeros.to(STORAGE_DTYPE),
                rows,
                cols,
                config.group_size,
            )
            module.outlier_rows.copy_(rows.int())
            module.outlier_cols.copy_(cols.int())
            module.outlier_values.copy_((linear.weight.data[rows, cols].float() - grid).to(STORAGE_DTYPE))
        module._copy_bias(linear)
        return module

    @classmethod
    def storage_line(cls, config: Any) -> str:
        text = f"packed {config.bits}-bit integers, a float16 scale and zero per group"
        if config.kept_fraction:
            text += ", and the kept weights as float16 values with int32 row/column indices"
        return text

    @property
    def num_kept(self) -> int:
        """Number of kept 16-bit weights."""
        return self.outlier_values.numel()

    def kept_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns (long) of the kept weights."""
        return self.outlier_rows.long(), self.outlier_cols.long()

    def refresh_kept(self, values: torch.Tensor) -> None:
        """Reset the 16-bit residuals so the kept weights equal ``values`` again on the current grid
        (after block-wise minimization moved the grid under them)."""
        rows, cols = self.kept_positions()
        grid = grid_values(self.integers(), self.scales, self.zeros, rows, cols, self.group_size)
        self.outlier_values.copy_((values.float() - grid).to(STORAGE_DTYPE))

    def check_loaded(self, name: str) -> None:
        """Kept-weight indices must address the layer's own matrix."""
        rows, cols = self.outlier_rows, self.outlier_cols
        if rows.numel() and (
            int(rows.min()) < 0
            or int(rows.max()) >= self.out_features
            or int(cols.min()) < 0
            or int(cols.max()) >= self.in_features
        ):
            raise CheckpointError(
                f"tensor {name}.outlier_rows/outlier_cols index outside the layer's weight matrix"
            )

    def integers(self) -> torch.Tensor:
        """The unpacked integer matrix ``Q`` (uint8 ``[out, in]``)."""
        return unpack_int(self.qweight, self.bits, self.in_features)

    def set_integers(self, q: torch.Tensor) -> None:
        """Store new integers (uint8 ``[out, in]``, within the width), packed; the grid is left as is."""
        self.qweight.copy_(pack_int(q, self.bits))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat`` (``[out, in]``): the integer part on its grid plus the kept 16-bit weights."""
        dtype = dtype or self.scales.dtype
        w = dequantize_grid(self.integers(), self.scales, self.zeros, self.group_size)
        if self.num_kept:
            w = w.index_put(self.kept_positions(), self.outlier_values.float(), accumulate=True)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused kernels where they apply (Triton on CUDA, C++ for few rows on CPU), else the reference.

        The reference dequantizes the whole matrix and calls ``F.linear``: exact, and the right
        choice for long prompts on CPU, where one GEMM amortizes the dequantization, and whenever
        autograd must see the grid (block-wise minimization). Training through the frozen layer
        (LoRA) runs this forward inside :class:`~hfquant.formats.base.InputGradThroughFrozenWeight`.
        """
        if self.trains_input_only(x):
            return InputGradThroughFrozenWeight.apply(x, self)
        tracked = torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad)
        rows = x.numel() // self.in_features
        if x.is_cuda and not tracked and triton_matmul.supports(self.bits, self.group_size, self.in_features):
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
            and not tracked
            and cpu_kernel.supports(self.bits, self.group_size, self.in_features)
            and cpu_kernel.available()
        ):
            x2d = x.reshape(rows, self.in_features)
            y = cpu_kernel.qmatmul(
                x2d, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
            )
            bias = self.bias
        else:
            return super().forward(x)
        if self.num_kept:
            # Kept weights: y[:, r] += x[:, c] * v for every (r, c, v), a scatter-add on the output.
            # Summed in float32: tens of kept weights per row, added one by one in bfloat16, drift by 2%.
            kept = x2d[:, self.outlier_cols.long()].float() * self.outlier_values.float()
            y = y.float().index_add(1, self.outlier_rows.long(), kept)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def storage_bits(self) -> int:
        """Packed integers, 16-bit grid, kept weights with their indices."""
        grid = self.scales.numel() + self.zeros.numel()
        return self.qweight.numel() * 32 + grid * 16 + self.num_kept * (16 + 32 + 32)

    def _extra_repr_fields(self) -> str:
        return f"group_size={self.group_size}, kept={self.num_kept}, "
