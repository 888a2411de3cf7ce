"""``SplitLinear``: a SplitQuant layer, k value clusters each on its own grid (see :mod:`hfquant.algorithms.splitquant`).

``W_hat[r, j] = scales[c, r, g] * Q[r, j] + zeros[c, r, g]`` with ``c = cluster[r, j]``: the sum of
k quantized layers, each zero outside its cluster, stored as one integer plane, one packed cluster
index plane and k grids. Forward is the reference one (no fused kernel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hfquant.algorithms.grid import cluster_grid, grid_shape, index_bits
from hfquant.formats.base import FLOAT_DTYPES, STORAGE_DTYPE, CheckpointError, QuantizedLinear, TensorSpecs
from hfquant.formats.packing import pack_int, packed_width, unpack_int

if TYPE_CHECKING:
    from hfquant.algorithms.splitquant import SplitWeight


class SplitLinear(QuantizedLinear):
    """Drop-in replacement of ``nn.Linear`` holding a SplitQuant weight of ``clusters`` clusters."""

    name = "split"
    tunable_grid = True

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
        super().__init__(in_features, out_features, bits, bias, dtype, device)
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

    @classmethod
    def expected_tensors(cls, config: Any, out_features: int, in_features: int) -> TensorSpecs:
        k = config.split_clusters
        grid = (k, *grid_shape(out_features, in_features, config.group_size))
        return {
            "qweight": (("I32",), (out_features, packed_width(in_features, config.bits))),
            "cluster": (("I32",), (out_features, packed_width(in_features, index_bits(k)))),
            "scales": (FLOAT_DTYPES, grid),
            "zeros": (FLOAT_DTYPES, grid),
        }

    @classmethod
    def skeleton(cls, linear: nn.Linear, config: Any) -> SplitLinear:
        return cls(
            linear.in_features, linear.out_features, config.bits, config.group_size, config.split_clusters,
            **cls._layout(linear),
        )

    @classmethod
    def from_result(
        cls, result: SplitWeight, linear: nn.Linear, config: Any, kept: torch.Tensor | None = None
    ) -> SplitLinear:
        """Pack :func:`~hfquant.algorithms.splitquant.split_quantize`'s result (no kept weights: the
        config refuses them). Scales and zeros are rounded to their 16-bit storage values."""
        clusters = result.scales.shape[0]
        layout = {**cls._layout(linear), "device": result.qweight.device}
        module = cls(linear.in_features, linear.out_features, config.bits, config.group_size, clusters, **layout)
        module.qweight.copy_(pack_int(result.qweight, config.bits))
        module.cluster.copy_(pack_int(result.cluster, index_bits(clusters)))
        module.scales.copy_(result.scales.to(STORAGE_DTYPE))
        module.zeros.copy_(result.zeros.to(STORAGE_DTYPE))
        module._copy_bias(linear)
        return module

    @classmethod
    def storage_line(cls, config: Any) -> str:
        return (
            f"packed {config.bits}-bit integers, a packed cluster index per weight and, per cluster, "
            "a float16 scale and zero per group"
        )

    def check_loaded(self, name: str) -> None:
        """Cluster indices must name one of the layer's clusters."""
        top = int(self.clusters_index().max()) if self.cluster.numel() else 0
        if top >= self.clusters:
            raise CheckpointError(
                f"tensor {name}.cluster holds cluster index {top}, but the layer has {self.clusters} clusters"
            )

    def integers(self) -> torch.Tensor:
        return unpack_int(self.qweight, self.bits, self.in_features)

    def clusters_index(self) -> torch.Tensor:
        """The unpacked cluster of every weight (uint8 ``[out, in]``)."""
        return unpack_int(self.cluster, index_bits(self.clusters), self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        s, z = cluster_grid(self.scales, self.zeros, self.clusters_index(), self.group_size)
        return (self.integers().float() * s + z).to(dtype)

    def storage_bits(self) -> int:
        """Packed integers, packed cluster indices and the k 16-bit grids."""
        return (self.qweight.numel() + self.cluster.numel()) * 32 + (self.scales.numel() + self.zeros.numel()) * 16

    def _extra_repr_fields(self) -> str:
        return f"group_size={self.group_size}, clusters={self.clusters}, "
