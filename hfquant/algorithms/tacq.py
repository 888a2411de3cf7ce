"""TaCQ (Xiao et al., 2025, arXiv:2504.07389): keep in 16 bits the weights whose quantization hurts the task most.

Saliency of weight ``W_ij`` of a linear layer (``saliency="tacq"``), as in the paper::

    S_ij = |G_ij * (Q(W)_ij - W_ij)|  *  |W_ij * G_ij|
           quantization-aware            magnitude-sharpened
           localization (QAL)            gradient (MSG)

* ``G = sum_n |dL_n/dW|``: the task-loss gradient of the *full-precision* model, its absolute
  value accumulated over the task examples ``n`` as the authors' code does (``L_n``: mean token
  cross-entropy of example ``n``, on answer tokens only for chat examples; one backward per
  example). With the gradient of the mean loss instead, examples that pull a weight in opposite
  directions cancel out; measured at W3 g64 on SmolLM2-135M (``benchmarks/tacq.py``, 2 seeds),
  code perplexity 23.10 -> 20.85 and fact QA 20.0% -> 21.5%. QAL is the first-order (attribution
  patching) estimate of how much the loss moves when ``W_ij`` moves to its quantized value; MSG,
  the first-order effect of removing the weight, sharpens it towards weights that matter at all.
* ``Q(W)``: the layer quantized uniformly, i.e. round-to-nearest on its min-max grid at the
  configured ``bits`` and ``group_size`` -- the paper's "uniformly quantized model" that the
  full-precision one is contrasted with. It is data-free, so all layers' scores exist before the
  sequential pass and can be ranked together (``outlier_scope="global"``).

Baselines at the same budget:

* ``"magnitude"``: ``S_ij = |W_ij|``.
* ``"hessian"``: ``S_ij = H_jj * (Q(W)_ij - W_ij)^2`` with ``H = E[x x^T]`` over the layer's
  inputs on the saliency data (the OBD estimate of the layer-output error quantizing ``W_ij``
  alone causes). ``diag(H)`` is collected in the same full-precision pre-pass, so both scopes work.

Selection keeps the ``outlier_fraction`` highest scores of every layer (``"layer"``) or of all
layers together (``"global"``, TaCQ's default: its scores are estimates of the same task-loss
change in every layer, so ranking them together puts the budget where the task is). Memory:
gradients live in the weights' ``.grad`` (one float tensor per quantized weight, the size of the
model) and their running sum of absolute values (another), with gradient checkpointing where
the model supports it, so activations stay at one block's worth per example.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn

from hfquant.algorithms.grid import grid_at
from hfquant.algorithms.rtn import rtn_quantize
from hfquant.config import HfQuantConfig

IGNORE = -100  # label of tokens the task loss does not cover
GRADIENT_BATCH_SIZE = 4  # examples per backward: bounds the logits' memory ([batch, seqlen, vocab])


@dataclass
class TaskBatch:
    input_ids: torch.Tensor  # long [b, L]
    labels: torch.Tensor  # long [b, L], IGNORE where no loss is taken
    attention_mask: torch.Tensor  # long [b, L], 0 on right padding


def _chat_rows(task_dataset: Any) -> list[dict[str, Any]] | None:
    """The examples as chat rows, or None when the task set is plain text."""
    if isinstance(task_dataset, (str, os.PathLike)) and str(task_dataset).endswith(".jsonl"):
        lines = Path(task_dataset).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    elif isinstance(task_dataset, datasets.Dataset):
        if not (
            {"messages"} <= set(task_dataset.column_names)
            or {"question", "answer"} <= set(task_dataset.column_names)
        ):
            return None
        rows = list(task_dataset)
    elif isinstance(task_dataset, Sequence) and not isinstance(task_dataset, str) and task_dataset:
        if not all(isinstance(row, dict) for row in task_dataset):
            return None
        rows = list(task_dataset)
    else:
        return None
    for row in rows:
        if not (isinstance(row, dict) and ("messages" in row or {"question", "answer"} <= set(row))):
            raise ValueError(
                f"task_dataset chat examples need 'messages' or 'question' and 'answer', got {row!r:.200}"
            )
    return rows


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return list(row["messages"])
    return [
        {"role": "user", "content": str(row["question"])},
        {"role": "assistant", "content": str(row["answer"])},
    ]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def chat_example_tokens(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and labels that cover the assistant turns only."""
    messages = _messages(row)
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True))
        end = len(_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    if all(label == IGNORE for label in labels):
        raise ValueError("a task_dataset chat example has no assistant answer to take the loss on")
    return ids, labels


def task_batches(
    task_dataset: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    batch_size: int = GRADIENT_BATCH_SIZE,
) -> list[TaskBatch]:
    """Batches of task examples: every chat row (answer-only loss, each cut to its last ``seqlen``
    tokens so the answer survives: a few dozen short answers are the whole task signal, so none
    is dropped), or ``nsamples`` random ``seqlen``-token windows of a text source."""
    rows = _chat_rows(task_dataset)
    if rows is None:
        from hfquant.calibration import get_calibration_data

        return batches_from_ids(
            get_calibration_data(task_dataset, tokenizer, nsamples, seqlen, seed), batch_size
        )
    examples = [chat_example_tokens(row, tokenizer) for row in rows]
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = [(ids[-seqlen:], labels[-seqlen:]) for ids, labels in examples[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches.append(
            TaskBatch(
                torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in chunk]),
                torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            )
        )
    return batches


def batches_from_ids(ids: torch.Tensor, batch_size: int = GRADIENT_BATCH_SIZE) -> list[TaskBatch]:
    """Language-modelling batches (loss on every token) from ``[n, seqlen]`` token windows."""
    return [TaskBatch(chunk, chunk.clone(), torch.ones_like(chunk)) for chunk in ids.split(batch_size)]


def task_statistics(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    batches: list[TaskBatch],
    gradients: bool,
    hessian_diag: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``sum_n |dL_n/dW|`` of every linear (``gradients``) and ``diag(E[x x^T])`` of its inputs
    (``hessian_diag``).

    ``L_n`` is the mean token loss of example ``n`` (one backward each, whatever the batching), so
    weights that two examples pull in opposite directions still count for both. Only the linears'
    weights require gradients meanwhile; the model's ``requires_grad`` flags, training mode and
    gradient-checkpointing setting are restored after.
    """
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    if gradients:
        batches = [one for batch in batches for one in _single_examples(batch)]
        if all(int((b.labels[:, 1:] != IGNORE).sum()) == 0 for b in batches):
            raise ValueError("the task examples have no token to take the loss on")
    diag = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    grads = (
        {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()} if gradients else {}
    )
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
                            grads[name] += m.weight.grad.abs()
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
    return grads, {n: d / max(counts[n], 1) for n, d in diag.items()}


def _single_examples(batch: TaskBatch) -> list[TaskBatch]:
    """One batch per example, without its right padding."""
    out = []
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask, strict=True):
        n = int(mask.sum())
        out.append(TaskBatch(ids[None, :n], labels[None, :n], mask[None, :n]))
    return out


def quantization_change(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``Q(W) - W`` under the layer's uniform (round-to-nearest, min-max) grid."""
    return rtn_quantize(weight, bits, group_size).dequantize(group_size) - weight.float()


def saliency_scores(
    kind: str,
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    gradient: torch.Tensor | None = None,
    hessian_diag: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of every weight (float32 ``[out, in]``, higher = keep); see the module docstring."""
    w = weight.detach().float()
    if kind == "magnitude":
        return w.abs()
    change = quantization_change(w, bits, group_size)
    if kind == "hessian":
        return hessian_diag.float()[None, :] * change.pow(2)
    if kind == "tacq":
        return (gradient * change).abs() * (w * gradient).abs()
    raise ValueError(f"saliency must be one of ['tacq', 'magnitude', 'hessian'], got {kind!r}")


def select_keep_masks(
    scores: dict[str, torch.Tensor], fraction: float, scope: str
) -> dict[str, torch.Tensor]:
    """Bool masks of the ``fraction`` highest scores, per layer or over all layers together."""
    if scope == "layer":
        return {name: _top(s.flatten(), round(fraction * s.numel())).view_as(s) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])  # global ranking needs every score once
    chosen = _top(flat, round(fraction * flat.numel()))
    sizes = [s.numel() for s in scores.values()]
    return {
        name: part.view_as(s) for (name, s), part in zip(scores.items(), chosen.split(sizes), strict=True)
    }


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask


def keep_masks(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    config: HfQuantConfig,
    tokenizer: Any = None,
    calibration_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Which weights of each linear stay in 16 bits, from the full-precision model (before quantizing).

    The saliency data is ``config.task_dataset``, else the calibration windows ``calibration_ids``.
    Scores need every layer's weights at once, so offloaded (``meta``) weights are refused.
    """
    offloaded = [n for n, m in linears.items() if m.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"outlier_fraction > 0 needs the model's weights in memory, but {offloaded[0]} is offloaded: "
            "load the model without disk offload to choose kept weights"
        )
    if config.saliency == "magnitude":
        scores = {
            n: saliency_scores("magnitude", m.weight, config.bits, config.group_size)
            for n, m in linears.items()
        }
        return select_keep_masks(scores, config.outlier_fraction, config.outlier_scope)
    if config.task_dataset is not None:
        batches = task_batches(config.task_dataset, tokenizer, config.nsamples, config.seqlen, config.seed)
    else:
        batches = batches_from_ids(calibration_ids)
    tacq = config.saliency == "tacq"
    grads, diags = task_statistics(model, linears, batches, gradients=tacq, hessian_diag=not tacq)
    scores = {}
    for name, m in linears.items():
        scores[name] = saliency_scores(
            config.saliency, m.weight, config.bits, config.group_size, grads.pop(name, None), diags.pop(name)
        )
    return select_keep_masks(scores, config.outlier_fraction, config.outlier_scope)


def grid_values(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``scales * Q + zeros`` at the positions ``(rows, cols)`` only, in float32, with the same
    arithmetic as :func:`~hfquant.algorithms.grid.dequantize_grid`."""
    in_features = qweight.shape[1]
    s = grid_at(scales.float(), rows, cols, in_features, group_size)
    return qweight[rows, cols].float() * s + grid_at(zeros.float(), rows, cols, in_features, group_size)
