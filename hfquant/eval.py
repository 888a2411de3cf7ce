"""Perplexity, the quality measure every quantized model is compared on."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfquant.calibration import tokenize_texts


def _token_stream(texts: str | Sequence[str], tokenizer: PreTrainedTokenizerBase, needed: int | None) -> torch.Tensor:
    """``tokenize_texts(texts)``, or, when only ``needed`` tokens are scored, the same first tokens
    from just enough leading documents (a held-out domain can hold millions of tokens).

    Documents are joined at blank lines, where the tokenizer's pre-split starts a new token, so the
    tokens of a prefix equal the first tokens of the whole; a margin of 64 tokens is kept anyway.
    """
    if needed is None or isinstance(texts, str):
        return tokenize_texts(texts, tokenizer)
    chars = 8 * needed
    while True:
        taken, size = [], 0
        for text in texts:
            taken.append(text)
            size += len(text) + 2
            if size >= chars:
                break
        ids = tokenize_texts(taken, tokenizer)
        if len(ids) >= needed + 64 or len(taken) == len(texts):
            return ids
        chars *= 2


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    seqlen: int = 512,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen``-token windows.

    Windows do not overlap and the ragged tail is dropped, so every window has the same context
    length and results compare across models and methods (the GPTQ convention). Each window
    predicts its last ``seqlen - 1`` tokens. The model runs in eval mode and its mode is restored.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 to predict a token, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    ids = _token_stream(texts, tokenizer, None if max_windows is None else max_windows * seqlen)
    n_windows = len(ids) // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    try:
        with torch.no_grad():
            for window in tqdm(windows, desc="perplexity", disable=not progress):
                window = window.unsqueeze(0).to(device)
                logits = model(input_ids=window, use_cache=False).logits
                nll = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
                total_nll += nll.item()
    finally:
        model.train(was_training)
    return math.exp(total_nll / (n_windows * (seqlen - 1)))


def domain_perplexities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domains: dict[str, str | Sequence[str]],
    seqlen: int = 512,
    max_windows: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """``perplexity`` on each named text (the yardstick: :func:`hfquant.corpora.heldout_domains`)."""
    return {
        name: perplexity(model, tokenizer, texts, seqlen=seqlen, max_windows=max_windows, progress=progress)
        for name, texts in domains.items()
    }


def mean_ratio(perplexities: dict[str, float], reference: dict[str, float], names: Sequence[str]) -> float:
    """Arithmetic mean over ``names`` of ``perplexities[name] / reference[name]`` (x full precision)."""
    if not names:
        raise ValueError("mean_ratio needs at least one domain name")
    return sum(perplexities[name] / reference[name] for name in names) / len(names)
