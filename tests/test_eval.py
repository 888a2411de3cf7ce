"""Perplexity on a tiny random Llama: near uniform over the vocabulary, and equal to a by-hand sum."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from hfquant.calibration import tokenize_texts
from hfquant.corpora import heldout_texts
from hfquant.eval import perplexity
from hfquant.models import default_model_path


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tiny_model(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return heldout_texts()[:2]


def test_random_model_is_near_uniform(
    tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> None:
    # Logits of a freshly initialised model are small (std ~0.2), so its predictions are nearly
    # uniform: perplexity ~ vocab_size * exp(var/2), a few percent above the vocabulary size.
    ppl = perplexity(tiny_model, tokenizer, texts, seqlen=64, max_windows=4, progress=False)
    assert ppl == pytest.approx(len(tokenizer), rel=0.1)


def test_matches_manual_computation(
    tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> None:
    seqlen, n_windows = 48, 6
    ids = tokenize_texts(texts, tokenizer)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logprobs = torch.log_softmax(tiny_model(window[None]).logits[0], dim=-1)
            nll -= logprobs[torch.arange(seqlen - 1), window[1:]].sum().item()
            count += seqlen - 1
    expected = math.exp(nll / count)
    ppl = perplexity(tiny_model, tokenizer, texts, seqlen=seqlen, max_windows=n_windows, progress=False)
    assert ppl == pytest.approx(expected, rel=1e-5)


def test_string_input_window_limit_and_mode(
    tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> None:
    joined = "\n\n".join(texts)
    as_list = perplexity(tiny_model, tokenizer, texts, seqlen=32, max_windows=3, progress=False)
    assert perplexity(tiny_model, tokenizer, joined, seqlen=32, max_windows=3, progress=False) == as_list
    first_window = joined[: len(joined) // 4]
    assert perplexity(tiny_model, tokenizer, first_window, seqlen=32, max_windows=1, progress=False) == pytest.approx(
        perplexity(tiny_model, tokenizer, joined, seqlen=32, max_windows=1, progress=False), rel=1e-6
    )
    tiny_model.train()
    perplexity(tiny_model, tokenizer, texts, seqlen=32, max_windows=1)  # with the progress bar
    assert tiny_model.training
    tiny_model.eval()


def test_rejects_too_short_text(tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        perplexity(tiny_model, tokenizer, "too short", progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(tiny_model, tokenizer, "too short", max_windows=0, progress=False)
