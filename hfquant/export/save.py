"""Atomic saving and size accounting of quantized models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from hfquant.config import HfQuantConfig
from hfquant.formats import QuantizedLinear


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits of the quantized layers (integers, 16-bit grids, cluster indices, exponents, kept
    weights and their indices: each module's ``storage_bits()``) divided by the number of weights
    those layers had before quantization."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("the model has no quantized hfquant layer: it is not quantized by hfquant")
    stored = sum(m.storage_bits() for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    return stored / weights


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def save_quantized(
    model: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    model_id: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """``save_pretrained`` (weights, config, model card) and the tokenizer into a temporary
    sibling folder, then swap it in. The card's usage snippet loads ``model_id`` (a Hub repo the
    folder is meant for), else the final folder.

    An interruption (error, Ctrl-C) at any point leaves either the previous folder or nothing,
    never a half-written checkpoint.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        # The class's save_pretrained: hfquant's per-model override would write a card naming tmp.
        type(model).save_pretrained(model, tmp, **save_kwargs)
        if isinstance(getattr(model.config, "quantization_config", None), HfQuantConfig):
            from hfquant.export.model_card import write_model_card

            write_model_card(model, tmp, model_id or str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            os.replace(out, backup)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not out.exists():
            os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return out
