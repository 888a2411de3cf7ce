"""Sequential block-by-block driver (GPTQ style) for the calibrated methods.

The first decoder block's inputs are captured once with a hook; then, block by block: run the
full-precision block on its inputs (collecting each linear's input Hessian ``H = X^T X / n`` in
float32 and the block's outputs as targets), solve each linear against its ``H``, tune the
block's float parameters by block-wise minimization, and run the *quantized* block to produce
the next block's inputs, so later blocks learn to absorb earlier blocks' errors. Only one
block's weights and activations take part at a time.

INQ (``method="inq"``) takes the place of the per-layer solves: it quantizes the block's linears
share by share, retraining the still-float weights against the same targets in between.

Weights kept in 16 bits (``outlier_fraction > 0``, TaCQ) are chosen once on the full-precision
model before the sequential pass (:func:`hfquant.algorithms.tacq.keep_masks`). Each solve then
leaves them out (no error fed back, no influence on the grid), and the layer stores, at those
positions, the 16-bit residual ``W - grid`` so that ``W_hat = W`` there up to float16 rounding of
the residual. Block-wise minimization moves the grid under them, so their residuals are
recomputed from the original weights afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfquant.algorithms.grid import QuantizedWeight, quantize_to_grid
from hfquant.algorithms.rtn import rtn_quantize
from hfquant.algorithms.splitquant import SplitWeight
from hfquant.algorithms.tacq import grid_values, keep_masks
from hfquant.config import HfQuantConfig
from hfquant.nn.decoupled_linear import STORAGE_DTYPE, DecoupledLinear
from hfquant.nn.power_of_two_linear import PowerOfTwoLinear
from hfquant.nn.replace import linears_to_convert, set_module
from hfquant.nn.split_linear import SplitLinear


@dataclass
class BlockReport:
    index: int
    error_before: float  # mean squared error of the block output after the per-layer solve
    error_after: float  # ... after block-wise minimization


@dataclass
class QuantizationReport:
    method: str
    bits: int
    group_size: int
    layers: int
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def solve_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: HfQuantConfig,
    keep_mask: torch.Tensor | None = None,
) -> QuantizedWeight | SplitWeight:
    """Quantize one weight matrix with the configured method; ``keep_mask`` weights are left out.

    With ``split_clusters > 1`` the result is a SplitQuant weight (``keep_mask`` is then refused
    by the config).
    """
    if config.split_clusters > 1:
        from hfquant.algorithms.splitquant import split_quantize

        return split_quantize(
            weight,
            hessian,
            config.bits,
            config.group_size,
            config.split_clusters,
            method=config.method,
            iters=config.decoupleq_iters,
            damp=config.damp,
            act_order=config.act_order if config.method == "gptq" else True,
        )
    if config.method == "rtn":
        if keep_mask is None:
            return rtn_quantize(weight, config.bits, config.group_size)
        from hfquant.algorithms.gptq import masked_minmax_grid

        scales, zeros = masked_minmax_grid(weight, config.bits, config.group_size, keep_mask)
        return QuantizedWeight(
            quantize_to_grid(weight, scales, zeros, config.bits, config.group_size), scales, zeros
        )
    if config.method == "gptq":
        from hfquant.algorithms.gptq import gptq_quantize

        return gptq_quantize(
            weight,
            hessian,
            config.bits,
            config.group_size,
            damp=config.damp,
            act_order=config.act_order,
            keep_mask=keep_mask,
        )
    from hfquant.algorithms.decoupleq import decoupleq_quantize

    return decoupleq_quantize(
        weight,
        hessian,
        config.bits,
        config.group_size,
        iters=config.decoupleq_iters,
        damp=config.damp,
        keep_mask=keep_mask,
    )


def quantize_model(
    model: nn.Module,
    config: HfQuantConfig,
    tokenizer: Any = None,
    skip: list[str] | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Replace every convertible linear of ``model`` by its quantized module, in place.

    :class:`DecoupledLinear`, or :class:`~hfquant.nn.SplitLinear` (``split_clusters > 1``), or
    :class:`~hfquant.nn.PowerOfTwoLinear` (``method="inq"``).
    """
    start = time.perf_counter()
    linears = linears_to_convert(model, config.modules_to_not_convert if skip is None else skip)
    if not linears:
        raise ValueError(
            "the model has no nn.Linear layer to quantize (all skipped by modules_to_not_convert?)"
        )
    report = QuantizationReport(config.method, config.bits, config.group_size, len(linears))
    # rtn reads text only for a saliency without its own task set.
    needs_ids = config.needs_calibration and (config.method != "rtn" or config.task_dataset is None)
    ids = _calibration_ids(model, config, tokenizer) if needs_ids else None
    masks: dict[str, torch.Tensor] = {}
    if config.outlier_fraction > 0:
        reads_task = config.task_dataset is not None and config.saliency != "magnitude"
        masks = keep_masks(
            model, linears, config, _tokenizer(model, config, tokenizer) if reads_task else None, ids
        )
    if config.method == "rtn":
        for name, linear in tqdm(linears.items(), desc="hfquant rtn", disable=not progress):
            quantized = solve_layer(linear.weight.data, None, config, masks.get(name))
            set_module(model, name, _to_module(quantized, linear, config, masks.get(name)))
    else:
        _quantize_sequential(model, linears, ids, config, report, progress, masks)
    report.seconds = time.perf_counter() - start
    model.hfquant_report = report
    return report


