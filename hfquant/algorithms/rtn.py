"""Round-to-nearest: the data-free baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from hfquant.algorithms.grid import QuantizedWeight, minmax_grid, quantize_to_grid


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Asymmetric min-max grid per group, each weight rounded to its nearest level."""
    scales, zeros = minmax_grid(w, bits, group_size)
    qweight = quantize_to_grid(w, scales, zeros, bits, group_size)
    return QuantizedWeight(qweight, scales, zeros)
