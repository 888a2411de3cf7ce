"""LoRA on a frozen hfquant base (QLoRA-style), through PEFT's own API.

PEFT picks the LoRA layer for a target module with a fixed list of dispatchers (``nn.Linear``,
``Conv1D``, the quantized layers of bitsandbytes, GPTQ, AWQ, ...); hfquant's stored formats are
``nn.Module`` subclasses it does not know. PEFT's documented hook for such layers is the
per-config mapping ``LoraConfig._register_custom_module`` (PEFT's "custom models" guide); it is not
saved with the adapter, so :func:`register` adds hfquant's mapping to a config, both when the
adapter is created and when it is loaded again::

    model = get_peft_model(model, hfquant.lora.register(LoraConfig(r=16, target_modules=[...])))
    model.save_pretrained("adapter")
    model = PeftModel.from_pretrained(base, "adapter", config=hfquant.lora.register("adapter"))

:class:`QuantizedLoraLinear` is PEFT's own LoRA ``Linear`` over the quantized layer: the base
computes ``W_hat x`` with its fused kernels and passes gradients to ``x`` through ``W_hat``
(:class:`hfquant.formats.base.InputGradThroughFrozenWeight`), the adapter adds ``B A x``; the
integers and grid are buffers, never trained. Merging is refused (see
:meth:`QuantizedLoraLinear.merge`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from hfquant.formats import QuantizedLinear


class QuantizedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` on a frozen :class:`~hfquant.formats.QuantizedLinear`."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        """The quantized layer's declared sizes (PEFT's generic lookup warns about an unknown type)."""
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        """The adapter follows the layer's device and float dtype (its scales' or kept values'; PEFT
        looks for a ``weight``, which a quantized layer does not have)."""
        floats = [t for t in base_layer.buffers() if t.is_floating_point()]
        tensor = floats[0] if floats else next(base_layer.buffers())
        return tensor.device, tensor.dtype if floats else None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: the merged weight ``W_hat + B A`` is not on the layer's integer grid, so merging
        means quantizing the layer again, which needs its calibration data and solver."""
        base = self.get_base_layer()
        raise NotImplementedError(
            f"cannot merge a LoRA adapter into {type(base).__name__}({base.extra_repr()}): its weight is "
            f"stored as {base.bits}-bit integers on a grid, and W_hat + B A is not on that grid, so merging "
            "would mean requantizing the layer. Keep the adapter unmerged (PeftModel), or merge it into the "
            "full-precision model and quantize that with hfquant again."
        )


def register(config: LoraConfig | str | os.PathLike) -> LoraConfig:
    """``config`` with hfquant's quantized layers registered as LoRA targets (PEFT's custom-module
    hook); a path loads the ``LoraConfig`` saved with an adapter first. Returns the config."""
    if not isinstance(config, LoraConfig):
        config = LoraConfig.from_pretrained(os.fspath(config))
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    return config


def training_optim() -> str:
    """The Trainer's ``optim`` for adapters on a quantized base: bitsandbytes' paged 8-bit AdamW on
    CUDA where bitsandbytes is installed (QLoRA's choice: optimizer states in 8 bits, paged out
    under memory spikes), else PyTorch's AdamW (bitsandbytes' optimizers need CUDA)."""
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "paged_adamw_8bit"
    return "adamw_torch"
