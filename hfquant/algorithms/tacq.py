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
* ``Q(W)``: by default (``saliency_grid="rtn"``) the layer quantized uniformly, i.e.
  round-to-nearest on its min-max grid at the configured ``bits`` and ``group_size`` -- the
  paper's "uniformly quantized model" that the full-precision one is contrasted with. It is
  data-free, so all layers' scores exist before the sequential pass and can be ranked together
  (``kept_scope="global"``). With ``saliency_grid="solved"`` it is the solver's own result
  (the driver runs a first pass of GPTQ or decoupleQ without kept weights, selects, and
  quantizes again), as the paper scores against GPTQ's weights; departure: the first pass skips
  block-wise minimization, whose float changes come after the selection anyway.
* ``"tacq_fisher"`` (a hybrid with the Hessian's activation-weighted error): QAL's first-order
  loss change ``|G (Q(W) - W)|`` plus the second-order term ``F (Q(W) - W)^2 / 2``, where
  ``F = sum_n (dL_n/dW)^2`` is the empirical Fisher diagonal -- per example the squared output
  gradient times the squared input activation, i.e. ``diag(H)``'s activation-weighted error in the
  task loss's units, so the scores still rank across layers. The product with MSG is kept.

Baselines at the same budget:

* ``"magnitude"``: ``S_ij = |W_ij|``.
* ``"hessian"``: ``S_ij = H_jj * (Q(W)_ij - W_ij)^2`` with ``H = E[x x^T]`` over the layer's
  inputs on the saliency data (the OBD estimate of the layer-output error quantizing ``W_ij``
  alone causes). ``diag(H)`` is collected in the same full-precision pre-pass, so both scopes work.

Selection keeps the ``kept_fraction`` highest scores of every layer (``"layer"``) or of all
layers together (``"global"``, TaCQ's default: its scores are estimates of the same task-loss
change in every layer, so ranking them together puts the budget where the task is).

This module holds the scores and the selection, pure functions of tensors. The task examples
(chat rows, answer-only labels) are read by :mod:`hfquant.task_data`; ``G`` and ``diag(H)`` are
collected on the model by :mod:`hfquant.driver.kept`.
"""

from __future__ import annotations

import torch

from hfquant.algorithms.rtn import rtn_quantize


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
    squared_gradient: torch.Tensor | None = None,
    quantized: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of every weight (float32 ``[out, in]``, higher = keep); see the module docstring.

    ``quantized`` is ``Q(W)`` (the solver's dequantized result, ``saliency_grid="solved"``);
    ``None`` rounds ``weight`` to nearest on its min-max grid."""
    w = weight.detach().float()
    if kind == "magnitude":
        return w.abs()
    if quantized is None:
        change = quantization_change(w, bits, group_size)
    else:
        change = quantized.float() - w
    if kind == "hessian":
        return hessian_diag.float()[None, :] * change.pow(2)
    if kind == "tacq":
        return (gradient * change).abs() * (w * gradient).abs()
    if kind == "tacq_fisher":
        return ((gradient * change).abs() + 0.5 * squared_gradient * change.pow(2)) * (w * gradient).abs()
    raise ValueError(f"saliency must be one of ['tacq', 'tacq_fisher', 'magnitude', 'hessian'], got {kind!r}")


def select_kept(
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
