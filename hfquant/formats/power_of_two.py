"""``PowerOfTwoLinear``: an INQ layer, every weight zero or a signed power of two (see :mod:`hfquant.algorithms.inq`).

Stored as packed ``bits``-wide codes per weight and the top exponent ``n1`` of each row (int8).
Forward is the reference one; the values are exact in float16 and float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfquant.algorithms.grid import power_of_two_values
from hfquant.formats.base import QuantizedLinear, TensorSpecs
from hfquant.formats.packing import pack_int, packed_width, unpack_int


class PowerOfTwoLinear(QuantizedLinear):
    """Drop-in replacement of ``nn.Linear`` whose weights are zero or ``+-2^k``."""

    name = "power_of_two"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bits, bias, dtype, device)
        words = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("exponent", torch.zeros(out_features, dtype=torch.int8, device=device))

    @classmethod
    def expected_tensors(cls, config: Any, out_features: int, in_features: int) -> TensorSpecs:
        return {
            "qweight": (("I32",), (out_features, packed_width(in_features, config.bits))),
            "exponent": (("I8",), (out_features,)),
        }

    @classmethod
    def skeleton(cls, linear: nn.Linear, config: Any) -> PowerOfTwoLinear:
        return cls(linear.in_features, linear.out_features, config.bits, **cls._layout(linear))

    @classmethod
    def from_result(
        cls, result: tuple[torch.Tensor, torch.Tensor], linear: nn.Linear, config: Any, kept: torch.Tensor | None = None
    ) -> PowerOfTwoLinear:
        """Pack :func:`~hfquant.algorithms.inq.inq_block`'s ``(codes, n1)`` of one layer."""
        codes, n1 = result
        layout = {**cls._layout(linear), "device": codes.device}
        module = cls(linear.in_features, linear.out_features, config.bits, **layout)
        module.qweight.copy_(pack_int(codes, config.bits))
        module.exponent.copy_(n1)
        module._copy_bias(linear)
        return module

    @classmethod
    def storage_line(cls, config: Any) -> str:
        return (
            f"packed {config.bits}-bit sign and exponent codes (each weight zero or a signed power of "
            "two) and one int8 exponent per row"
        )

    def codes(self) -> torch.Tensor:
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.get_default_dtype())
        return power_of_two_values(self.codes(), self.exponent, self.bits).to(dtype)

    def storage_bits(self) -> int:
        """Packed codes and one int8 exponent per row."""
        return self.qweight.numel() * 32 + self.exponent.numel() * 8
