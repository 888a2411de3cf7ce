"""The sequential block-by-block driver (GPTQ style), top-down.

:func:`quantize_model` reads the calibration windows, chooses the kept 16-bit weights on the
full-precision model (TaCQ, :mod:`hfquant.driver.kept`; with ``saliency_grid="solved"`` against
:func:`first_solve`, a pass of the solver over a copy), then either rounds every linear
(``rtn``: no data) or runs :func:`quantize_blocks`: the first block's inputs are captured once;
then, block by block, the full-precision block runs on its inputs (collecting each linear's input
Hessian ``H = X^T X / n`` and the block's outputs as targets), each linear is solved against its
``H`` (or, for INQ, the block's linears are quantized share by share with retraining in between),
learned rounding optionally moves the solved integers (:mod:`hfquant.algorithms.rounding`),
block-wise minimization tunes the block's float parameters, and the *quantized* block produces
the next block's inputs, so later blocks learn to absorb earlier blocks' errors. Only one block's
weights and activations take part at a time.

Kept weights are left out of each solve and stored as 16-bit residuals over the grid; block-wise
minimization moves the grid under them, so their residuals are recomputed from the original
weights afterwards. With ``work_dir`` each finished block is saved and a rerun resumes
(:mod:`hfquant.driver.workdir`). With ``e2e_epochs``, a full-precision copy taken first is the
teacher of end-to-end tuning (:mod:`hfquant.algorithms.end_to_end`) once every block is done.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfquant.algorithms.block import Batches, block_error
from hfquant.algorithms.blockwise import block_minimize
from hfquant.algorithms.end_to_end import tune_end_to_end
from hfquant.algorithms.gptq import shrink_hessian
from hfquant.algorithms.inq import inq_block
from hfquant.algorithms.rounding import learn_rounding
from hfquant.calibration import get_calibration_data
from hfquant.config import DEFAULT_E2E_EPOCHS, HfQuantConfig
from hfquant.driver.blocks import (
    block_linears,
    capture_block_inputs,
    find_decoder_blocks,
    full_precision_pass,
    mark_resident,
    onload_block,
    propagate,
)
from hfquant.driver.kept import choose_kept
from hfquant.driver.solve import quantize_linear
from hfquant.driver.workdir import WorkDir
from hfquant.formats import STORAGE_DTYPE, QuantizedLinear, format_for
from hfquant.formats.gguf_presets import MixShape, layer_config
from hfquant.nn.experts import unfuse_experts
from hfquant.nn.replace import conv1d_to_linear, linears_to_convert, set_module

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    index: int
    error_before: float  # mean squared error of the block output after the per-layer solve (and learned rounding)
    error_after: float  # ... after block-wise minimization


@dataclass
class QuantizationReport:
    method: str
    bits: int
    group_size: int
    layers: int
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)
    resumed_blocks: int = 0  # blocks restored from ``work_dir`` rather than quantized in this run
    e2e_validation_kl: list[float] = field(default_factory=list)  # end-to-end tuning: start, each epoch
    # Wall seconds per stage ("calibration", "kept weights", "hessian pass", "solve", "learned
    # rounding", "block-wise", "end-to-end"), the GPU synchronized around each; ``seconds`` minus
    # their sum is the rest (module swaps, copies, block input capture and propagation).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def stage_shares(self) -> str:
        """``"solve 41%, block-wise 48%, ..."``: each timed stage's share of the whole quantization."""
        total = self.seconds or sum(self.stage_seconds.values()) or 1.0
        return ", ".join(f"{stage} {seconds / total:.0%}" for stage, seconds in self.stage_seconds.items())


