"""Block-wise minimization: tune a quantized block's float parameters to match its full-precision output.

With the integers frozen, the block's scales, zeros and normalization weights are trained with
Adam so that ``block_q(x)`` matches ``block_fp(x)`` on the calibration inputs. The per-layer
solves each see one layer; this step sees the whole block (attention softmax, SiLU gates,
residuals) and corrects the errors the layers make together.

Steps are relative: ``scales = s0 * (1 + a)``, ``zeros = z0 + s0 * b``, ``norm = n0 * (1 + c)``
with ``a, b, c`` trained from zero, so one learning rate suits layers of any magnitude (Adam's
step is about ``lr`` per coordinate whatever the gradient's scale). After each epoch the
candidate is rounded to its 16-bit storage values and scored on all calibration batches; the
best state seen, the starting one included, is kept, so the block loss never increases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hfquant.nn.decoupled_linear import STORAGE_DTYPE, DecoupledLinear
from hfquant.nn.split_linear import SplitLinear

Batches = list[tuple[torch.Tensor, dict[str, Any]]]


def trainable_float_parameters(block: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name -> (starting value, unit of a relative step) for every float parameter block-wise tunes."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (DecoupledLinear, SplitLinear)):
            scales = module.scales.detach().clone()
            found[prefix + "scales"] = (scales, scales)
            found[prefix + "zeros"] = (module.zeros.detach().clone(), scales)
        elif "norm" in type(module).__name__.lower() and isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            weight = module.weight.detach().clone()
            found[prefix + "weight"] = (weight, weight)
    return found


def _values(
    start: dict[str, tuple[torch.Tensor, torch.Tensor]], deltas: dict[str, torch.Tensor], storage: bool
) -> dict[str, torch.Tensor]:
    values = {}
    for name, (value, unit) in start.items():
        new = value + unit * deltas[name]
        if storage and name.endswith(("scales", "zeros")):
            new = new.to(STORAGE_DTYPE).to(value.dtype)
        values[name] = new
    return values


def _loss(
    block: nn.Module,
    values: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    kwargs: dict,
    target: torch.Tensor,
):
    out = functional_call(block, values, (hidden,), kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() - target.float()).pow(2).mean()


@torch.no_grad()
def _score(
    block: nn.Module, values: dict[str, torch.Tensor], batches: Batches, targets: list[torch.Tensor]
) -> float:
    total = sum(
        float(_loss(block, values, h, kw, t)) * t.numel() for (h, kw), t in zip(batches, targets, strict=True)
    )
    return total / sum(t.numel() for t in targets)


def block_minimize(
    block: nn.Module,
    batches: Batches,
    targets: list[torch.Tensor],
    epochs: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Train the block's float parameters in place; return the block loss (MSE) of the kept state."""
    start = trainable_float_parameters(block)
    if not start or epochs == 0:
        return _score(block, {n: v for n, (v, _) in start.items()}, batches, targets)
    deltas = {n: torch.zeros_like(v, dtype=torch.float32, requires_grad=True) for n, (v, _) in start.items()}
    best_values = _values(start, deltas, storage=True)
    best = _score(block, best_values, batches, targets)
    optimizer = torch.optim.Adam(list(deltas.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for i in torch.randperm(len(batches), generator=generator).tolist():
                hidden, kwargs = batches[i]
                loss = _loss(block, _values(start, deltas, storage=False), hidden, kwargs, targets[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            candidate = _values(start, deltas, storage=True)
            score = _score(block, candidate, batches, targets)
            if score < best:
                best, best_values = score, candidate
    with torch.no_grad():
        for name, value in best_values.items():
            target = block.get_parameter(name) if name.endswith("weight") else block.get_buffer(name)
            target.copy_(value)
    return best
