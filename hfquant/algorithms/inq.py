"""INQ (Zhou et al., 2017, arXiv:1702.03044): weights of zero or signed powers of two, fixed incrementally.

The allowed values of a row are ``{0, +-2^n2, .., +-2^n1}`` with, as in the paper,
``n1 = floor(log2(4 * max|w| / 3))`` and ``n2 = n1 + 1 - 2^(b-1) / 2``: ``2^(b-2)`` exponents for
``b`` bits (1 at 2 bits: ternary; 2 at 3 bits; 4 at 4 bits). A weight goes to the nearest allowed
value (the paper's rule: ``beta * sgn(w)`` for ``(alpha + beta) / 2 <= |w| < 3 beta / 2``).

Incremental: in each block the largest-magnitude 50% of every layer's weights are quantized and
frozen, the still-float weights are retrained (Adam) so the block's output matches its
full-precision output on the calibration inputs, then 75%, 87.5% and 100%; after the last step no
weight is float. The paper partitions and retrains the whole network on the task loss; here, as
for the other methods of this package, the unit is one decoder block and the loss its output
error, so only one block is trained at a time.

Chosen otherwise:
  * ``n1`` per output row (the paper has one per layer): 8 bits per row, and a row of small
    weights is not rounded to zero by another row's outlier.
  * codes: ``b`` bits per weight, code 0 is zero, codes ``1..E`` are ``+2^(n1 - code + 1)`` and
    ``E+1..2E`` their negatives (``E = 2^(b-2)``); the paper's count leaves the other codes unused.
  * retraining steps are relative (learning rate times each layer's weight spread), and the best
    state of each retraining, the starting one included, is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.algorithms.block import Batches, batch_loss, block_error, parameters_frozen, train_keep_best
from hfquant.algorithms.grid import power_of_two_codes, power_of_two_values, top_exponents

INQ_SHARES = (0.5, 0.75, 0.875, 1.0)


def grow_frozen(w: torch.Tensor, frozen: torch.Tensor, share: float) -> torch.Tensor:
    """Add the largest-magnitude float weights to ``frozen`` until it holds ``share`` of the layer."""
    target = round(share * w.numel())
    extra = target - int(frozen.sum())
    if extra <= 0:
        return frozen
    score = w.detach().abs().flatten().masked_fill(frozen.flatten(), -1.0)
    grown = frozen.flatten().clone()
    grown[score.topk(extra).indices] = True
    return grown.reshape(frozen.shape)


def retrain_float_weights(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    frozen: dict[str, torch.Tensor],
    batches: Batches,
    targets: list[torch.Tensor],
    epochs: int,
    lr: float,
    seed: int = 0,
) -> float:
    """Adam on the not-yet-frozen weights of ``linears`` (all else fixed); returns the kept block loss."""

    def evaluate() -> tuple[float, dict[str, torch.Tensor]]:
        state = {n: m.weight.detach().clone() for n, m in linears.items()}
        return block_error(block, batches, targets), state

    with parameters_frozen(block):
        groups, hooks = [], []
        for name, linear in linears.items():
            weight = linear.weight
            weight.requires_grad_(True)
            free = (~frozen[name]).to(weight.dtype)
            hooks.append(weight.register_hook(lambda g, free=free: g * free))
            groups.append({"params": [weight], "lr": lr * float(weight.detach().float().std().clamp_min(1e-8))})
        try:
            best, best_state = train_keep_best(
                torch.optim.Adam(groups),
                lambda i: batch_loss(block, *batches[i], targets[i]),
                len(batches),
                epochs,
                evaluate,
                seed,
            )
        finally:
            for hook in hooks:
                hook.remove()
    with torch.no_grad():
        for name, linear in linears.items():
            linear.weight.copy_(best_state[name])
    return best


@torch.no_grad()
def inq_block(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    batches: Batches,
    targets: list[torch.Tensor],
    bits: int,
    *,
    epochs: int = 4,
    lr: float = 1e-3,
    shares: tuple[float, ...] = INQ_SHARES,
    history: list[dict[str, float]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize ``linears`` (of ``block``) incrementally; return each one's ``(codes, n1)``.

    The linears' weights are overwritten with their quantized values along the way. ``history``
    receives, per step, the share of each layer that is frozen and the block loss after retraining.
    """
    if not shares or shares[-1] != 1.0 or any(b <= a for a, b in zip(shares, shares[1:], strict=False)):
        raise ValueError(f"INQ shares must increase and end at 1.0, got {shares}")
    n1 = {name: top_exponents(linear.weight) for name, linear in linears.items()}
    frozen = {name: torch.zeros_like(linear.weight, dtype=torch.bool) for name, linear in linears.items()}
    for share in shares:
        for name, linear in linears.items():
            w = linear.weight
            frozen[name] = grow_frozen(w, frozen[name], share)
            values = power_of_two_values(power_of_two_codes(w, n1[name], bits), n1[name], bits).to(w.dtype)
            w.copy_(torch.where(frozen[name], values, w))
        loss = None
        if share < 1.0 and epochs > 0:
            loss = retrain_float_weights(block, linears, frozen, batches, targets, epochs, lr)
        if history is not None:
            entry = {name: float(f.float().mean()) for name, f in frozen.items()}
            entry["loss"] = block_error(block, batches, targets) if loss is None else loss
            history.append(entry)
    return {name: (power_of_two_codes(linear.weight, n1[name], bits), n1[name]) for name, linear in linears.items()}
