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
    gguf_type: str | None = None,
    gguf_eval_text: str | os.PathLike | None = None,
    **save_kwargs: Any,
) -> Path:
    """``save_pretrained`` (weights, config, model card) and the tokenizer into a temporary
    sibling folder, then swap it in. The card's usage snippet loads ``model_id`` (a Hub repo the
    folder is meant for), else the final folder.

    ``gguf_type`` (``"q4_1"``, ``"q2_k"``, ...: :data:`hfquant.export.gguf.GGUF_TYPES`) also writes
    the model as ``<name>-<TYPE>.gguf`` for llama.cpp beside the safetensors (lossless where the
    model was solved on that type's grid, see :func:`hfquant.export.gguf.save_gguf`), and the card
    gets a llama.cpp section: the file, its type and size, the perplexity ``llama-perplexity``
    measures on the text file ``gguf_eval_text`` (default: the held-out Book of Mormon chapters;
    skipped with a note when llama.cpp's tools are not built) and the command to chat with it.

    An interruption (error, Ctrl-C) at any point leaves either the previous folder or nothing,
    never a half-written checkpoint.
    """
    if gguf_type is not None and tokenizer is None:
        raise ValueError(f"gguf_type={gguf_type!r} needs the tokenizer: a GGUF file carries its own vocabulary")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        # The class's save_pretrained: hfquant's per-model override would write a card naming tmp.
        type(model).save_pretrained(model, tmp, **save_kwargs)
        gguf = None
        if gguf_type is not None:
            gguf = _write_gguf(model, tokenizer, tmp, Path(model_id or out).name, gguf_type, gguf_eval_text)
        if isinstance(getattr(model.config, "quantization_config", None), HfQuantConfig):
            from hfquant.export.model_card import write_model_card

            write_model_card(model, tmp, model_id or str(out), gguf=gguf)
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


def _write_gguf(model: Any, tokenizer: Any, folder: Path, name: str, gguf_type: str, eval_file: str | os.PathLike | None):
    """``folder/<name>-<TYPE>.gguf`` and the figures the card reports about it."""
    from hfquant.export.gguf import check_type, save_gguf
    from hfquant.export.llamacpp import LlamaCppError, llamacpp_perplexity
    from hfquant.export.model_card import GGUFFigures

    gguf_type = check_type(gguf_type, "type (gguf_type)", presets=True)
    path = folder / f"{name}-{gguf_type.upper()}.gguf"
    summary = save_gguf(model, tokenizer, path, type=gguf_type)
    figures = GGUFFigures(
        file=path.name,
        type=gguf_type,
        file_bytes=summary.file_bytes,
        bits_per_weight=summary.bits_per_weight,
        lossless=sum(t.how.startswith("lossless") for t in summary.tensors),
        requantized=sum(t.how.startswith("requantized") for t in summary.tensors),
    )
    if eval_file is None:
        from hfquant.corpora import heldout_texts

        eval_text = "\n\n".join(heldout_texts())
    else:
        eval_text, figures.text = Path(eval_file).read_text(encoding="utf-8"), Path(eval_file).name
    try:
        figures.perplexity = llamacpp_perplexity(path, eval_text, chunks=figures.chunks)
    except LlamaCppError as err:
        figures.not_measured = str(err).splitlines()[0]
    return figures
