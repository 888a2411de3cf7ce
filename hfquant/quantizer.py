"""transformers wiring: ``HfQuantizer`` for ``quant_method="hfquant"``.

Thin on purpose (like transformers' own ``quantizer_*.py``): loading a quantized checkpoint swaps
the linears for skeletons of the config's module class (:class:`~hfquant.nn.DecoupledLinear`,
:class:`~hfquant.nn.SplitLinear` or :class:`~hfquant.nn.PowerOfTwoLinear`) after checking the files, and
quantizing at load hands the loaded model to :func:`hfquant.pipeline.quantize_model`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer

from hfquant.config import FORMAT_VERSION, HfQuantConfig
from hfquant.export.checkpoint import (
    check_cluster_indices,
    check_metadata,
    check_outlier_indices,
    plan_quantized_layers,
    read_checkpoint,
    storage_state_dict,
)
from hfquant.export.hub import enable_export
from hfquant.nn import DecoupledLinear, PowerOfTwoLinear, SplitLinear
from hfquant.nn.replace import linears_to_convert, set_module


class HfQuantQuantizer(HfQuantizer):
    """Quantize at load (``pre_quantized=False``) or rebuild a saved hfquant checkpoint."""

    requires_calibration = False
    quantization_config: HfQuantConfig

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
            return
        config = self.quantization_config
        tensors, metadata = read_checkpoint(checkpoint_files or [])
        check_metadata(metadata, config)
        linears = linears_to_convert(model, self._skip_list(model))
        outliers = plan_quantized_layers(tensors, linears, config)
        for name, linear in linears.items():
            set_module(model, name, _skeleton(linear, config, outliers[name]))

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        enable_export(model)
        if self.pre_quantized:
            for name, module in model.named_modules():
                if isinstance(module, DecoupledLinear):
                    check_outlier_indices(module, name)
                elif isinstance(module, SplitLinear):
                    check_cluster_indices(module, name)
            return
        from hfquant.pipeline import quantize_model

        quantize_model(model, self.quantization_config, skip=self._skip_list(model))

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
        return False


def _skeleton(linear: nn.Linear, config: HfQuantConfig, num_outliers: int) -> nn.Module:
    """An empty quantized module of the config's class, shaped like ``linear``, to load tensors into."""
    kwargs = {"bias": linear.bias is not None, "dtype": linear.weight.dtype, "device": linear.weight.device}
    if config.method == "inq":
        return PowerOfTwoLinear(linear.in_features, linear.out_features, config.bits, **kwargs)
    if config.split_clusters > 1:
        return SplitLinear(
            linear.in_features, linear.out_features, config.bits, config.group_size, config.split_clusters, **kwargs
        )
    return DecoupledLinear(
        linear.in_features,
        linear.out_features,
        config.bits,
        config.group_size,
        num_outliers=num_outliers,
        **kwargs,
    )
