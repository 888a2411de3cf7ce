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

Layers stored on a GGUF block type (a ``grid_spec``, :mod:`hfquant.formats.gguf`) are tuned as
block-wise minimization tunes them: training steps the unprojected grid, each candidate is scored
projected onto the values the type stores (float16 factors, integer sub-block codes), and the kept
state's codes are handed back through the layer's ``set_codes``, so the export stays lossless.

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

from hfquant.algorithms.block import train_keep_best
from hfquant.algorithms.blockwise import (
    project_typed_grids,
    relative_values,
    trainable_float_parameters,
    typed_grids,
)


@dataclass
class EndToEndResult:
    """Validation KL (nats per token) before tuning and after each epoch."""

    validation_kl: list[float] = field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        """The epoch whose state was kept (0: the start); the first of equal scores."""
        return self.validation_kl.index(min(self.validation_kl))

    @property
    def start_kl(self) -> float:
        return self.validation_kl[0]

    @property
    def best_kl(self) -> float:
        return self.validation_kl[self.best_epoch]


def grid_modules(model: nn.Module) -> set[str]:
    """Names of the quantized layers: modules holding float ``scales`` and ``zeros`` buffers."""
    return {
        name
        for name, module in model.named_modules()
        if {"scales", "zeros"} <= dict(module.named_buffers(recurse=False)).keys() and module.scales.is_floating_point()
    }


def float_parameters(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every quantized layer's ``scales``/``zeros`` and every normalization weight, as block-wise
    minimization tunes them."""
    return trainable_float_parameters(model, grid_modules(model))


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

    ``train`` and ``validation`` are ``[n, seqlen]`` token windows, ``train`` cut into fixed batches
    of ``batch_size`` visited in a seeded random order each epoch; each epoch ends with the
    validation KL at storage precision, and the best state seen (the start included) is written
    back. Teacher logits are computed on the fly, one batch at a time (holding them for every
    window would take ``n * seqlen * vocab`` floats).
    """
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0, lr > 0 and batch_size >= 1, got {epochs}, {lr}, {batch_size}")
    if len(validation) == 0:
        raise ValueError("tune_end_to_end needs validation windows to choose the state it keeps")
    grids = grid_modules(model)
    start, typed = trainable_float_parameters(model, grids), typed_grids(model, grids)
    if not start:
        raise ValueError("the model has no quantized scales/zeros or normalization weights to tune")
    was_training = model.training
    model.eval()  # no dropout: the teacher and the student see the same function of the input
    device = start[next(iter(start))][0].device
    with torch.no_grad():
        val_targets = [teacher(ids.to(device)) for ids in validation.split(batch_size)]

    def score(values: dict[str, torch.Tensor]) -> float:  # train_keep_best calls it without grad
        total = sum(
            float(_kl(_logits(model, values, ids.to(device)), target)) * len(ids)
            for ids, target in zip(validation.split(batch_size), val_targets, strict=True)
        )
        return total / len(validation)

    deltas = {n: torch.zeros_like(v, dtype=torch.float32, requires_grad=True) for n, (v, _) in start.items()}
    batches = list(train.split(batch_size))
    result = EndToEndResult()

    def loss(i: int) -> torch.Tensor:
        ids = batches[i].to(device)
        with torch.no_grad():
            target = teacher(ids)
        return _kl(_logits(model, relative_values(start, deltas, None), ids), target)

    def evaluate() -> tuple[float, tuple[dict[str, torch.Tensor], dict]]:
        candidate = relative_values(start, deltas, storage_dtype, typed)
        codes = project_typed_grids(candidate, typed)
        result.validation_kl.append(score(candidate))
        return result.validation_kl[-1], (candidate, codes)

    _, (best_values, best_codes) = train_keep_best(
        torch.optim.Adam(list(deltas.values()), lr=lr), loss, len(batches), epochs, evaluate, seed
    )
    with torch.no_grad():
        for name, value in best_values.items():
            module_name, _, attr = name.rpartition(".")
            getattr(model.get_submodule(module_name), attr).copy_(value)
        for prefix, codes in best_codes.items():
            model.get_submodule(prefix[:-1]).set_codes(codes)
    model.train(was_training)
    return result