def _to_module(
    quantized: QuantizedWeight | SplitWeight,
    linear: nn.Linear,
    config: HfQuantConfig,
    keep_mask: torch.Tensor | None = None,
) -> DecoupledLinear | SplitLinear:
    if isinstance(quantized, SplitWeight):
        return SplitLinear.from_quantized(
            quantized, config.bits, config.group_size, bias=linear.bias, dtype=linear.weight.dtype
        )
    outliers = None
    if keep_mask is not None and keep_mask.any():
        rows, cols = keep_mask.nonzero(as_tuple=True)
        grid = grid_values(
            quantized.qweight,
            quantized.scales.to(STORAGE_DTYPE),
            quantized.zeros.to(STORAGE_DTYPE),
            rows,
            cols,
            config.group_size,
        )
        outliers = (rows.int(), cols.int(), linear.weight.data[rows, cols].float() - grid)
    return DecoupledLinear.from_quantized(
        quantized,
        config.bits,
        config.group_size,
        bias=linear.bias,
        outliers=outliers,
        dtype=linear.weight.dtype,
    )


def _inq_block(
    block: nn.Module,
    block_linears: dict[str, nn.Linear],
    batches: list[tuple[torch.Tensor, dict[str, Any]]],
    targets: list[torch.Tensor],
    config: HfQuantConfig,
) -> None:
    """INQ on one block (its retraining uses the block-wise epochs and learning rate), then swap the modules."""
    from hfquant.algorithms.inq import inq_block

    codes = inq_block(
        block, block_linears, batches, targets, config.bits, epochs=config.blockwise_epochs, lr=config.blockwise_lr
    )
    for name, (q, n1) in codes.items():
        linear = block_linears[name]
        module = PowerOfTwoLinear.from_codes(q, n1, config.bits, bias=linear.bias, dtype=linear.weight.dtype)
        set_module(block, name, module)


def refresh_kept_weights(module: DecoupledLinear, kept: torch.Tensor) -> None:
    """Reset the 16-bit residuals so the kept weights equal ``kept`` again on the module's current grid."""
    rows, cols = module.outlier_rows.long(), module.outlier_cols.long()
    grid = grid_values(module.integers(), module.scales, module.zeros, rows, cols, module.group_size)
    module.outlier_values.copy_((kept.float() - grid).to(STORAGE_DTYPE))


