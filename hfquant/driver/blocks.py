"""Reaching the decoder blocks: finding them, capturing their inputs, bringing one on-device, and
running it in full precision with the hooks that collect each linear's input Hessian.

Architecture-agnostic (the blocks are the ``nn.ModuleList`` of ``num_hidden_layers`` modules) and
accelerate-aware (a disk- or CPU-offloaded block is loaded once, quantized, and stays resident).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hfquant.algorithms.block import Batches, block_output
from hfquant.nn.experts import all_experts_calibrated

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def block_linears(linears: dict[str, nn.Linear], block_prefix: str) -> dict[str, nn.Linear]:
    """The linears of one block, by their name inside it."""
    return {n.removeprefix(block_prefix): m for n, m in linears.items() if n.startswith(block_prefix)}


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks, found by its length (architecture-agnostic)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, blocks in candidates:
        if n_layers is None or len(blocks) == n_layers:
            return name, blocks
    raise ValueError("could not find the decoder blocks (an nn.ModuleList of num_hidden_layers blocks)")


def execution_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int
) -> Batches:
    """Hidden states and keyword arguments the first block receives, one entry per batch."""
    captured: Batches = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = execution_device(model)
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


def mark_resident(model: nn.Module, block_prefix: str, device: torch.device) -> None:
    """Record in ``hf_device_map`` that a quantized block now lives on ``device`` (not disk)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for key in device_map:
            if (key + ".").startswith(block_prefix):
                device_map[key] = device.index if device.type == "cuda" else device.type


@torch.no_grad()
def propagate(block: nn.Module, batches: Batches) -> Batches:
    """The next block's inputs: this block's outputs, with the same keyword arguments."""
    return [(block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in batches]


@torch.no_grad()
def full_precision_pass(
    block: nn.Module, block_linears: dict[str, nn.Linear], batches: Batches, all_experts: bool = False
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Each linear's input Hessian (float32, averaged over tokens) and the block's outputs.

    ``all_experts`` (``calibrate_all_experts``): MoE experts also run on the tokens not routed to
    them (:func:`hfquant.nn.experts.all_experts_calibrated`), so their Hessians count every token.

    A linear no calibration token reaches (an MoE expert the router never picked) gets the Hessian of
    every token that reached its siblings, the other experts of the same projection (``...down.3``
    beside ``...down.0``, ...), whose inputs are of the same kind (for ``gate_up``, the very hidden
    states); with no sibling reached either, the identity (its solve then minimizes the plain weight
    error, as round-to-nearest does). A zero Hessian would mark every input column dead, and GPTQ
    zeroes the weights of dead columns.
    """
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
        with all_experts_calibrated(block, all_experts):
            outputs = [block_output(block, hidden, kwargs) for hidden, kwargs in batches]
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, count in counts.items() if count == 0]
    if unseen:
        logger.warning(
            "hfquant: %d linear(s) of this block saw no calibration token (%s): solved on their siblings' "
            "inputs, or their weights alone; more or more varied calibration text reaches them",
            len(unseen),
            ", ".join(unseen[:4]) + (", ..." if len(unseen) > 4 else ""),
        )
    return {
        name: h / counts[name] if counts[name] else _sibling_hessian(name, hessians, counts)
        for name, h in hessians.items()
    }, outputs


def _sibling_hessian(name: str, hessians: dict[str, torch.Tensor], counts: dict[str, int]) -> torch.Tensor:
    """The input Hessian of every token that reached the linears numbered beside ``name`` in the same
    list (an MoE projection's other experts); the identity if there are none."""
    parent, _, index = name.rpartition(".")
    siblings = [n for n in hessians if index.isdigit() and n.rpartition(".")[0] == parent and counts[n]]
    if not siblings:
        return torch.eye(hessians[name].shape[0], device=hessians[name].device)
    return sum(hessians[n] for n in siblings) / sum(counts[n] for n in siblings)
