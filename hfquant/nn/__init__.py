"""Quantized modules and their bit packing."""

from hfquant.nn.decoupled_linear import DecoupledLinear
from hfquant.nn.packing import pack_int, pack_int2, packed_width, unpack_int, unpack_int2

__all__ = ["DecoupledLinear", "pack_int", "pack_int2", "packed_width", "unpack_int", "unpack_int2"]