def _tokenizer(model: nn.Module, config: HfQuantConfig, tokenizer: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = tokenizer or config.tokenizer or getattr(model, "name_or_path", None)
    if tokenizer is None:
        raise ValueError(
            f"method={config.method!r} with saliency={config.saliency!r} needs calibration text: "
            "pass a tokenizer in HfQuantConfig"
        )
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _calibration_ids(model: nn.Module, config: HfQuantConfig, tokenizer: Any) -> torch.Tensor:
    from hfquant.calibration import get_calibration_data

    tokenizer = _tokenizer(model, config, tokenizer)
    return get_calibration_data(config.dataset, tokenizer, config.nsamples, config.seqlen, seed=config.seed)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks, found by its length (architecture-agnostic)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, blocks in candidates:
        if n_layers is None or len(blocks) == n_layers:
            return name, blocks
    raise ValueError("could not find the decoder blocks (an nn.ModuleList of num_hidden_layers blocks)")


def _execution_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Hidden states and keyword arguments the first block receives, one entry per batch."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = _execution_device(model)
    try:
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def onload_block(block: nn.Module) -> None:
    """Bring an accelerate-offloaded block's weights onto its execution device, for good.

    With ``device_map``/``max_memory`` offload, a block's weights live on disk or CPU and its
    hooks load them for each forward. The driver needs them once, to quantize them; the quantized
    block is several times smaller and stays on the execution device, hooks removed, so only one
    full-precision block is ever resident.
    """
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import has_offloaded_params

    offloaded = [m for m in block.modules() if has_offloaded_params(m)]
    for module in offloaded:
        module._hf_hook.pre_forward(module)
    if offloaded:
        remove_hook_from_module(block, recurse=True)


def _mark_resident(model: nn.Module, block_prefix: str, device: torch.device) -> None:
    """Record in ``hf_device_map`` that a quantized block now lives on ``device`` (not disk)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for key in device_map:
            if (key + ".").startswith(block_prefix):
                device_map[key] = device.index if device.type == "cuda" else device.type


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _run_full_precision(
    block: nn.Module, block_linears: dict[str, nn.Linear], batches: list[tuple[torch.Tensor, dict[str, Any]]]
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Each linear's input Hessian (float32, averaged over tokens) and the block's outputs."""
    hessians = {
        name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
        for name, m in block_linears.items()
    }
    counts = dict.fromkeys(block_linears, 0)

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in block_linears.items()]
    try:
        outputs = [_block_output(block, hidden, kwargs) for hidden, kwargs in batches]
    finally:
        for handle in handles:
            handle.remove()
    return {name: h / max(counts[name], 1) for name, h in hessians.items()}, outputs


@torch.no_grad()
def block_error(
    block: nn.Module, batches: list[tuple[torch.Tensor, dict[str, Any]]], targets: list[torch.Tensor]
) -> float:
    """Mean squared error of the block's output against its full-precision targets."""
    total, count = 0.0, 0
    for (hidden, kwargs), target in zip(batches, targets, strict=True):
        out = _block_output(block, hidden, kwargs)
        total += float((out.float() - target.float()).pow(2).sum())
        count += target.numel()
    return total / max(count, 1)


def _quantize_sequential(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    ids: torch.Tensor,
    config: HfQuantConfig,
    report: QuantizationReport,
    progress: bool,
    masks: dict[str, torch.Tensor],
) -> None:
    from hfquant.algorithms.blockwise import block_minimize

    prefix, blocks = find_decoder_blocks(model)
    batches = capture_block_inputs(model, blocks[0], ids, config.blockwise_batch_size)
    bar = tqdm(range(len(blocks)), desc=f"hfquant {config.method}", disable=not progress)
    for index in bar:
        block = blocks[index]
        onload_block(block)
        block_prefix = f"{prefix}.{index}."
        block_linears = {
            n.removeprefix(block_prefix): m for n, m in linears.items() if n.startswith(block_prefix)
        }
        # INQ reads no Hessian: no linear is hooked.
        inq = config.method == "inq"
        hessians, targets = _run_full_precision(block, {} if inq else block_linears, batches)
        kept: dict[str, torch.Tensor] = {}  # original values of the kept weights, per linear
        if inq:
            _inq_block(block, block_linears, batches, targets, config)
        else:
            for name, linear in block_linears.items():
                mask = masks.get(block_prefix + name)
                quantized = solve_layer(linear.weight.data, hessians[name], config, mask)
                module = _to_module(quantized, linear, config, mask)
                if isinstance(module, DecoupledLinear) and module.num_outliers:
                    kept[name] = linear.weight.data[
                        module.outlier_rows.long(), module.outlier_cols.long()
                    ].clone()
                set_module(block, name, module)
        del hessians
        before = block_error(block, batches, targets)
        after = before
        if config.blockwise_epochs > 0:
            after = block_minimize(
                block, batches, targets, epochs=config.blockwise_epochs, lr=config.blockwise_lr
            )
            if kept:
                with torch.no_grad():
                    for name, values in kept.items():
                        refresh_kept_weights(block.get_submodule(name), values)
                after = block_error(block, batches, targets)
        report.blocks.append(BlockReport(index, before, after))
        _mark_resident(model, block_prefix, next(block.buffers()).device)
        bar.set_postfix_str(f"block {index} mse {before:.3g} -> {after:.3g}")
        with torch.no_grad():
            batches = [(_block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in batches]
