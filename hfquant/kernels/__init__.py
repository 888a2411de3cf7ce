"""Compute kernels for the quantized modules."""
