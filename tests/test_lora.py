"""LoRA through PEFT on a saved and reloaded hfquant checkpoint (issue 17, item 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import decoupled_layer, input_ids, moe_model
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import validate_quantization_for_training

import hfquant.lora
from hfquant import HfQuantConfig
from hfquant.formats import QuantizedLinear
from hfquant.formats.base import InputGradThroughFrozenWeight
from hfquant.lora import QuantizedLoraLinear, register

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def quantized_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama at W2 g32 with kept weights, saved: tests load it back as users do."""
    config = HfQuantConfig(bits=2, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    path = tmp_path_factory.mktemp("w2-lora-base")
    model.save_pretrained(path)
    return path


def peft_model(path, **lora):
    model = AutoModelForCausalLM.from_pretrained(path)
    return get_peft_model(model, register(LoraConfig(r=4, target_modules=TARGETS, **lora)))


def quantized_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{b}": t.clone()
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
        for b, t in m.named_buffers()
    }


def lora_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rows", [3, 40])  # the fused CPU kernel, and the reference GEMM
def test_input_gradient_through_frozen_weight(rows):
    """Same output as without autograd; ``grad_x = grad_y @ W_hat`` (kept weights and all); the
    layer's own tensors get no gradient."""
    _, layer = decoupled_layer(2, 32, in_f=96, out_f=40, kept=7)
    x = torch.randn(rows, 96, requires_grad=True)
    y = layer(x)
    assert y.grad_fn.name() == InputGradThroughFrozenWeight.__name__ + "Backward"
    with torch.no_grad():
        assert torch.equal(y, layer(x))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=1e-5, atol=1e-5)
    assert all(t.grad is None for t in (*layer.parameters(), *layer.buffers()))


def test_input_gradient_matches_dequantized_model(quantized_dir):
    """Gradients reach the input embeddings through every quantized layer, as through a float copy
    of the model with the dequantized weights."""
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize(torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, linear)
    ids = input_ids()
    grads = []
    for m in (model, reference):
        embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_lora_trains_adapters_only(quantized_dir):
    """PEFT wraps every targeted quantized layer; a few AdamW steps lower the loss and leave the
    quantized tensors as they were."""
    model = peft_model(quantized_dir)
    assert model.base_model.model.hf_quantizer.is_trainable
    assert not model.base_model.model.hf_quantizer.is_qat_trainable
    validate_quantization_for_training(model)  # what Trainer checks before training a quantized model
    wrapped = [m for m in model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == len(TARGETS) * 2 and all(isinstance(m.base_layer, QuantizedLinear) for m in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = quantized_buffers(model)
    ids = input_ids()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = quantized_buffers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_gradients(quantized_dir):
    """prepare_model_for_kbit_training runs on an hfquant model; reentrant checkpointing (which
    needs ``enable_input_require_grads``) recomputes the blocks and gives the same LoRA gradients."""
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    model = get_peft_model(model, register(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)))
    model.train()
    ids = input_ids()
    plain = lora_grads(model, ids)
    calls = []
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = lora_grads(model, ids)
    assert len(calls) == 2  # forward, then the recomputation in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_adapter_saves_and_reloads_bit_identical(quantized_dir, tmp_path):
    model = peft_model(quantized_dir, init_lora_weights=False).eval()
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # the adapter alone, not the quantized base
    base = AutoModelForCausalLM.from_pretrained(quantized_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter", config=register(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_merge_is_refused_with_the_reason(quantized_dir):
    model = peft_model(quantized_dir)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(NotImplementedError, match="requantizing the layer"):
            merge()


def test_training_optim(monkeypatch):
    """Paged 8-bit AdamW only where bitsandbytes can run it (CUDA and the package), else AdamW."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hfquant.lora.training_optim() == "adamw_torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hfquant.lora.importlib.util, "find_spec", lambda name: object())
    assert hfquant.lora.training_optim() == "paged_adamw_8bit"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
def test_input_gradient_through_triton_kernel():
    _, layer = decoupled_layer(2, 64, in_f=256, out_f=128, kept=9, device="cuda")
    x = torch.randn(5, 256, device="cuda", requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=1e-4, atol=1e-4)


def test_init_from_quantization_error_at_full_rank_gives_back_the_full_precision_model(tiny_llama_dir, quantized_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    full_rank = max(m.in_features for m in reference.modules() if isinstance(m, nn.Linear))
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    model = get_peft_model(model, register(LoraConfig(r=full_rank, target_modules=TARGETS))).eval()
    ids = input_ids(shape=(2, 16))
    scales = hfquant.lora.input_scales(reference, ids, TARGETS)
    captured = hfquant.lora.init_from_quantization_error(model, reference, scales)
    assert len(captured) == 7 * reference.config.num_hidden_layers
    assert all(share > 0.999 for share in captured.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("weighted", [False, True])
def test_init_from_quantization_error_brings_a_low_rank_adapter_closer(tiny_llama_dir, quantized_dir, weighted):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = input_ids(shape=(2, 16))
    model = peft_model(quantized_dir).eval()  # PEFT's init: B = 0, the quantized base's output
    with torch.no_grad():
        target = reference(ids).logits
        before = (model(ids).logits - target).pow(2).mean()
        scales = hfquant.lora.input_scales(reference, ids, TARGETS) if weighted else None
        captured = hfquant.lora.init_from_quantization_error(model, reference, scales)
        after = (model(ids).logits - target).pow(2).mean()
    assert all(0 < share < 1 for share in captured.values())
    assert after < 0.9 * before
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_init_from_quantization_error_names_what_is_missing(tiny_llama_dir, quantized_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(quantized_dir)
    with pytest.raises(ValueError, match="no LoRA adapter 'default' on a quantized layer"):
        hfquant.lora.init_from_quantization_error(plain, reference)
    model = peft_model(quantized_dir)
    with pytest.raises(ValueError, match="the reference model has no linear 'model.layers.0.self_attn.q_proj'"):
        hfquant.lora.init_from_quantization_error(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"no nn.Linear of the model ends in one of \['nope'\]"):
        hfquant.lora.input_scales(reference, input_ids(shape=(1, 8)), ["nope"])


def test_all_linear_targets_every_quantized_layer(quantized_dir):
    """PEFT's 'all-linear' looks for nn.Linear and Conv1D only, and would find no quantized layer;
    register(config, model) names them all, the output embeddings left out."""
    with pytest.raises(ValueError, match="needs the model"):
        register(LoraConfig(r=4, target_modules="all-linear"))
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    config = register(LoraConfig(r=4, target_modules="all-linear"), model)
    assert config.target_modules == set(TARGETS)
    model = get_peft_model(model, config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(adapted) == len(TARGETS) * 2 and not any("lm_head" in n for n in adapted)
    grads = lora_grads(model, input_ids())
    assert len(grads) == 2 * len(adapted) and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_all_linear_reaches_moe_experts(tmp_path):
    moe_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=HfQuantConfig(bits=4, method="rtn"))
    config = register(LoraConfig(r=4, target_modules="all-linear"), model)
    assert {"down.3", "gate_up.0", "q_proj"} <= config.target_modules and "3" not in config.target_modules
    model = get_peft_model(model, config)
    adapted = {n for n, m in model.named_modules() if isinstance(m, QuantizedLoraLinear)}
    assert len(adapted) == (4 + 2 * 4) * 2
    assert "base_model.model.model.layers.1.mlp.experts.down.3" in adapted
