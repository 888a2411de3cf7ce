"""Quantized modules and their bit packing."""

from hfquant.nn.decoupled_linear import DecoupledLinear
from hfquant.nn.packing import pack_int, pack_int2, packed_width, unpack_int, unpack_int2
from hfquant.nn.power_of_two_linear import PowerOfTwoLinear
from hfquant.nn.split_linear import SplitLinear

# Every module class hfquant puts in place of an nn.Linear (each has ``storage_bits()``).
QUANTIZED_MODULES = (DecoupledLinear, SplitLinear, PowerOfTwoLinear)

__all__ = [
    "QUANTIZED_MODULES",
    "DecoupledLinear",
    "PowerOfTwoLinear",
    "SplitLinear",
    "pack_int",
    "pack_int2",
    "packed_width",
    "unpack_int",
    "unpack_int2",
]
