"""Choosing the kept 16-bit weights (TaCQ and its baselines) on the full-precision model.

The scores and the selection are pure (:mod:`hfquant.algorithms.tacq`); this module runs the model
to collect what they need: ``G = sum_n |dL_n/dW|`` over the task examples (and for
``tacq_fisher`` ``F = sum_n (dL_n/dW)^2``) and ``diag(E[x x^T])`` of each linear's inputs. With
``saliency_grid="solved"`` the scores contrast ``W`` with the solver's result, which the driver
computes on request (``solve_first``). Memory: gradients live in the weights' ``.grad`` (one float tensor per
quantized weight, the size of the model) and their running sums (one more per statistic), with
gradient checkpointing where the model supports it, so activations stay at one block's worth per
example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.tacq import saliency_scores, select_kept
from hfquant.config import HfQuantConfig
from hfquant.driver.blocks import execution_device
from hfquant.task_data import IGNORE, TaskBatch, batches_from_ids, single_examples, task_batches


@dataclass
class TaskStatistics:
    """What :func:`task_statistics` collected, by linear name (empty where not asked for)."""

    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_n |dL_n/dW|
    squared_gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_n (dL_n/dW)^2
    hessian_diag: dict[str, torch.Tensor] = field(default_factory=dict)  # diag(E[x x^T]) of the inputs


def task_statistics(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    batches: list[TaskBatch],
    gradients: bool,
    hessian_diag: bool,
    squared_gradients: bool = False,
) -> TaskStatistics:
    """``sum_n |dL_n/dW|`` of every linear (``gradients``), ``sum_n (dL_n/dW)^2``
    (``squared_gradients``, computed with them) and ``diag(E[x x^T])`` of its inputs (``hessian_diag``).

    ``L_n`` is the mean token loss of example ``n`` (one backward each, whatever the batching), so
    weights that two examples pull in opposite directions still count for both. Only the linears'
    weights require gradients meanwhile; the model's ``requires_grad`` flags, training mode and
    gradient-checkpointing setting are restored after.
    """
    device = execution_device(model)
    gradients = gradients or squared_gradients
    if gradients:
        batches = [one for batch in batches for one in single_examples(batch)]
        if all(int((b.labels[:, 1:] != IGNORE).sum()) == 0 for b in batches):
            raise ValueError("the task examples have no token to take the loss on")
    diag = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    out = TaskStatistics()
    if gradients:
        out.gradients = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    if squared_gradients:
        out.squared_gradients = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    state = {"mask": None}  # tokens of the current batch's first forward (recomputation skipped)

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if state["mask"] is None:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])[state["mask"]].float()
            diag[name] += x.pow(2).sum(0)
            counts[name] += x.shape[0]

        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    checkpointing = gradients and getattr(model, "supports_gradient_checkpointing", False)
    was_checkpointing = checkpointing and model.is_activation_checkpointing
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()] if hessian_diag else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in linears.values():
            m.weight.requires_grad_(gradients)
            m.weight.grad = None
        if checkpointing:
            # transformers recomputes blocks only in training mode; dropout stays off.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
        with torch.set_grad_enabled(gradients):
            for batch in batches:
                state["mask"] = batch.attention_mask.reshape(-1).bool().to(device)
                logits = model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    use_cache=False,
                ).logits
                state["mask"] = None
                if gradients:
                    loss = F.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(),
                        batch.labels[:, 1:].flatten().to(device),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                    (loss / max(int((batch.labels[:, 1:] != IGNORE).sum()), 1)).backward()
                    for name, m in linears.items():
                        if m.weight.grad is not None:
                            out.gradients[name] += m.weight.grad.abs()
                            if squared_gradients:
                                out.squared_gradients[name] += m.weight.grad.float().pow(2)
                            m.weight.grad = None
                del logits
    finally:
        state["mask"] = None
        for handle in handles:
            handle.remove()
        if checkpointing and not was_checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
        for m in linears.values():
            m.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if hessian_diag:
        out.hessian_diag = {n: d / max(counts[n], 1) for n, d in diag.items()}
    return out


def choose_kept(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    config: HfQuantConfig,
    tokenizer: Any = None,
    calibration_ids: torch.Tensor | None = None,
    solve_first: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool masks of the weights of each linear kept in 16 bits, chosen on the full-precision model
    (before quantizing).

    The saliency data is ``config.task_dataset``, else the calibration windows ``calibration_ids``.
    ``solve_first`` (``saliency_grid="solved"``) returns each linear's dequantized weight after a
    first solve, called once the task statistics are collected; ``None`` scores against
    round-to-nearest. Scores need every layer's weights at once, so offloaded (``meta``) weights are
    refused.
    """
    offloaded = [n for n, m in linears.items() if m.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"kept_fraction > 0 needs the model's weights in memory, but {offloaded[0]} is offloaded: "
            "load the model without disk offload to choose kept weights"
        )
    if config.saliency == "magnitude":
        scores = {
            n: saliency_scores("magnitude", m.weight, *_grid_of(config, n))
            for n, m in linears.items()
        }
        return select_kept(scores, config.kept_fraction, config.kept_scope)
    if config.task_dataset is not None:
        batches = task_batches(config.task_dataset, tokenizer, config.nsamples, config.seqlen, config.seed)
    else:
        batches = batches_from_ids(calibration_ids)
    hessian = config.saliency == "hessian"
    stats = task_statistics(
        model, linears, batches, gradients=not hessian, hessian_diag=hessian,
        squared_gradients=config.saliency == "tacq_fisher",
    )  # fmt: skip
    solved = solve_first() if solve_first is not None else {}
    scores = {}
    for name, m in linears.items():
        scores[name] = saliency_scores(
            config.saliency, m.weight, *_grid_of(config, name),
            gradient=stats.gradients.pop(name, None), hessian_diag=stats.hessian_diag.pop(name, None),
            squared_gradient=stats.squared_gradients.pop(name, None),
            quantized=solved.pop(name, None),
        )  # fmt: skip
    return select_kept(scores, config.kept_fraction, config.kept_scope)


def _grid_of(config: HfQuantConfig, name: str) -> tuple[int, int]:
    """The bits and group size the linear ``name`` is stored with (``dynamic`` rules applied)."""
    layer = config.module_config(name)
    return layer.bits, layer.group_size
