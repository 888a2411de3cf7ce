"""Finding the linears to quantize and swapping modules in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def is_skipped(name: str, modules_to_not_convert: list[str]) -> bool:
    """A module is skipped when a listed name equals it, ends it, or is one of its parents."""
    return any(
        name == m or name.endswith("." + m) or name.startswith(m + ".") for m in modules_to_not_convert
    )


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def output_embeddings_name(model: nn.Module) -> str | None:
    """The name of the model's output embeddings (``lm_head``), which hfquant never converts."""
    output = _output_embeddings(model)
    return None if output is None else next((n for n, m in model.named_modules() if m is output), None)


def linears_to_convert(
    model: nn.Module, modules_to_not_convert: list[str], excluded: Callable[[str], bool] | None = None
) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model but the output embeddings, the skipped ones and those
    ``excluded`` names (a per-name rule such as ``HfQuantConfig.keeps_full_precision``), by name."""
    output = _output_embeddings(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and not is_skipped(name, modules_to_not_convert)
        and not (excluded is not None and excluded(name))
    }


def conv1d_to_linear(model: nn.Module, modules_to_not_convert: list[str]) -> list[str]:
    """Replace every GPT-2-style ``Conv1D`` (transformers' ``y = x W + b`` with ``W`` stored
    ``[in, out]``) that is not skipped by the ``nn.Linear`` computing the same (``W`` transposed), in
    place, so that it is quantized like any linear; return their names. Meta tensors (a skeleton
    about to load a checkpoint) are converted the same way."""
    from transformers.pytorch_utils import Conv1D

    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, Conv1D) and not is_skipped(name, modules_to_not_convert)
    ]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device="meta")  # no init
        linear.weight = nn.Parameter(conv.weight.data.T.contiguous(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = conv.bias
        set_module(model, name, linear)
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
