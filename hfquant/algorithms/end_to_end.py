"""End-to-end tuning of a quantized model's float part against the full-precision model.

After every block is solved, the integers are frozen and the float parameters of the whole model
(each quantized layer's ``scales`` and ``zeros``, and the normalization weights) are trained so
that the quantized model's next-token distribution matches the full-precision model's:
``KL(p_fp || p_q)`` averaged over the calibration tokens. Block-wise minimization matches each
block's output in isolation; this step sees the errors of all blocks together, in the quantity a
user reads (the next-token distribution), like the E2E-QP stage of EfficientQAT (arXiv:2407.11062),
which trains the step sizes end to end with the integers frozen.

Where it departs from EfficientQAT: the loss is the KL divergence to the full-precision model
(distillation) rather than next-token cross-entropy on the calibration text, so the model is pulled
towards its own full-precision behaviour, not towards the calibration corpus; steps are relative
(as in block-wise minimization: ``scales = s0 (1 + a)``, ``zeros = z0 + s0 b``, ``norm = n0 (1 + c)``,
``a, b, c`` trained from zero); and the state kept is the one with the lowest KL on held-back
calibration windows that were never trained on (the starting state included), scored at storage
precision, so the result never scores worse than the input on those windows.

Pure: works on any ``nn.Module`` whose quantized layers hold float ``scales`` and ``zeros``
buffers that the forward reads (every hfquant format does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# name -> (starting value, unit of a relative step)
Start = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EndToEndResult:
    """Validation KL (nats per token) before tuning and after each epoch; ``best_epoch`` 0 is the start."""

    validation_kl: list[float] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def start_kl(self) -> float:
        return self.validation_kl[0]

    @property
    def best_kl(self) -> float:
        return self.validation_kl[self.best_epoch]


def float_parameters(model: nn.Module) -> Start:
    """Every quantized layer's ``scales``/``zeros`` buffers and every normalization weight."""
    found: Start = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        buffers = dict(module.named_buffers(recurse=False))
        if "scales" in buffers and "zeros" in buffers and buffers["scales"].is_floating_point():
            scales = buffers["scales"].detach().clone()
            found[prefix + "scales"] = (scales, scales)
            found[prefix + "zeros"] = (buffers["zeros"].detach().clone(), scales)
        elif "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter):
            weight = module.weight.detach().clone()
            found[prefix + "weight"] = (weight, weight)
    return found


def _values(start: Start, deltas: dict[str, torch.Tensor], storage_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    values = {}
    for name, (value, unit) in start.items():
        new = value + unit * deltas[name]
        if storage_dtype is not None and name.endswith(("scales", "zeros")):
            new = new.to(storage_dtype).to(value.dtype)
        values[name] = new
    return values


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)``."""
    vocab = student_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1),
        F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def _logits(model: nn.Module, values: dict[str, torch.Tensor] | None, ids: torch.Tensor) -> torch.Tensor:
    if values is None:
        return model(input_ids=ids, use_cache=False).logits
    return functional_call(model, values, (), {"input_ids": ids, "use_cache": False}, strict=False).logits


def tune_end_to_end(
    model: nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    train: torch.Tensor,
    validation: torch.Tensor,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 2,
    storage_dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> EndToEndResult:
    """Train ``model``'s float part in place to match ``teacher(ids) -> logits`` on ``train`` windows.

    ``train`` and ``validation`` are ``[n, seqlen]`` token windows; each epoch ends with the
    validation KL at storage precision, and the best state seen (the start included) is written
    back. Teacher logits are computed on the fly, one batch at a time (holding them for every
    window would take ``n * seqlen * vocab`` floats).
    """
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0, lr > 0 and batch_size >= 1, got {epochs}, {lr}, {batch_size}")
    if len(validation) == 0:
        raise ValueError("tune_end_to_end needs validation windows to choose the state it keeps")
    start = float_parameters(model)
    if not start:
        raise ValueError("the model has no quantized scales/zeros or normalization weights to tune")
    was_training = model.training
    model.eval()  # no dropout: the teacher and the student see the same function of the input
    device = start[next(iter(start))][0].device
    with torch.no_grad():
        val_targets = [teacher(ids.to(device)) for ids in validation.split(batch_size)]

    def score(values: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            total = sum(
                float(_kl(_logits(model, values, ids.to(device)), target)) * len(ids)
                for ids, target in zip(validation.split(batch_size), val_targets, strict=True)
            )
        return total / len(validation)

    deltas = {n: torch.zeros_like(v, dtype=torch.float32, requires_grad=True) for n, (v, _) in start.items()}
    best_values = _values(start, deltas, storage_dtype)
    result = EndToEndResult(validation_kl=[score(best_values)])
    optimizer = torch.optim.Adam(list(deltas.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(batch_size):
            ids = train[batch].to(device)
            with torch.no_grad():
                target = teacher(ids)
            with torch.enable_grad():
                loss = _kl(_logits(model, _values(start, deltas, None), ids), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        candidate = _values(start, deltas, storage_dtype)
        result.validation_kl.append(score(candidate))
        if result.validation_kl[-1] < result.best_kl:
            result.best_epoch, best_values = epoch, candidate
    with torch.no_grad():
        for name, value in best_values.items():
            module_name, _, attr = name.rpartition(".")
            getattr(model.get_submodule(module_name), attr).copy_(value)
    model.train(was_training)
    return result
