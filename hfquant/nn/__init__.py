"""Swapping a model's linears in place (:mod:`hfquant.nn.replace`), and the quantized module classes
under their public names (defined in :mod:`hfquant.formats`)."""

from hfquant.formats import FORMATS, DecoupledLinear, PowerOfTwoLinear, QuantizedLinear, SplitLinear
from hfquant.formats.packing import pack_int, pack_int2, packed_width, unpack_int, unpack_int2

# Every module class hfquant puts in place of an nn.Linear (each has ``storage_bits()``).
QUANTIZED_MODULES = tuple(FORMATS.values())

__all__ = [
    "QUANTIZED_MODULES",
    "DecoupledLinear",
    "PowerOfTwoLinear",
    "QuantizedLinear",
    "SplitLinear",
    "pack_int",
    "pack_int2",
    "packed_width",
    "unpack_int",
    "unpack_int2",
]
