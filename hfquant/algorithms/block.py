"""One decoder block run on its calibration inputs: the forward, its error, and "train, keep the best".

The driver's full-precision pass (with hooks collecting Hessians), block-wise minimization and
INQ's retraining all run a block the same way: positional hidden states plus the keyword
arguments the first block received (rotary embeddings, masks), the first output being the hidden
states. Training in both methods is Adam over shuffled batches, the candidate scored after each
epoch at its storage precision, and the best state seen -- the starting one included -- kept, so
the block loss never increases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call

Batches = list[tuple[torch.Tensor, dict[str, Any]]]
State = TypeVar("State")


def block_output(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], values: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The block's output hidden states; ``values`` replace parameters and buffers by name for this call."""
    out = functional_call(block, values, (hidden,), kwargs) if values else block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def batch_loss(
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    target: torch.Tensor,
    values: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean squared error of the block's output against ``target`` on one batch."""
    return (block_output(block, hidden, kwargs, values).float() - target.float()).pow(2).mean()


@torch.no_grad()
def block_error(
    block: nn.Module,
    batches: Batches,
    targets: list[torch.Tensor],
    values: dict[str, torch.Tensor] | None = None,
) -> float:
    """Mean squared error of the block's output over all batches (each weighted by its size)."""
    total = sum(
        float(batch_loss(block, h, kw, t, values)) * t.numel() for (h, kw), t in zip(batches, targets, strict=True)
    )
    return total / sum(t.numel() for t in targets)


@contextmanager
def parameters_frozen(block: nn.Module) -> Iterator[None]:
    """The block's own parameters take no gradient inside (only what the caller trains does);
    their ``requires_grad`` flags are put back, and no ``.grad`` is left, on exit."""
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def train_keep_best(
    optimizer: torch.optim.Optimizer,
    loss: Callable[[int], torch.Tensor],
    n_batches: int,
    epochs: int,
    evaluate: Callable[[], tuple[float, State]],
    seed: int = 0,
) -> tuple[float, State]:
    """``epochs`` passes of ``optimizer`` over the batches in a seeded random order.

    ``loss(i)`` is batch ``i``'s training loss; ``evaluate()`` scores the current state (at storage
    precision) and returns it with a snapshot. Returns the best score and snapshot seen, the
    starting state included; the caller puts the snapshot in place.
    """
    with torch.no_grad():
        best, best_state = evaluate()
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for i in torch.randperm(n_batches, generator=generator).tolist():
                value = loss(i)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            with torch.no_grad():
                score, state = evaluate()
            if score < best:
                best, best_state = score, state
    return best, best_state
