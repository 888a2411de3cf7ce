"""``SplitLinear``: a SplitQuant layer, k value clusters each on its own grid (see :mod:`hfquant.algorithms.splitquant`).

``W_hat[r, j] = scales[c, r, g] * Q[r, j] + zeros[c, r, g]`` with ``c = cluster[r, j]``: the sum of
k quantized layers, each zero outside its cluster, stored as one integer plane, one packed cluster
index plane and k grids. Forward dequantizes and calls ``F.linear`` (no fused kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.grid import grid_shape
from hfquant.algorithms.splitquant import SplitWeight, cluster_grid, index_bits
from hfquant.nn.decoupled_linear import STORAGE_DTYPE, frozen_bias
from hfquant.nn.packing import pack_int, packed_width, unpack_int


class SplitLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` holding a SplitQuant weight of ``clusters`` clusters."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        clusters: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.clusters = clusters
        dtype = dtype or torch.get_default_dtype()
        shape = (clusters, *grid_shape(out_features, in_features, group_size))
        words = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        cluster_words = packed_width(in_features, index_bits(clusters))
        self.register_buffer("cluster", torch.zeros(out_features, cluster_words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(shape, dtype=dtype, device=device))
        self.bias = frozen_bias(out_features, bias, dtype, device)

    @classmethod
    def from_quantized(
        cls,
        split: SplitWeight,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> SplitLinear:
        """Build the module from :func:`~hfquant.algorithms.splitquant.split_quantize`'s result.

        Scales and zeros are rounded to their 16-bit storage values, as in ``DecoupledLinear``.
        """
        out_features, in_features = split.qweight.shape
        clusters = split.scales.shape[0]
        dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
        module = cls(
            in_features, out_features, bits, group_size, clusters, bias is not None, dtype, split.qweight.device
        )
        module.qweight.copy_(pack_int(split.qweight, bits))
        module.cluster.copy_(pack_int(split.cluster, index_bits(clusters)))
        module.scales.copy_(split.scales.to(STORAGE_DTYPE))
        module.zeros.copy_(split.zeros.to(STORAGE_DTYPE))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def integers(self) -> torch.Tensor:
        return unpack_int(self.qweight, self.bits, self.in_features)

    def clusters_index(self) -> torch.Tensor:
        """The unpacked cluster of every weight (uint8 ``[out, in]``)."""
        return unpack_int(self.cluster, index_bits(self.clusters), self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        s, z = cluster_grid(self.scales, self.zeros, self.clusters_index(), self.group_size)
        return (self.integers().float() * s + z).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> int:
        """Packed integers, packed cluster indices and the k 16-bit grids."""
        return (self.qweight.numel() + self.cluster.numel()) * 32 + (self.scales.numel() + self.zeros.numel()) * 16

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, clusters={self.clusters}, bias={self.bias is not None}"
        )
