"""INQ: weights end exactly zero or +-2^k with k in the paper's set, quantized share by share with the
float rest retrained, and INQ layers save, reload and refuse bad checkpoints like every hfquant layer."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_TEXTS
from transformers import AutoModelForCausalLM, LlamaConfig

from hfquant import HfQuantConfig
from hfquant.algorithms.block import block_error
from hfquant.algorithms.grid import exponent_count, power_of_two_codes, power_of_two_values, top_exponents
from hfquant.algorithms.inq import INQ_SHARES, grow_frozen, inq_block, retrain_float_weights
from hfquant.driver.blocks import capture_block_inputs, find_decoder_blocks, full_precision_pass
from hfquant.export import bits_per_weight
from hfquant.nn import PowerOfTwoLinear


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 80, generator=g) * torch.logspace(-3, -1, 16)[:, None]
    w[3] = 0.0  # a row of zeros stays zero
    return w


def _allowed(n1: torch.Tensor, bits: int) -> list[set[float]]:
    """Every row's allowed set {0, +-2^n2, .., +-2^n1}, n2 = n1 + 1 - 2^(b-1)/2, as in the paper."""
    sets = []
    for top in n1.tolist():
        n2 = top + 1 - 2 ** (bits - 1) // 2
        powers = {2.0**k for k in range(n2, top + 1)}
        sets.append({0.0} | powers | {-p for p in powers})
    return sets


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_values_are_zero_or_powers_of_two_from_the_allowed_set(bits):
    w = _weights(bits)
    n1 = top_exponents(w)
    # n1 = floor(log2(4 max|w| / 3)) per row.
    expected = torch.floor(torch.log2(4 * w.abs().amax(1) / 3))
    live = w.abs().amax(1) > 0
    assert torch.equal(n1[live].float(), expected[live])
    codes = power_of_two_codes(w, n1, bits)
    assert int(codes.max()) <= 2 * exponent_count(bits) < 2**bits
    values = power_of_two_values(codes, n1, bits)
    for row, allowed in zip(values.tolist(), _allowed(n1, bits), strict=True):
        assert set(row) <= allowed
    # Each weight goes to the nearest allowed value (the paper's rounding rule).
    for r, allowed in enumerate(_allowed(n1, bits)):
        levels = torch.tensor(sorted(allowed))
        nearest = (w[r, :, None] - levels).abs().min(dim=1).values
        torch.testing.assert_close((w[r] - values[r]).abs(), nearest, rtol=0, atol=1e-9)
    assert bool((values[3] == 0).all())


def test_grow_frozen_takes_the_largest_float_weights():
    w = _weights()
    frozen = torch.zeros_like(w, dtype=torch.bool)
    for share in INQ_SHARES:
        before = frozen
        frozen = grow_frozen(w, frozen, share)
        assert int(frozen.sum()) == round(share * w.numel())
        assert bool((frozen | ~before).all())  # frozen weights stay frozen
        new = frozen & ~before
        if (~frozen).any():
            assert float(w.abs()[new].min()) >= float(w.abs()[~frozen].max())
    assert bool(frozen.all())


def _tiny_block():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    _, blocks = find_decoder_blocks(model)
    ids = torch.randint(0, 320, (8, 24), generator=torch.Generator().manual_seed(3))
    batches = capture_block_inputs(model, blocks[0], ids, batch_size=4)
    linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    _, targets = full_precision_pass(blocks[0], {}, batches)
    return blocks[0], linears, batches, targets


def test_retraining_moves_only_float_weights_and_never_raises_the_loss():
    block, linears, batches, targets = _tiny_block()
    frozen, start = {}, {}
    for name, linear in linears.items():
        frozen[name] = grow_frozen(linear.weight, torch.zeros_like(linear.weight, dtype=torch.bool), 0.5)
        n1 = top_exponents(linear.weight)
        with torch.no_grad():
            q = power_of_two_values(power_of_two_codes(linear.weight, n1, 2), n1, 2)
            linear.weight.copy_(torch.where(frozen[name], q, linear.weight))
        start[name] = linear.weight.detach().clone()
    loss_before = block_error(block, batches, targets)
    loss = retrain_float_weights(block, linears, frozen, batches, targets, epochs=3, lr=1e-2)
    assert loss <= loss_before and loss < 0.95 * loss_before
    for name, linear in linears.items():
        assert torch.equal(linear.weight[frozen[name]], start[name][frozen[name]])
        assert not torch.equal(linear.weight[~frozen[name]], start[name][~frozen[name]])
        assert linear.weight.grad is None
    assert all(p.requires_grad for p in block.parameters())  # flags restored


def test_each_step_quantizes_its_share_and_none_is_left_float(bits=3):
    block, linears, batches, targets = _tiny_block()
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    history: list[dict[str, float]] = []
    codes = inq_block(block, linears, batches, targets, bits, epochs=1, lr=1e-3, history=history)
    assert len(history) == len(INQ_SHARES)
    for step, share in zip(history, INQ_SHARES, strict=True):
        for name in linears:
            assert step[name] == pytest.approx(share, abs=1 / original[name].numel())
    for name, linear in linears.items():
        q, n1 = codes[name]
        values = power_of_two_values(q, n1, bits)
        assert torch.equal(linear.weight.detach(), values)  # every weight is on the power-of-two set
        assert torch.equal(n1, top_exponents(original[name]))  # exponents come from the pre-trained weights
        for row, allowed in zip(values.tolist(), _allowed(n1, bits), strict=True):
            assert set(row) <= allowed


def test_inq_layers_are_powers_of_two_and_store_codes_and_exponents(tiny_tokenized_dir):
    config = HfQuantConfig(
        bits=3, method="inq", dataset=TINY_TEXTS, nsamples=4, seqlen=32, blockwise_epochs=1, blockwise_batch_size=2
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_tokenized_dir, quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, PowerOfTwoLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    # 3-bit codes plus one int8 exponent per row; nothing else is stored.
    n = sum(m.in_features * m.out_features for m in layers)
    expected = sum(m.out_features * (-(-m.in_features // 32) * 3 * 32 + 8) for m in layers) / n
    assert bits_per_weight(model) == pytest.approx(expected)
    assert 3.0 < bits_per_weight(model) < 3.5
    for layer in layers:
        w = layer.dequantize(torch.float32)
        nonzero = w[w != 0].abs()
        assert torch.equal(torch.exp2(torch.log2(nonzero).round()), nonzero)
