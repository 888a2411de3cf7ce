"""Swapping a model's linears in place (:mod:`hfquant.nn.replace`), MoE experts as linears
(:mod:`hfquant.nn.experts`), and the quantized module classes under their public names (defined in
:mod:`hfquant.formats`)."""

from hfquant.formats import FORMATS, DecoupledLinear, PowerOfTwoLinear, QuantizedLinear, SplitLinear
from hfquant.formats.packing import pack_int, pack_int2, packed_width, unpack_int, unpack_int2
from hfquant.nn.experts import ExpertLinears, unfuse_experts

# Every module class hfquant puts in place of an nn.Linear (each has ``storage_bits()``).
QUANTIZED_MODULES = tuple(FORMATS.values())

__all__ = [
    "QUANTIZED_MODULES",
    "DecoupledLinear",
    "ExpertLinears",
    "PowerOfTwoLinear",
    "QuantizedLinear",
    "SplitLinear",
    "pack_int",
    "pack_int2",
    "packed_width",
    "unpack_int",
    "unpack_int2",
    "unfuse_experts",
]
