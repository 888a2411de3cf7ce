"""Helpers the tests share (fixtures live in conftest.py): tiny inputs, calibration text, solver
problems, hand-built layers, and editing a saved checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    NemotronHConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3MoeConfig,
)

from hfquant import DecoupledLinear
from hfquant.algorithms.rtn import rtn_quantize

# Tiny random models of several architectures (conftest saves them as session fixtures).
TINY = {
    "llama": LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "qwen2": Qwen2Config(
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
    ),
    "mistral": MistralConfig(
        hidden_size=128,
        intermediate_size=224,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
        sliding_window=None,
    ),
}


def tiny_model(arch: str = "llama", **overrides) -> PreTrainedModel:
    """A tiny random model of ``arch`` (seed 0), its config changed by ``overrides`` (e.g. ``vocab_size``)."""
    config = copy.deepcopy(TINY[arch])
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# Tiny mixture-of-experts models (tests/test_moe.py): the experts as transformers fuses them.
MOE_SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "qwen3_moe": lambda experts, k: Qwen3MoeConfig(
        **MOE_SMALL, head_dim=16, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=32
    ),
    # transformers renames its keys on save (mlp -> block_sparse_moe) and back on load
    "mixtral": lambda experts, k: MixtralConfig(
        **MOE_SMALL, intermediate_size=32, num_local_experts=experts, num_experts_per_tok=k
    ),
    # transposed 3D weights, biases, interleaved gate/up and a clamped gate of its own
    "gpt_oss": lambda experts, k: GptOssConfig(
        **MOE_SMALL, head_dim=16, intermediate_size=32, num_local_experts=experts, num_experts_per_tok=k
    ),
    # experts without a gate (up_proj, activation, down_proj)
    "nemotron_h": lambda experts, k: NemotronHConfig(
        **MOE_SMALL, n_routed_experts=experts, num_experts_per_tok=k, moe_intermediate_size=32,
        hybrid_override_pattern="*E",
    ),  # fmt: skip
}


def moe_model(arch: str, experts: int = 4, k: int = 2) -> PreTrainedModel:
    """A tiny random MoE model of ``arch`` (seed 0, eval mode): ``experts`` per layer, ``k`` per token."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MOE[arch](experts, k), dtype=torch.float32).eval()


def build_tiny(arch: str, path: Path, **overrides) -> Path:
    """``tiny_model(arch, **overrides)`` saved in ``path``."""
    tiny_model(arch, **overrides).save_pretrained(path)
    return path


# Calibration text for tiny models: a few sentences, so no corpus is loaded.
TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the afternoon sun. " * 6,
    "A small model learns little, but its layers still have to compute the same function after quantization. "
    * 6,
]


class ByteTokenizer:
    """Token ids are the text's UTF-8 bytes (ASCII text stays below 128): calibrates tiny models
    without a tokenizer file."""

    def __call__(self, text: str, **_kwargs) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


# HfQuantConfig fields that calibrate a tiny model on TINY_TEXTS in a moment.
TINY_CALIBRATION = dict(dataset=TINY_TEXTS, nsamples=4, seqlen=32, blockwise_batch_size=2, tokenizer=ByteTokenizer())


def input_ids(vocab: int = 320, shape: tuple[int, int] = (2, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def rewrite_checkpoint(folder: Path, edit) -> None:
    """Load ``folder/model.safetensors``, let ``edit(tensors, metadata)`` change it, write it back."""
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def make_problem(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ill-conditioned ``H = X^T X``: low-rank correlated inputs, per-channel scales, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    tokens, rank = 2048, max(4, in_features // 8)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, in_features, generator=g) / rank**0.5
    x = x + 0.3 * torch.randn(tokens, in_features, generator=g)
    scale = torch.exp(0.5 * torch.randn(in_features, generator=g))
    scale[torch.randperm(in_features, generator=g)[: max(1, in_features // 50)]] *= 8.0
    x = x * scale
    w = 0.02 * torch.randn(out_features, in_features, generator=g)
    return w, x.T @ x / tokens


def decoupled_layer(
    bits: int,
    group_size: int,
    in_f: int = 200,
    out_f: int = 48,
    kept: int = 0,
    bias: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, DecoupledLinear]:
    """A random weight and its round-to-nearest ``DecoupledLinear`` with ``kept`` random kept weights."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=g))
    mask = None
    if kept:
        mask = torch.zeros(out_f * in_f, dtype=torch.bool)
        mask[torch.randperm(out_f * in_f, generator=g)[:kept]] = True
        mask = mask.view(out_f, in_f)
    linear = linear.to(device)
    config = SimpleNamespace(bits=bits, group_size=group_size)  # any size, even one the config refuses
    result = rtn_quantize(linear.weight.data, bits, group_size)
    module = DecoupledLinear.from_result(result, linear, config, None if mask is None else mask.to(device))
    return linear.weight.data, module


def solved_block(method: str = "rtn", bits: int = 2, **settings):
    """Block 0 of a tiny Llama with its linears solved at ``bits`` g32 by ``method``.

    Returns the block, its calibration batches and full-precision targets, and per linear name
    the original weight and input Hessian.
    """
    from hfquant import HfQuantConfig
    from hfquant.driver.blocks import capture_block_inputs, find_decoder_blocks, full_precision_pass
    from hfquant.driver.solve import quantize_linear
    from hfquant.nn.replace import set_module

    model = tiny_model().eval()
    _, blocks = find_decoder_blocks(model)
    ids = torch.randint(0, 320, (8, 24), generator=torch.Generator().manual_seed(1))
    batches = capture_block_inputs(model, blocks[0], ids, batch_size=4)
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    hessians, targets = full_precision_pass(block, linears, batches)
    config = HfQuantConfig(bits=bits, group_size=32, method=method, **settings)
    for name, linear in linears.items():
        set_module(block, name, quantize_linear(linear, hessians[name], config))
    layers = {name: (linear.weight.data.clone(), hessians[name]) for name, linear in linears.items()}
    return block, batches, targets, layers
