"""Stored formats: one ``nn.Module`` class per way a quantized linear is kept on disk.

Each format derives from :class:`~hfquant.formats.base.QuantizedLinear` and alone knows its
tensors, its skeleton, how it is built from a solver's result, its post-load checks and its
model-card line. :func:`format_for` picks the format of a config. Adding a format means one module
here and one line in :data:`FORMATS` (and, if a config selects it, one in :func:`format_for`).
"""

from __future__ import annotations

from typing import Any

from hfquant.formats.base import STORAGE_DTYPE, CheckpointError, QuantizedLinear
from hfquant.formats.decoupled import DecoupledLinear
from hfquant.formats.gguf import GGUFLinear
from hfquant.formats.power_of_two import PowerOfTwoLinear
from hfquant.formats.split import SplitLinear

# The registry: every format hfquant writes, by name.
FORMATS: dict[str, type[QuantizedLinear]] = {
    cls.name: cls for cls in (DecoupledLinear, SplitLinear, PowerOfTwoLinear, GGUFLinear)
}


def format_for(config: Any) -> type[QuantizedLinear]:
    """The format a config stores its layers in: INQ's powers of two, SplitQuant's clusters, a GGUF
    type's blocks, or the affine grid of every other method."""
    if config.method == "inq":
        return FORMATS["power_of_two"]
    if config.split_clusters > 1:
        return FORMATS["split"]
    if getattr(config, "gguf_type", None):
        return FORMATS["gguf"]
    return FORMATS["decoupled"]


__all__ = [
    "FORMATS",
    "STORAGE_DTYPE",
    "CheckpointError",
    "DecoupledLinear",
    "GGUFLinear",
    "PowerOfTwoLinear",
    "QuantizedLinear",
    "SplitLinear",
    "format_for",
]
