"""Checkpoint I/O: safetensors layout checks, atomic saving, size accounting, cards, Hub upload."""

from hfquant.export.checkpoint import CheckpointError
from hfquant.export.gguf import GGUFExportError, save_gguf
from hfquant.export.hub import push_folder, push_to_hub
from hfquant.export.model_card import QualityFigures, render_model_card, write_model_card
from hfquant.export.save import bits_per_weight, folder_size, save_quantized

__all__ = [
    "CheckpointError",
    "GGUFExportError",
    "QualityFigures",
    "bits_per_weight",
    "folder_size",
    "push_folder",
    "push_to_hub",
    "render_model_card",
    "save_gguf",
    "save_quantized",
    "write_model_card",
]