@contextmanager
def timed(report: QuantizationReport, stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``report.stage_seconds[stage]`` (CUDA synchronized)."""
    _synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        _synchronize()
        report.stage_seconds[stage] = report.stage_seconds.get(stage, 0.0) + time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def quantize_model(
    model: nn.Module,
    config: HfQuantConfig,
    tokenizer: Any = None,
    skip: list[str] | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Replace every convertible linear of ``model`` by its quantized module (the config's format), in place."""
    start = time.perf_counter()
    skip = config.modules_to_not_convert if skip is None else skip
    conv1d_to_linear(model, skip)
    unfuse_experts(model, skip)
    linears = linears_to_convert(model, skip, config.keeps_full_precision)
    if not linears:
        raise ValueError(
            "the model has no nn.Linear layer to quantize (all skipped by modules_to_not_convert or "
            "dynamic's '-:' rules?)"
        )
    report = QuantizationReport(config.method, config.bits, config.group_size, len(linears))
    config.e2e_epochs = end_to_end_epochs(config, model)
    # rtn reads text only for a saliency without its own task set, or to tune end to end.
    needs_ids = config.needs_calibration and (
        config.method != "rtn" or config.task_dataset is None or config.e2e_epochs > 0
    )
    ids = validation = None
    if needs_ids:  # end-to-end tuning reads text: ids and its validation windows come together
        with timed(report, "calibration"):
            ids = calibration_ids(model, config, tokenizer)
            validation = e2e_validation_ids(model, config, tokenizer) if config.e2e_epochs else None
    teacher = full_precision_copy(model) if config.e2e_epochs else None
    kept: dict[str, torch.Tensor] = {}
    if config.kept_fraction > 0:
        reads_task = config.task_dataset is not None and config.saliency != "magnitude"
        task_tokenizer = resolve_tokenizer(model, config, tokenizer) if reads_task else None
        scored_against_solve = config.saliency_grid == "solved" and config.saliency != "magnitude"
        solve_first = (lambda: first_solve(model, linears, ids, config, progress)) if scored_against_solve else None
        with timed(report, "kept weights"):
            kept = choose_kept(model, linears, config, task_tokenizer, ids, solve_first)
    if config.method == "rtn":
        with timed(report, "solve"):
            for name, linear in tqdm(linears.items(), desc="hfquant rtn", disable=not progress):
                set_module(model, name, quantize_linear(linear, None, config.module_config(name), kept.get(name)))
    else:
        work = WorkDir.open(config, model, ids, kept) if config.work_dir else None
        quantize_blocks(model, linears, ids, config, report, kept, work, progress)
    if teacher is not None:
        with timed(report, "end-to-end"):
            report.e2e_validation_kl = tune_whole_model(model, teacher, ids, validation, config)
    report.seconds = time.perf_counter() - start
    return report


def first_solve(
    model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor, config: HfQuantConfig, progress: bool
) -> dict[str, torch.Tensor]:
    """Each linear's dequantized weight (float32) after a pass of the configured solver over a copy
    of the model, without kept weights, learned rounding or block-wise minimization: the ``Q(W)``
    that ``saliency_grid="solved"`` scores kept weights against. ``model`` is left as it is."""
    copy_model = copy.deepcopy(model)
    settings = copy.copy(config)
    settings.kept_fraction, settings.blockwise_epochs, settings.learned_rounding = 0.0, 0, False
    settings.work_dir = None
    copied = {name: copy_model.get_submodule(name) for name in linears}
    report = QuantizationReport(config.method, config.bits, config.group_size, len(copied))
    quantize_blocks(copy_model, copied, ids, settings, report, {}, None, progress)
    return {name: copy_model.get_submodule(name).dequantize(torch.float32) for name in linears}


def _offloaded(model: nn.Module) -> bool:
    """Whether some weights are offloaded (to disk or the meta device) rather than in memory."""
    return any(p.device.type == "meta" for p in model.parameters())


def end_to_end_epochs(config: HfQuantConfig, model: nn.Module) -> int:
    """``config.e2e_epochs``, or where it is ``None`` (the default) ``DEFAULT_E2E_EPOCHS`` for the
    calibrated solvers without kept weights on a model whose weights are all in memory, else 0."""
    if config.e2e_epochs is not None:
        return config.e2e_epochs
    if config.method not in ("gptq", "decoupleq") or config.kept_fraction > 0:
        return 0
    if _offloaded(model):
        logger.warning("hfquant: end-to-end tuning skipped: some weights are offloaded (it needs the whole model)")
        return 0
    return DEFAULT_E2E_EPOCHS


def full_precision_copy(model: nn.Module) -> nn.Module:
    """The teacher of end-to-end tuning: a copy of the model before any layer is quantized."""
    if _offloaded(model):
        raise ValueError(
            "e2e_epochs needs the whole model in memory (some weights are offloaded to disk or the meta "
            "device): load it without offloading, or set e2e_epochs=0"
        )
    return copy.deepcopy(model).eval()


def e2e_validation_ids(model: nn.Module, config: HfQuantConfig, tokenizer: Any) -> torch.Tensor:
    """The windows end-to-end tuning keeps its best epoch on: other windows of the calibration set
    (another seed; for token ids, the rows after the first ``nsamples``). Read before quantizing, so
    a set too small for them fails at once, not after the solve."""
    n_validation = max(2, config.nsamples // 8)
    if isinstance(config.dataset, torch.Tensor):  # token ids: the windows after the calibration ones
        if config.dataset.shape[0] < config.nsamples + n_validation:
            raise ValueError(
                f"end-to-end tuning keeps the epoch best on {n_validation} windows it does not train on: pass "
                f"calibration token ids with at least nsamples + {n_validation} = {config.nsamples + n_validation} "
                f"rows (got {config.dataset.shape[0]}), or set e2e_epochs=0"
            )
        return get_calibration_data(config.dataset[config.nsamples :], None, n_validation, config.seqlen)
    return get_calibration_data(
        config.dataset, resolve_tokenizer(model, config, tokenizer), n_validation, config.seqlen, seed=config.seed + 1000
    )


def tune_whole_model(
    model: nn.Module, teacher: nn.Module, ids: torch.Tensor, validation: torch.Tensor, config: HfQuantConfig
) -> list[float]:
    """End-to-end tuning of the quantized model's float part against ``teacher`` (the full-precision
    copy), on the calibration windows ``ids``, keeping the epoch best on ``validation``
    (:func:`e2e_validation_ids`); returns the validation KL of the start and of each epoch."""
    result = tune_end_to_end(
        model, lambda batch: teacher(input_ids=batch, use_cache=False).logits, ids, validation,
        epochs=config.e2e_epochs, lr=config.e2e_lr, batch_size=2, storage_dtype=STORAGE_DTYPE, seed=config.seed,
    )  # fmt: skip
    return result.validation_kl


def quantize_blocks(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    ids: torch.Tensor,
    config: HfQuantConfig,
    report: QuantizationReport,
    kept: dict[str, torch.Tensor],
    work: WorkDir | None = None,
    progress: bool = True,
) -> None:
    """The sequential pass over the decoder blocks (see the module docstring)."""
    prefix, blocks = find_decoder_blocks(model)
    batches = capture_block_inputs(model, blocks[0], ids, config.blockwise_batch_size)
    first = 0
    if work and work.finished():
        first = restore_finished(model, prefix, blocks, linears, config, report, work)
        batches = work.hidden_states(batches)
    bar = tqdm(range(first, len(blocks)), desc=f"hfquant {config.method}", disable=not progress)
    for index in bar:
        block, block_prefix = blocks[index], f"{prefix}.{index}."
        onload_block(block)
        layers = block_linears(linears, block_prefix)
        with timed(report, "hessian pass"):  # INQ reads no Hessian: no linear is hooked
            hessians, targets = full_precision_pass(
                block, {} if config.method == "inq" else layers, batches, config.calibrate_all_experts
            )
            hessians = {name: shrink_hessian(h, config.hessian_shrink) for name, h in hessians.items()}
        with timed(report, "solve"):
            if config.method == "inq":
                originals = quantize_block_inq(block, layers, batches, targets, config)
            else:
                originals = solve_block(
                    block, layers, hessians, config, kept, block_prefix, MixShape.of(model.config, len(blocks))
                )
        if config.learned_rounding:
            with timed(report, "learned rounding"):
                round_block(block, layers, hessians, batches, targets, config)
        del hessians
        before = block_error(block, batches, targets)
        after = before
        if config.blockwise_epochs:
            with timed(report, "block-wise"):
                after = refine_block(block, batches, targets, config, originals)
        report.blocks.append(BlockReport(index, before, after))
        mark_resident(model, block_prefix, next(block.buffers()).device)
        bar.set_postfix_str(f"block {index} mse {before:.3g} -> {after:.3g}")
        batches = propagate(block, batches)
        if work:
            work.save(index, block, batches, (before, after))


def restore_finished(
    model: nn.Module,
    prefix: str,
    blocks: nn.ModuleList,
    linears: dict[str, nn.Linear],
    config: HfQuantConfig,
    report: QuantizationReport,
    work: WorkDir,
) -> int:
    """Put the blocks a previous run finished back from ``work``; return how many."""
    report.resumed_blocks = work.finished()
    for index in range(report.resumed_blocks):
        onload_block(blocks[index])
        block_prefix = f"{prefix}.{index}."
        errors = work.restore(index, blocks[index], block_linears(linears, block_prefix), config, block_prefix)
        report.blocks.append(BlockReport(index, *errors))
        mark_resident(model, f"{prefix}.{index}.", next(blocks[index].buffers()).device)
    return report.resumed_blocks


def solve_block(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    hessians: dict[str, torch.Tensor],
    config: HfQuantConfig,
    kept: dict[str, torch.Tensor],
    block_prefix: str,
    mix_shape: MixShape,
) -> dict[str, torch.Tensor]:
    """Solve each linear of the block against its Hessian and swap in its quantized module; return
    the original values of the kept weights, per linear. Under a GGUF preset each linear is solved
    on its own type (:func:`hfquant.formats.gguf_presets.layer_config`: its name and block in a
    model of ``mix_shape``), under ``dynamic`` rules at its own bits and group size."""
    originals = {}
    for name, linear in layers.items():
        mask = kept.get(block_prefix + name)
        layer = layer_config(config.module_config(block_prefix + name), block_prefix + name, mix_shape)
        module = quantize_linear(linear, hessians[name], layer, mask)
        if mask is not None and module.num_kept:
            originals[name] = linear.weight.data[module.kept_positions()].clone()
        set_module(block, name, module)
    return originals


def quantize_block_inq(
    block: nn.Module, layers: dict[str, nn.Linear], batches: Batches, targets: list[torch.Tensor], config: HfQuantConfig
) -> dict[str, torch.Tensor]:
    """INQ on one block (its retraining uses the block-wise epochs and learning rate), then swap the
    modules. No weight is kept in 16 bits."""
    codes = inq_block(
        block, layers, batches, targets, config.bits, epochs=config.blockwise_epochs, lr=config.blockwise_lr
    )
    fmt = format_for(config)
    for name, result in codes.items():
        set_module(block, name, fmt.from_result(result, layers[name], config))
    return {}


def refine_block(
    block: nn.Module,
    batches: Batches,
    targets: list[torch.Tensor],
    config: HfQuantConfig,
    originals: dict[str, torch.Tensor],
) -> float:
    """Block-wise minimization of the block's grids and norms; kept weights reset to their original
    values on the moved grid. Returns the block's error after."""
    grids = {n for n, m in block.named_modules() if isinstance(m, QuantizedLinear) and m.tunable_grid}
    train, validation = split_validation(batches, targets, config)
    after = block_minimize(
        block, *train, grids, epochs=config.blockwise_epochs, lr=config.blockwise_lr,
        storage_dtype=STORAGE_DTYPE, validation=validation,
    )  # fmt: skip
    if validation is None and not originals:
        return after  # already scored on every batch
    with torch.no_grad():
        for name, values in originals.items():
            block.get_submodule(name).refresh_kept(values)
    return block_error(block, batches, targets)


def round_block(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    hessians: dict[str, torch.Tensor],
    batches: Batches,
    targets: list[torch.Tensor],
    config: HfQuantConfig,
) -> None:
    """Learned rounding of the block's solved integers (on the block-wise training batches, scored
    on its validation batches when some are held out), then exact grids for them."""
    train, validation = split_validation(batches, targets, config)
    result = learn_rounding(
        block, *train, {name: (linear.weight.data, hessians[name]) for name, linear in layers.items()},
        epochs=config.blockwise_epochs, seed=config.seed, validation=validation, damp=config.damp,
    )  # fmt: skip
    logger.info(
        "learned rounding: block error %.4g -> %.4g, %d integers moved, grids re-solved: %s",
        result.error_before, result.error_after, result.moved, result.resolved,
    )  # fmt: skip


def split_validation(
    batches: Batches, targets: list[torch.Tensor], config: HfQuantConfig
) -> tuple[tuple[Batches, list[torch.Tensor]], tuple[Batches, list[torch.Tensor]] | None]:
    """(training batches and targets, held-out ones or None) for the block-wise stages, by
    ``config.blockwise_validation``: the last batches are held out."""
    train = len(batches) - validation_batches(len(batches), config.blockwise_validation)
    held_out = (batches[train:], targets[train:]) if train < len(batches) else None
    return (batches[:train], targets[:train]), held_out


def validation_batches(n_batches: int, fraction: float) -> int:
    """How many of the last batches block-wise minimization holds out: ``fraction`` of them rounded
    up, 0 for 0, and never all (one batch at least is trained on)."""
    if fraction == 0 or n_batches < 2:
        return 0
    return min(n_batches - 1, math.ceil(fraction * n_batches))


def resolve_tokenizer(model: nn.Module, config: HfQuantConfig, tokenizer: Any) -> Any:
    """The tokenizer given, else the config's, else the model's own folder's."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer or config.tokenizer or getattr(model, "name_or_path", None)
    if tokenizer is None:
        raise ValueError(
            f"method={config.method!r} with saliency={config.saliency!r} needs calibration text: "
            "pass a tokenizer in HfQuantConfig"
        )
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer


def calibration_ids(model: nn.Module, config: HfQuantConfig, tokenizer: Any) -> torch.Tensor:
    """``[nsamples, seqlen]`` calibration token windows of the config's dataset (token ids as given,
    no tokenizer needed)."""
    if isinstance(config.dataset, torch.Tensor):
        return get_calibration_data(config.dataset, None, config.nsamples, config.seqlen)
    return get_calibration_data(
        config.dataset, resolve_tokenizer(model, config, tokenizer), config.nsamples, config.seqlen, seed=config.seed
    )
