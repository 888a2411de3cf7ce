"""One linear, one solve: the config's method applied to a weight and its Hessian, the result built
into the config's stored format."""

from __future__ import annotations

import torch
from torch import nn

from hfquant.algorithms.decoupleq import decoupleq_quantize
from hfquant.algorithms.gptq import gptq_quantize, masked_minmax_grid
from hfquant.algorithms.grid import QuantizedWeight, quantize_to_grid
from hfquant.algorithms.rtn import rtn_quantize
from hfquant.algorithms.splitquant import SplitWeight, split_quantize
from hfquant.config import HfQuantConfig
from hfquant.formats import QuantizedLinear, format_for
from hfquant.formats.gguf import grid_for


def solve_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: HfQuantConfig,
    kept: torch.Tensor | None = None,
) -> QuantizedWeight | SplitWeight:
    """Quantize one weight matrix with the configured method; ``kept`` weights are left out.

    With ``split_clusters > 1`` the result is a SplitQuant weight (``kept`` is then refused by the
    config); with ``gguf_type`` decoupleQ solves on that GGUF type's grid (its fallback where the
    row width needs one).
    """
    if config.split_clusters > 1:
        return split_quantize(
            weight,
            hessian,
            config.bits,
            config.group_size,
            config.split_clusters,
            method=config.method,
            iters=config.decoupleq_iters,
            damp=config.damp,
            act_order=config.act_order if config.method == "gptq" else True,
        )
    if config.method == "rtn":
        if kept is None:
            return rtn_quantize(weight, config.bits, config.group_size)
        scales, zeros = masked_minmax_grid(weight, config.bits, config.group_size, kept)
        return QuantizedWeight(
            quantize_to_grid(weight, scales, zeros, config.bits, config.group_size), scales, zeros
        )
    if config.method == "gptq":
        return gptq_quantize(
            weight,
            hessian,
            config.bits,
            config.group_size,
            damp=config.damp,
            act_order=config.act_order,
            kept=kept,
        )
    return decoupleq_quantize(
        weight,
        hessian,
        config.bits,
        config.group_size,
        iters=config.decoupleq_iters,
        damp=config.damp,
        kept=kept,
        grid_spec=grid_for(config.gguf_type, weight.shape[1]) if config.gguf_type else None,
    )


def quantize_linear(
    linear: nn.Linear, hessian: torch.Tensor | None, config: HfQuantConfig, kept: torch.Tensor | None = None
) -> QuantizedLinear:
    """``linear`` solved (``kept`` weights left out of the solve and stored in 16 bits) and stored in
    the config's format."""
    result = solve_layer(linear.weight.data, hessian, config, kept)
    return format_for(config).from_result(result, linear, config, kept)
