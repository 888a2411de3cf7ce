"""Resumable quantization: each finished block saved to ``work_dir``, a rerun resumes after the last.

Layout of the folder:

* ``settings.json``: what the work was made with -- the config's fields, and digests of the model
  (its config, tensor names and shapes, input embeddings), of the calibration token windows and of
  the kept-weight masks. A rerun whose settings or model differ is refused, naming what differs.
* ``block_NNNN.safetensors``: the state dict of finished block ``NNNN`` (its quantized modules in
  their 16-bit storage dtypes, as a checkpoint holds them, and its tuned norms), with the block's
  errors in the metadata.
* ``hidden.safetensors``: the hidden states entering the next block to quantize (one tensor per
  calibration batch) and that block's index. The other keyword arguments of a block (rotary
  embeddings, masks) are the same for every block and are captured again, cheaply.

Every file is written to a temporary name and renamed into place, so an interruption leaves the
previous state. Only the latest hidden states are kept: the folder holds every quantized block
plus one set of activations (``nsamples * seqlen * hidden_size`` values in the model's dtype).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hfquant.algorithms.block import Batches
from hfquant.config import HfQuantConfig
from hfquant.export.checkpoint import read_safetensors_header, storage_state_dict
from hfquant.formats import format_for
from hfquant.nn.replace import set_module

SETTINGS = "settings.json"
HIDDEN = "hidden.safetensors"


def _digest(tensors: list[torch.Tensor], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        if t.device.type != "meta":
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_digest(model: nn.Module) -> str:
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    layout = [(n, list(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    embeddings = [model.get_input_embeddings().weight]
    return _digest(embeddings, json.dumps([config, layout], sort_keys=True, default=str))


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


class WorkDir:
    """The folder one resumable quantization writes its finished blocks to."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        settings = self.path / SETTINGS
        if settings.exists():
            _refuse_if_different(self.path, json.loads(settings.read_text(encoding="utf-8")), fingerprint)
        else:
            tmp = settings.with_name(f".{SETTINGS}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True, default=str), encoding="utf-8")
            os.replace(tmp, settings)

    @classmethod
    def open(
        cls,
        config: HfQuantConfig,
        model: nn.Module,
        ids: torch.Tensor | None,
        kept: dict[str, torch.Tensor],
    ) -> WorkDir:
        fingerprint = {
            "settings": json.loads(json.dumps(config.to_dict(), default=str)),
            "model": _model_digest(model),
            "calibration": _digest([] if ids is None else [ids]),
            "kept weights": _digest([kept[n] for n in sorted(kept)], ",".join(sorted(kept))),
        }
        return cls(config.work_dir, fingerprint)

    def block_file(self, index: int) -> Path:
        return self.path / f"block_{index:04d}.safetensors"

    def finished(self) -> int:
        """Blocks finished so far (all of ``0 .. n-1`` saved, and the inputs of block ``n``)."""
        hidden = self.path / HIDDEN
        if not hidden.exists():
            return 0
        _, metadata = read_safetensors_header(str(hidden))
        n = int(metadata["next_block"])
        return n if all(self.block_file(i).exists() for i in range(n)) else 0

    def save(self, index: int, block: nn.Module, batches: Batches, errors: tuple[float, float]) -> None:
        """Block ``index`` is done and ``batches`` hold the next block's inputs."""
        metadata = {"error_before": repr(errors[0]), "error_after": repr(errors[1])}
        _write_atomic(self.block_file(index), storage_state_dict(block), metadata)
        hidden = {f"hidden.{i}": h for i, (h, _) in enumerate(batches)}
        _write_atomic(self.path / HIDDEN, hidden, {"next_block": str(index + 1)})

    def restore(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], config: HfQuantConfig, block_prefix: str
    ) -> tuple[float, float]:
        """Put finished block ``index`` (its linears named within the block, ``block_prefix`` before
        them in the model) back in place of its full-precision version (headers checked first, as for
        a checkpoint, each layer at its ``dynamic`` settings); return its errors before and after
        block-wise minimization."""
        path = self.block_file(index)
        tensors, metadata = read_safetensors_header(str(path))
        fmt = format_for(config)
        for name, linear in linears.items():
            layer = config.module_config(block_prefix + name)
            planned = fmt.check_header(tensors, name, linear, layer)
            set_module(block, name, fmt.skeleton(linear, layer, **planned))
        block.load_state_dict(load_file(path), strict=True)
        return float(metadata["error_before"]), float(metadata["error_after"])

    def hidden_states(self, batches: Batches) -> Batches:
        """``batches`` with the saved hidden states of the next block in place of the first block's."""
        saved = load_file(self.path / HIDDEN)
        return [(saved[f"hidden.{i}"].to(h.device), kw) for i, (h, kw) in enumerate(batches)]


def _refuse_if_different(path: Path, stored: dict[str, Any], now: dict[str, Any]) -> None:
    if stored == now:
        return
    settings = [
        f"{k}={stored['settings'].get(k)!r} there, {v!r} now"
        for k, v in now["settings"].items()
        if stored.get("settings", {}).get(k) != v
    ]
    other = [k for k in ("model", "calibration", "kept weights") if stored.get(k) != now[k]]
    what = "; ".join(settings + [f"{k}: different" for k in other])
    raise ValueError(
        f"work_dir {path} holds a quantization made with other settings or another model ({what}): "
        "rerun with the same model and settings to resume, or pass an empty work_dir"
    )
