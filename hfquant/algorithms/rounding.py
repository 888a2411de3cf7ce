"""Learned rounding: move a solved block's integers by a trained, bounded offset, then re-solve the grids.

AutoRound (Cheng et al., 2023, arXiv:2309.05516) trains a rounding offset ``V`` in ``[-0.5, 0.5]``
per weight, ``q = round(W / s + V)``, with signed gradient descent (by default 200 steps of
``1 / 200``) so that the block's output matches the full-precision block's, jointly with the
grid's min/max.
Here, after the per-layer solve (decoupleQ or GPTQ) and before block-wise minimization of the float
part:

* The offset acts on the solver's integers, not on round-to-nearest: ``q = clamp(q0 + round(U))``
  with ``U`` clamped to ``[-1, 1]``, so each integer moves at most one step. ``U`` starts at the
  weight's own residual ``(W - zero) / scale - q0``, clipped inside ``(-0.5, 0.5)``: the start is
  the solver's result, and a weight lying near the boundary to the next integer needs only a small
  push to cross it, as in AutoRound, where ``V`` acts on ``W / s`` before rounding. (Starting
  AutoRound's way, from round-to-nearest, would throw away the Hessian-aware integers.) Rounding
  passes gradients straight through. Each step moves ``U`` by AutoRound's default step, 0.005,
  over the block-wise batches and epochs (64 steps at the library defaults, not 200); ``1 /
  steps`` flipped too many weights at once on a tiny model (every epoch raised the error).
* The grid of the solve stays fixed while ``U`` trains; then each layer's scales and zeros are
  solved exactly for its new integers against its input Hessian (decoupleQ's float step,
  :func:`hfquant.algorithms.decoupleq.solve_float_step`) and rounded to their float16 storage.
* Like every stage here, the best state is kept: after each epoch the candidate integers are
  scored (block output error at storage precision, on ``validation`` when given), the start
  included, and the re-solved grid replaces the old one only where it lowers that error.

The block-wise minimization that follows tunes scales, zeros and norms as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.block import Batches, batch_loss, block_error, parameters_frozen, train_keep_best
from hfquant.algorithms.decoupleq import solve_float_step
from hfquant.algorithms.grid import expand_groups


@dataclass
class RoundingResult:
    error_before: float  # block error (scored batches) of the solver's integers
    error_after: float  # ... of the kept state
    moved: int  # integers the kept state moved by one step
    resolved: bool  # whether the re-solved grids were kept


# A starting offset stays inside (-0.5, 0.5), so that it rounds to 0 (the solver's own integers).
RESIDUAL_BOUND = 0.49
STEP = 0.005  # AutoRound's signed-gradient step (1 / its default 200 iterations)


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``, then ``p`` clamped to ``[-bound, bound]`` (AutoRound's optimizer)."""

    def __init__(self, params, lr: float, bound: float) -> None:
        super().__init__(params, {"lr": lr, "bound": bound})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad.sign()).clamp_(-group["bound"], group["bound"])


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        return torch.round(u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _OffsetLinear(nn.Module):
    """A quantized linear as ``scale * clamp(q0 + round(U)) + zero`` with ``U`` trainable, while it trains."""

    def __init__(self, module: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.q0 = module.integers().float()
        self.scales = expand_groups(module.scales.float(), module.in_features, module.group_size)
        self.zeros = expand_groups(module.zeros.float(), module.in_features, module.group_size)
        self.top = float(2**module.bits - 1)
        self.bias = module.bias
        safe = torch.where(self.scales == 0, torch.ones_like(self.scales), self.scales)
        residual = torch.where(self.scales == 0, 0.0, (weight.float() - self.zeros) / safe - self.q0)
        self.offset = residual.clamp(-RESIDUAL_BOUND, RESIDUAL_BOUND).requires_grad_(True)

    def integers(self) -> torch.Tensor:
        return (self.q0 + torch.round(self.offset.detach())).clamp(0, self.top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (self.q0 + _RoundStraightThrough.apply(self.offset)).clamp(0, self.top)
        w = self.scales * q + self.zeros
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def learn_rounding(
    block: nn.Module,
    batches: Batches,
    targets: list[torch.Tensor],
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    seed: int = 0,
    validation: tuple[Batches, list[torch.Tensor]] | None = None,
    damp: float = 0.0,
) -> RoundingResult:
    """Learn the rounding of the block's quantized linears named in ``layers`` (name -> (original
    weight, input Hessian)), in place; see the module docstring.

    The linears must be ``DecoupledLinear`` with a plain float16 grid and no kept weights. ``damp``
    is the float step's Hessian dampening (as in the solve).
    """
    scored_batches, scored_targets = validation or (batches, targets)
    modules = {name: block.get_submodule(name) for name in layers}
    shadows = {name: _OffsetLinear(m, layers[name][0]) for name, m in modules.items()}
    before = block_error(block, scored_batches, scored_targets)

    def swap(use: dict[str, nn.Module]) -> None:
        for name, module in use.items():
            block.set_submodule(name, module)

    def evaluate() -> tuple[float, dict[str, torch.Tensor]]:
        state = {name: shadow.integers() for name, shadow in shadows.items()}
        return block_error(block, scored_batches, scored_targets), state

    swap(shadows)
    try:
        with parameters_frozen(block):  # only the offsets train
            _, best_integers = train_keep_best(
                SignSGD([shadow.offset for shadow in shadows.values()], lr=STEP, bound=1.0),
                lambda i: batch_loss(block, *batches[i], targets[i]),
                len(batches),
                epochs,
                evaluate,
                seed,
            )
    finally:
        swap(modules)
    moved = sum(int((best_integers[n] != shadows[n].q0).sum()) for n in modules)
    if not moved:
        return RoundingResult(before, before, 0, False)
    grids = {name: (m.scales.detach().clone(), m.zeros.detach().clone()) for name, m in modules.items()}
    for name, module in modules.items():
        module.set_integers(best_integers[name].to(torch.uint8))
    with_old_grid = block_error(block, scored_batches, scored_targets)
    for name, module in modules.items():
        weight, hessian = layers[name]
        scales, zeros = solve_float_step(
            weight.float(),
            hessian.float(),
            best_integers[name],
            module.group_size,
            damp=damp,
            prev=grids[name],
        )
        module.scales.copy_(scales.to(module.scales.dtype))
        module.zeros.copy_(zeros.to(module.zeros.dtype))
    resolved = block_error(block, scored_batches, scored_targets)
    if resolved > with_old_grid:
        for name, module in modules.items():
            module.scales.copy_(grids[name][0])
            module.zeros.copy_(grids[name][1])
    return RoundingResult(before, min(resolved, with_old_grid), moved, resolved <= with_old_grid)
