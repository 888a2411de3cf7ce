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

from typing import Any

import torch
from torch import nn

INQ_SHARES = (0.5, 0.75, 0.875, 1.0)
EXPONENT_RANGE = (-100, 100)  # n1 is stored as int8; rows of all zeros get the lowest

Batches = list[tuple[torch.Tensor, dict[str, Any]]]


def exponent_count(bits: int) -> int:
    """Exponents ``n1 - n2 + 1 = 2^(b-1) / 2`` of a ``bits``-bit INQ code."""
    return 2 ** (bits - 2)


def top_exponents(w: torch.Tensor) -> torch.Tensor:
    """``n1 = floor(log2(4 * max|w| / 3))`` of every row (int8 ``[out]``)."""
    peak = w.detach().float().abs().amax(dim=1)
    n1 = torch.floor(torch.log2(4.0 * peak / 3.0))
    n1 = torch.where(peak > 0, n1, torch.full_like(n1, EXPONENT_RANGE[0]))
    return n1.clamp(*EXPONENT_RANGE).to(torch.int8)


def power_of_two_codes(w: torch.Tensor, n1: torch.Tensor, bits: int) -> torch.Tensor:
    """Code of the nearest allowed value of every weight (uint8 ``[out, in]``).

    ``|w|`` in ``[3/4 2^m, 3/2 2^m)`` is nearest to ``2^m``, so ``m = floor(log2(4|w|/3))``, capped at
    ``n1``; below ``2^n2`` the choice is between ``2^n2`` and zero, split at ``2^(n2-1)``.
    """
    e = exponent_count(bits)
    a = w.detach().float().abs()
    top = n1.float()[:, None]
    m = torch.floor(torch.log2(4.0 * a / 3.0)).clamp_max(top)  # -inf for a zero weight
    step = (top - m).clamp_max(e - 1)
    zero = a < torch.exp2(top - e)  # half of the smallest power 2^n2 = 2^(n1 - e + 1)
    code = torch.where(zero, torch.zeros_like(step), step + 1 + e * (w < 0))
    return code.to(torch.uint8)


def power_of_two_values(codes: torch.Tensor, n1: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`power_of_two_codes` (float32 ``[out, in]``)."""
    e = exponent_count(bits)
    c = codes.long()
    negative = c > e
    step = torch.where(negative, c - e, c) - 1  # exponent below n1; -1 for zero
    value = torch.exp2(n1.float()[:, None] - step.clamp_min(0))
    value = torch.where(c == 0, torch.zeros_like(value), value)
    return torch.where(negative, -value, value)


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


def _block_loss(block: nn.Module, batches: Batches, targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        total = sum(float(_batch_loss(block, h, kw, t)) * t.numel() for (h, kw), t in zip(batches, targets, strict=True))
    return total / sum(t.numel() for t in targets)


def _batch_loss(block: nn.Module, hidden: torch.Tensor, kwargs: dict, target: torch.Tensor) -> torch.Tensor:
    out = block(hidden, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() - target.float()).pow(2).mean()


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
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    groups, hooks = [], []
    for name, linear in linears.items():
        weight = linear.weight
        weight.requires_grad_(True)
        free = (~frozen[name]).to(weight.dtype)
        hooks.append(weight.register_hook(lambda g, free=free: g * free))
        groups.append({"params": [weight], "lr": lr * float(weight.detach().float().std().clamp_min(1e-8))})
    best = _block_loss(block, batches, targets)
    best_state = {n: m.weight.detach().clone() for n, m in linears.items()}
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for i in torch.randperm(len(batches), generator=generator).tolist():
                    hidden, kwargs = batches[i]
                    loss = _batch_loss(block, hidden, kwargs, targets[i])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                score = _block_loss(block, batches, targets)
                if score < best:
                    best, best_state = score, {n: m.weight.detach().clone() for n, m in linears.items()}
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
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
            entry["loss"] = _block_loss(block, batches, targets) if loss is None else loss
            history.append(entry)
    return {name: (power_of_two_codes(linear.weight, n1[name], bits), n1[name]) for name, linear in linears.items()}
