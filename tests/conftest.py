"""Shared fixtures: tiny random models of several architectures, saved as local folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton reads this when it is first imported, and transformers imports it (so does torch.compile):
# set it before those imports so CPU-only CI runs the Triton kernels in interpreter mode
# (tests/test_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY, build_tiny  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template (for CLI and examples)."""
    from transformers import AutoTokenizer

    from hfquant.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-chat")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def quantized_chat_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """``tiny_chat_model_dir`` quantized at load (W4 g32, RTN) and saved with its tokenizer: a
    checkpoint that pipelines, lm-eval and the CLI open. Tests may rewrite its model card."""
    from transformers import AutoTokenizer

    from hfquant import HfQuantConfig

    out = tmp_path_factory.mktemp("chat-w4") / "w4"
    config = HfQuantConfig(bits=4, group_size=32, method="rtn")
    AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, quantization_config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_chat_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_tokenized_dir(request, tmp_path_factory) -> Path:
    """A tiny random Llama or Qwen2 with the real SmolLM2 tokenizer: calibrated methods can run on it."""
    from transformers import AutoTokenizer

    from hfquant.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    path = tmp_path_factory.mktemp(f"{request.param}-tok")
    build_tiny(request.param, path, vocab_size=len(tokenizer), tie_word_embeddings=True)
    tokenizer.save_pretrained(path)
    return path


class FakeHfApi:
    """Stands in for the Hub: records the calls and keeps a copy of each uploaded folder."""

    calls: list[tuple[str, dict]] = []
    remote: Path

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        target = FakeHfApi.remote / repo_id
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """No test reaches a Hub: ``huggingface_hub.HfApi`` as hfquant uses it is replaced by
    :class:`FakeHfApi`, whose uploads land in ``tmp_path / "remote" / repo_id``."""
    import hfquant.export.hub as hub

    FakeHfApi.calls = []
    FakeHfApi.remote = tmp_path / "remote"
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture()
def sharded(tiny_llama_dir, tmp_path):
    """A tiny Llama with kept weights saved in >= 3 shards of 100 KB: ``(model, folder)``."""
    from hfquant import HfQuantConfig
    from hfquant.export import save_quantized

    config = HfQuantConfig(bits=2, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config).eval()
    out = save_quantized(model, tmp_path / "sharded", max_shard_size="100KB")
    return model, out
