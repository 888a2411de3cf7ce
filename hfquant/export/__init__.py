"""Checkpoint I/O: safetensors layout checks, atomic saving, size accounting."""

from hfquant.export.checkpoint import CheckpointError
from hfquant.export.save import bits_per_weight, folder_size, save_quantized

__all__ = ["CheckpointError", "bits_per_weight", "folder_size", "save_quantized"]
