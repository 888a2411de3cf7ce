"""transformers wiring: ``HfQuantizer`` for ``quant_method="hfquant"``.

Thin on purpose (like transformers' own ``quantizer_*.py``): loading a quantized checkpoint checks
the files' headers (under the names transformers loads them by), turns GPT-2's ``Conv1D`` layers
and MoE experts into linears (:mod:`hfquant.nn`) and swaps the linears for empty skeletons of the config's format
(:func:`hfquant.formats.format_for`); quantizing at load hands the loaded model to
:func:`hfquant.driver.quantize_model` and keeps its report in :attr:`HfQuantQuantizer.report`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer

from hfquant.config import FORMAT_VERSION, HfQuantConfig
from hfquant.export.checkpoint import (
    check_metadata,
    keys_as_loaded,
    plan_quantized_layers,
    read_checkpoint,
    storage_state_dict,
)
from hfquant.export.hub import enable_export
from hfquant.formats import QuantizedLinear, format_for
from hfquant.nn.experts import unfuse_experts
from hfquant.nn.replace import (
    conv1d_to_linear,
    is_skipped,
    linears_to_convert,
    output_embeddings_name,
    set_module,
)


class HfQuantQuantizer(HfQuantizer):
    """Quantize at load (``pre_quantized=False``) or rebuild a saved hfquant checkpoint."""

    requires_calibration = False
    quantization_config: HfQuantConfig
    report: Any = None  # the QuantizationReport of a quantization at load

    def _skip_list(self, model: PreTrainedModel) -> list[str]:
        return self.get_modules_to_not_convert(
            model,
            self.quantization_config.modules_to_not_convert,
            model._keep_in_fp32_modules or [],
            add_default_skips=True,
        )

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        if not self.pre_quantized:
            self._check_output_embeddings_kept(model)
            return
        config = self.quantization_config
        tensors, metadata = read_checkpoint(checkpoint_files or [])
        check_metadata(metadata, config)
        tensors = keys_as_loaded(tensors, model)
        skip = self._skip_list(model)
        # MoE experts the checkpoint holds fused (skipped: full precision) stay fused.
        fused = [name.removesuffix(".down_proj") for name in tensors if name.endswith(".down_proj")]
        conv1d_to_linear(model, skip)
        unfuse_experts(model, skip + fused, skeleton=True)
        linears = linears_to_convert(model, skip, config.keeps_full_precision)
        planned = plan_quantized_layers(tensors, linears, config)
        fmt = format_for(config)
        for name, linear in linears.items():
            set_module(model, name, fmt.skeleton(linear, config.module_config(name), **planned[name]))
            # Some models' _init_weights reach into a child's .weight (GPT-2's c_proj), which a quantized
            # layer has not: a parent with no tensors of its own has nothing to initialize anyway.
            parent = model.get_submodule(name.rpartition(".")[0])
            if next(parent.parameters(recurse=False), None) is None and next(parent.buffers(recurse=False), None) is None:
                parent._is_hf_initialized = True

    def _check_output_embeddings_kept(self, model: PreTrainedModel) -> None:
        """A list in ``modules_to_not_convert`` replaces transformers' default skips, so one that leaves
        out the output embeddings asks to quantize them: hfquant has no solver for them (they sit outside
        the decoder blocks) and keeps them in full precision, so it says so rather than ignore the list."""
        name = output_embeddings_name(model)
        listed = self.quantization_config.modules_to_not_convert
        if name is not None and not is_skipped(name, listed):
            raise ValueError(
                f"modules_to_not_convert={listed} leaves out the output embeddings {name!r}: hfquant keeps "
                f"them in full precision (it does not quantize them); add {name!r} to the list"
            )

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        enable_export(model)
        if self.pre_quantized:
            for name, module in model.named_modules():
                if isinstance(module, QuantizedLinear):
                    module.check_loaded(name)
            return
        from hfquant.driver import quantize_model

        self.report = quantize_model(model, self.quantization_config, skip=self._skip_list(model))

    def get_state_dict_and_metadata(
        self, model: PreTrainedModel
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from hfquant import __version__

        config = self.quantization_config
        metadata = {
            "hfquant_format_version": str(FORMAT_VERSION),
            "hfquant_version": __version__,
            "hfquant_bits": str(config.bits),
            "hfquant_group_size": str(config.group_size),
            "hfquant_method": config.method,
            "hfquant_split_clusters": str(config.split_clusters),
        }
        return storage_state_dict(model), metadata

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top (LoRA through PEFT, see :mod:`hfquant.lora`); the quantized layers stay
        frozen, so ``is_qat_trainable`` keeps the base class's ``False``."""
        return True

