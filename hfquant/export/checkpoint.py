"""Checking a quantized checkpoint before any tensor is loaded.

transformers loads tensors by name and, left alone, turns a bad file into a vague warning or a
silently random layer. hfquant reads the safetensors headers first (cheap: no tensor data) and
refuses a checkpoint whose files are truncated or corrupt, or whose tensors do not match what the
config says each quantized layer must hold, naming the tensor and the problem.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from torch import nn

from hfquant.config import FORMAT_VERSION, HfQuantConfig
from hfquant.formats import QuantizedLinear, format_for
from hfquant.formats.base import STORAGE_DTYPE, CheckpointError, TensorInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes of one safetensors file, and its metadata.

    Checks the file is whole: its size must cover the header and every tensor's byte range.
    """
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{name} is truncated or corrupt: header claims {header_len} bytes but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"{name} is corrupt: its safetensors header is not valid JSON ({err})"
            ) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for tensor, entry in header.items():
        try:
            dtype, shape, (_start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{name} is corrupt: bad header entry for tensor {tensor}") from err
        tensors[tensor] = TensorInfo(dtype, shape, path)
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(f"{name} is truncated: expected {expected} bytes, found {size}")
    return tensors, metadata


def read_checkpoint(files: list[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Headers of every file of a (possibly sharded) checkpoint; safetensors only.

    A sharded checkpoint's index must agree with its shards: every shard it lists is present and
    whole, and every tensor it maps is in the shard it names.
    """
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(
                f"{os.path.basename(path)} is not a safetensors file: hfquant checkpoints are safetensors only "
                "(pickle-based weight files are refused)"
            )
        if not os.path.isfile(path):
            raise CheckpointError(
                f"shard {os.path.basename(path)} is missing from {os.path.dirname(path) or '.'}: "
                f"the checkpoint index lists it (re-download or re-save the model)"
            )
        file_tensors, file_metadata = read_safetensors_header(path)
        tensors.update(file_tensors)
        metadata.update(file_metadata)
    if files:
        _check_index(os.path.join(os.path.dirname(files[0]), INDEX_FILE), tensors)
    return tensors, metadata


def _check_index(index_path: str, tensors: dict[str, TensorInfo]) -> None:
    if not os.path.isfile(index_path):
        return
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{INDEX_FILE} is corrupt: {err}") from err
    for tensor, shard in weight_map.items():
        info = tensors.get(tensor)
        if info is None or os.path.basename(info.file) != shard:
            raise CheckpointError(
                f"{INDEX_FILE} maps tensor {tensor} to {shard}, but "
                + ("no shard holds it" if info is None else f"it is in {os.path.basename(info.file)}")
            )


def keys_as_loaded(tensors: dict[str, TensorInfo], model: nn.Module) -> dict[str, TensorInfo]:
    """The header entries under the names transformers loads them into ``model`` by: the model's
    checkpoint conversions rename some keys (Mixtral's ``block_sparse_moe`` is ``mlp`` in the
    model, and saving renames it back)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    return {rename_source_key(key, renamings, converters)[0]: info for key, info in tensors.items()}


def check_metadata(metadata: dict[str, str], config: HfQuantConfig) -> None:
    """The format version, bits and group size written into the files must agree with ``config.json``."""
    version = metadata.get("hfquant_format_version")
    if version is None:
        raise CheckpointError(
            "the safetensors metadata lacks hfquant_format_version: not an hfquant checkpoint"
        )
    if int(version) > FORMAT_VERSION:
        from hfquant import __version__

        writer = metadata.get("hfquant_version")
        install = f'pip install "hfquant>={writer}"' if writer else "pip install -U hfquant"
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this hfquant {__version__} reads "
            f"(up to {FORMAT_VERSION}); it was written by hfquant {writer or 'a newer release'}: "
            f"upgrade with `{install}`"
        )
    for field in ("bits", "group_size", "split_clusters"):
        stored = metadata.get(f"hfquant_{field}")
        if stored is not None and int(stored) != getattr(config, field):
            raise CheckpointError(
                f"the weights were quantized with {field}={stored} but config.json says "
                f"{field}={getattr(config, field)}"
            )


def plan_quantized_layers(
    tensors: dict[str, TensorInfo], linears: dict[str, nn.Linear], config: HfQuantConfig
) -> dict[str, dict]:
    """Check every quantized layer's tensors against its format (at its own settings under
    ``dynamic``); return each layer's skeleton arguments."""
    fmt = format_for(config)
    return {name: fmt.check_header(tensors, name, linear, config.module_config(name)) for name, linear in linears.items()}


def storage_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's float tensors in their 16-bit storage dtype."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            for suffix in ("scales", "zeros", "outlier_values"):
                key = f"{name}.{suffix}"
                if key in state:
                    state[key] = state[key].to(STORAGE_DTYPE)
    return state
