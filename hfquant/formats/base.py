"""What every stored format shares, and the contract each one fills in.

A format is one ``nn.Module`` class that takes the place of an ``nn.Linear``. The base holds what
they all have (sizes, bit width, a frozen bias, the reference forward that dequantizes and calls
``F.linear``, ``extra_repr``); each subclass alone knows

* its tensors and their shapes for a config (:meth:`QuantizedLinear.expected_tensors`), which the
  header checks use before any tensor is read (:meth:`QuantizedLinear.check_header`);
* how to build an empty skeleton to load into (:meth:`QuantizedLinear.skeleton`) and how to build
  itself from a solver's result (:meth:`QuantizedLinear.from_result`);
* what it checks once its tensors are loaded (:meth:`QuantizedLinear.check_loaded`);
* the line the model card prints about its storage (:meth:`QuantizedLinear.storage_line`);
* the bits it takes on disk (:meth:`QuantizedLinear.storage_bits`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPE = torch.float16  # on-disk dtype of scales, zeros and kept weights
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtypes a float tensor may be saved in

# Suffix -> (allowed safetensors dtypes, shape) of the tensors one quantized layer stores.
TensorSpecs = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


class CheckpointError(ValueError):
    """A quantized checkpoint that cannot be loaded as its config describes."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: read without reading the tensor."""

    dtype: str
    shape: tuple[int, ...]
    file: str


def settings(config: Any) -> str:
    """The config fields that decide a layer's tensors, as error messages name them."""
    return (
        f"bits={config.bits}, group_size={config.group_size}, method={config.method}, "
        f"split_clusters={config.split_clusters}"
    )


def check_tensor(
    tensors: dict[str, TensorInfo], key: str, dtypes: tuple[str, ...], shape: tuple[int, ...], config: Any
) -> None:
    """``key`` is present in the headers with one of ``dtypes`` and shape ``shape``."""
    info = tensors.get(key)
    if info is None:
        raise CheckpointError(f"missing tensor {key}: the checkpoint does not hold this quantized layer whole")
    if info.dtype not in dtypes:
        raise CheckpointError(f"tensor {key} has dtype {info.dtype}, expected one of {list(dtypes)}")
    if info.shape != shape:
        raise CheckpointError(
            f"tensor {key} has shape {list(info.shape)}, expected {list(shape)} for {settings(config)} "
            f"(in {os.path.basename(info.file)})"
        )


def frozen_bias(
    out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Parameter | None:
    """The bias of a quantized layer: a parameter (so ``model.to`` and accelerate move it) that
    training never updates."""
    if not bias:
        return None
    return nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)


class InputGradThroughFrozenWeight(torch.autograd.Function):
    """``layer(x)`` whose backward gives ``x`` its gradient through the frozen weight only,
    ``grad_x = grad_y @ W_hat``, with ``W_hat`` dequantized again in backward rather than saved.

    Why not plain autograd through the reference forward: it keeps every layer's dequantized
    ``W_hat`` alive from forward to backward, as much memory as the full-precision weights a
    quantized base exists to save (bitsandbytes' 4-bit matmul makes the same trade: one more
    dequantization per backward). And the forward, run with grad disabled as every
    ``autograd.Function``'s is, takes the layer's fused kernels, which have no backward of their own.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.forward(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class QuantizedLinear(nn.Module):
    """Base of the stored formats: a drop-in replacement of ``nn.Linear`` holding a quantized weight."""

    name: ClassVar[str]  # the registry key (:data:`hfquant.formats.FORMATS`)
    tunable_grid: ClassVar[bool] = False  # has float ``scales``/``zeros`` that block-wise minimization tunes
    optional_tensors: ClassVar[tuple[str, ...]] = ()  # tensors a layer may store beside the expected ones

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.bias = frozen_bias(out_features, bias, dtype or torch.get_default_dtype(), device)

    # -- what each format declares ------------------------------------------------------------

    @classmethod
    def expected_tensors(cls, config: Any, out_features: int, in_features: int) -> TensorSpecs:
        """Suffix -> (dtypes, shape) of the tensors a layer of this format stores for ``config``."""
        raise NotImplementedError

    @classmethod
    def skeleton(cls, linear: nn.Linear, config: Any, **planned: Any) -> QuantizedLinear:
        """An empty layer shaped like ``linear`` to load tensors into; ``planned`` comes from
        :meth:`check_header`."""
        raise NotImplementedError

    @classmethod
    def from_result(
        cls, result: Any, linear: nn.Linear, config: Any, kept: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """The layer built from a solver's result for ``linear``; ``kept`` marks kept 16-bit weights."""
        raise NotImplementedError

    @classmethod
    def storage_line(cls, config: Any) -> str:
        """What the model card says this format stores."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat`` (``[out, in]``)."""
        raise NotImplementedError

    def storage_bits(self) -> int:
        """Bits this layer takes on disk (bias aside)."""
        raise NotImplementedError

    def check_loaded(self, name: str) -> None:
        """Checks that need the loaded values (the headers only give dtypes and shapes)."""

    def _extra_repr_fields(self) -> str:
        return ""

    # -- shared --------------------------------------------------------------------------------

    @classmethod
    def check_header(
        cls, tensors: dict[str, TensorInfo], name: str, linear: nn.Linear, config: Any
    ) -> dict[str, Any]:
        """Check layer ``name``'s tensors in the headers; return the skeleton's extra arguments."""
        out_f, in_f = linear.out_features, linear.in_features
        if f"{name}.weight" in tensors:
            raise CheckpointError(
                f"tensor {name}.weight is a full-precision weight, but config.json says layer {name} is quantized"
            )
        expected = cls.expected_tensors(config, out_f, in_f)
        for suffix, (dtypes, shape) in expected.items():
            check_tensor(tensors, f"{name}.{suffix}", dtypes, shape, config)
        foreign = sorted(
            key.removeprefix(f"{name}.")
            for key in tensors
            if key.startswith(f"{name}.")
            and key.removeprefix(f"{name}.") not in {*expected, *cls.optional_tensors, "bias"}
        )
        if foreign:
            raise CheckpointError(
                f"layer {name} has tensors {foreign}, which the {cls.__name__} format of {settings(config)} "
                "does not store"
            )
        bias = tensors.get(f"{name}.bias")
        if linear.bias is not None and bias is None:
            raise CheckpointError(f"missing tensor {name}.bias")
        if bias is not None and bias.shape != (out_f,):
            raise CheckpointError(f"tensor {name}.bias has shape {list(bias.shape)}, expected [{out_f}]")
        return {}

    @staticmethod
    def _layout(linear: nn.Linear) -> dict[str, Any]:
        """Bias presence, dtype and device of the linear a format replaces."""
        return {"bias": linear.bias is not None, "dtype": linear.weight.dtype, "device": linear.weight.device}

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.data.copy_(linear.bias.detach())

    def trains_input_only(self, x: torch.Tensor) -> bool:
        """Autograd needs ``x``'s gradient and nothing of this layer's (LoRA on a frozen base): then
        :class:`InputGradThroughFrozenWeight` runs the forward."""
        return (
            torch.is_grad_enabled()
            and x.requires_grad
            and not any(t.requires_grad for t in (*self.parameters(), *self.buffers()))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference forward: dequantize the whole matrix and call ``F.linear`` (exact)."""
        if self.trains_input_only(x):
            return InputGradThroughFrozenWeight.apply(x, self)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"{self._extra_repr_fields()}bias={self.bias is not None}"
        )
