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

:func:`init_from_quantization_error` starts the adapters at the best rank-``r`` approximation of
what quantization took away (LoftQ's initialization), optionally weighted by each input channel's
activation scale, so training starts from a base that already recovers part of the loss.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from hfquant.driver.kept import task_statistics
from hfquant.formats import QuantizedLinear
from hfquant.nn.replace import output_embeddings_name
from hfquant.task_data import TaskBatch, batches_from_ids


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


def register(config: LoraConfig | str | os.PathLike, model: nn.Module | None = None) -> LoraConfig:
    """``config`` with hfquant's quantized layers registered as LoRA targets (PEFT's custom-module
    hook); a path loads the ``LoraConfig`` saved with an adapter first. Returns the config.

    ``target_modules="all-linear"`` (the usual QLoRA setting) needs ``model``: PEFT expands it to the
    modules that are ``nn.Linear`` or ``Conv1D``, which hfquant's quantized layers are not, so it
    would find none of them; with ``model`` it becomes the names of every quantized layer and
    remaining linear but the output embeddings (:func:`all_linear_targets`).
    """
    if not isinstance(config, LoraConfig):
        config = LoraConfig.from_pretrained(os.fspath(config))
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        if model is None:
            raise ValueError(
                "target_modules='all-linear' with a quantized model needs the model: call "
                "hfquant.lora.register(config, model), or name the target modules"
            )
        config.target_modules = all_linear_targets(model)
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    return config


def all_linear_targets(model: nn.Module) -> set[str]:
    """PEFT target names for every quantized layer and ``nn.Linear`` of ``model`` but the output
    embeddings: each module's last name (``q_proj``), or its last two where the last is an index in
    a list (an MoE expert, ``down.3``: PEFT matches a target against the end of a module's name, and
    ``3`` alone would also name a decoder layer)."""
    output_name = output_embeddings_name(model)
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, nn.Linear)) and name != output_name:
            parts = name.split(".")
            targets.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    if output_name is not None and output_name.rsplit(".", 1)[-1] in targets:
        raise ValueError(
            f"'all-linear' would also adapt the output embeddings {output_name!r}, which share their name with "
            "another linear: name the target modules"
        )
    if not targets:
        raise ValueError("the model has no quantized layer or nn.Linear to adapt")
    return targets


def input_scales(
    model: nn.Module, data: torch.Tensor | list[TaskBatch], targets: list[str]
) -> dict[str, torch.Tensor]:
    """Root mean square of each input channel of every linear whose name ends in one of ``targets``,
    over the tokens of ``data`` (``[n, seqlen]`` token windows, or task batches, whose padding is
    left out) run through ``model``: the diagonal of the layer's input Hessian, square-rooted (what
    llama.cpp's importance matrix holds), collected by the pass that scores TaCQ's baselines."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    if not linears:
        raise ValueError(f"no nn.Linear of the model ends in one of {targets}")
    batches = batches_from_ids(data, 1) if isinstance(data, torch.Tensor) else data
    diag = task_statistics(model, linears, batches, gradients=False, hessian_diag=True).hessian_diag
    return {name: d.sqrt() for name, d in diag.items()}


@torch.no_grad()
def init_from_quantization_error(
    peft_model: nn.Module,
    reference: nn.Module,
    scales: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> dict[str, float]:
    """Set every adapter on a quantized layer to the best rank-``r`` approximation of ``W - W_hat``.

    ``reference`` is the full-precision model the base was quantized from (its linears are found
    by the same names). Without ``scales``, the approximation is LoftQ's (Li et al., 2023): the
    truncated SVD of the weight error. With ``scales`` (per input channel, from :func:`input_scales`
    on data like the training data), the SVD is of ``(W - W_hat) diag(scales)``, so the rank goes
    where the layer's inputs are large; measured on the W2 g64 default model and held-out code
    (``benchmarks/RESULTS.md``), that closed more of the loss gap before any training than the plain
    SVD. Departs from LoftQ, which alternates requantizing the base and the SVD: hfquant's base is
    already solved against the calibration set and stays as it is. ``B A * scaling`` equals the
    approximation; the base's buffers are not touched. Returns, per layer, the share of the (scaled)
    squared error the adapter removes.
    """
    captured = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, QuantizedLoraLinear) or adapter_name not in module.lora_A:
            continue
        ref_name = name.removeprefix(prefix)
        try:
            weight = reference.get_submodule(ref_name).weight.detach().float()
        except AttributeError as err:
            raise ValueError(f"the reference model has no linear {ref_name!r} for adapter layer {name!r}") from err
        w_hat = module.get_base_layer().dequantize().float()
        error = weight.to(w_hat.device) - w_hat
        scale = torch.ones(error.shape[1]) if scales is None else scales[ref_name].float()
        scale = scale.to(error.device).clamp(min=torch.finfo(torch.float32).tiny)
        u, s, vh = torch.linalg.svd(error * scale, full_matrices=False)
        rank = min(module.r[adapter_name], s.numel())  # a rank above the layer's own: the rest stays zero
        root = s[:rank].sqrt()
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        lora_a.weight.zero_()
        lora_b.weight.zero_()
        lora_a.weight[:rank] = (root[:, None] * vh[:rank] / scale).to(lora_a.weight.dtype)
        lora_b.weight[:, :rank] = (u[:, :rank] * root / module.scaling[adapter_name]).to(lora_b.weight.dtype)
        captured[ref_name] = float(s[:rank].pow(2).sum() / s.pow(2).sum().clamp(min=1e-30))
    if not captured:
        raise ValueError(f"no LoRA adapter {adapter_name!r} on a quantized layer: call get_peft_model with register() first")
    return captured


def training_optim() -> str:
    """The Trainer's ``optim`` for adapters on a quantized base: bitsandbytes' paged 8-bit AdamW on
    CUDA where bitsandbytes is installed (QLoRA's choice: optimizer states in 8 bits, paged out
    under memory spikes), else PyTorch's AdamW (bitsandbytes' optimizers need CUDA)."""
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "paged_adamw_8bit"
    return "adamw_torch"
