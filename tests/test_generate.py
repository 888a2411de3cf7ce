"""``generate()`` and ``torch.compile`` on a tiny quantized model, through the CPU fast path."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant import DecoupledLinear, HfQuantConfig


@pytest.fixture(scope="module")
def quantized(tiny_chat_model_dir):
    config = HfQuantConfig(bits=2, group_size=64, method="rtn")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, quantization_config=config).eval()
    assert any(isinstance(m, DecoupledLinear) for m in model.modules())
    return model


def _prompt() -> torch.Tensor:
    return torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))


def test_greedy_with_and_without_cache_agree(quantized):
    ids = _prompt()
    with torch.no_grad():
        cached = quantized.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        uncached = quantized.generate(
            ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False
        )
    assert cached.shape == (1, 20)
    assert torch.equal(cached, uncached)


def test_sampling_is_seeded_and_batched(quantized):
    ids = _prompt().repeat(3, 1)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outputs.append(
                quantized.generate(
                    ids, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=50, temperature=0.8
                )
            )
    assert outputs[0].shape == (3, 18)
    assert torch.equal(outputs[0], outputs[1])


def test_past_key_values_match_full_forward(quantized):
    ids = _prompt()
    with torch.no_grad():
        full = quantized(ids).logits
        first = quantized(ids[:, :-3], use_cache=True)
        rest = quantized(ids[:, -3:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, full[:, -3:], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for inductor"
)
def test_torch_compile_matches_eager(quantized):
    ids = _prompt()
    compiled = torch.compile(quantized, dynamic=False)
    with torch.no_grad():
        eager = quantized(ids).logits
        prefill = compiled(ids).logits  # 12 rows: the C++ kernel (a custom op) inside the graph
    torch.testing.assert_close(prefill, eager, rtol=1e-4, atol=1e-4)
