"""``PowerOfTwoLinear``: an INQ layer, every weight zero or a signed power of two (see :mod:`hfquant.algorithms.inq`).

Stored as packed ``bits``-wide codes per weight and the top exponent ``n1`` of each row (int8).
Forward dequantizes and calls ``F.linear``; the values are exact in float16 and float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.inq import power_of_two_values
from hfquant.nn.decoupled_linear import frozen_bias
from hfquant.nn.packing import pack_int, packed_width, unpack_int


class PowerOfTwoLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` whose weights are zero or ``+-2^k``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        dtype = dtype or torch.get_default_dtype()
        words = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("exponent", torch.zeros(out_features, dtype=torch.int8, device=device))
        self.bias = frozen_bias(out_features, bias, dtype, device)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        n1: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> PowerOfTwoLinear:
        """Build the module from :func:`~hfquant.algorithms.inq.inq_block`'s codes and row exponents."""
        out_features, in_features = codes.shape
        dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
        module = cls(in_features, out_features, bits, bias is not None, dtype, codes.device)
        module.qweight.copy_(pack_int(codes, bits))
        module.exponent.copy_(n1)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def codes(self) -> torch.Tensor:
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.get_default_dtype())
        return power_of_two_values(self.codes(), self.exponent, self.bits).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> int:
        """Packed codes and one int8 exponent per row."""
        return self.qweight.numel() * 32 + self.exponent.numel() * 8

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"bias={self.bias is not None}"
        )
