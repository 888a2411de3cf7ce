"""Learned rounding (hfquant.algorithms.rounding) on a tiny random block, and through the driver."""

import copy

import pytest
import torch
from helpers import TINY_CALIBRATION, solved_block
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.algorithms.block import block_error
from hfquant.algorithms.rounding import SignSGD, learn_rounding


def _solved_block(method: str = "gptq"):
    return solved_block(method, decoupleq_iters=1)


def test_learned_rounding_lowers_the_block_error_and_moves_integers_one_step():
    block, batches, targets, layers = _solved_block()
    start = {name: block.get_submodule(name).integers().clone() for name in layers}
    before = block_error(block, batches, targets)
    result = learn_rounding(block, batches, targets, layers, epochs=4)
    assert result.error_before == pytest.approx(before)
    assert result.error_after == pytest.approx(block_error(block, batches, targets), rel=1e-5)
    assert result.moved > 0 and result.error_after < before
    moved = 0
    for name in layers:
        q = block.get_submodule(name).integers()
        assert int(q.max()) <= 3
        assert int((q.int() - start[name].int()).abs().max()) <= 1  # at most one step
        moved += int((q != start[name]).sum())
    assert moved == result.moved
    assert all(p.grad is None for p in block.parameters())  # only the offsets trained
    for name in layers:  # grids stay on their float16 storage values
        module = block.get_submodule(name)
        for grid in (module.scales, module.zeros):
            assert torch.isfinite(grid).all() and torch.equal(grid, grid.half().to(grid.dtype))


def test_learned_rounding_keeps_the_start_when_nothing_helps():
    block, batches, targets, layers = _solved_block()
    state = copy.deepcopy(block.state_dict())
    # Scored on a batch it never trains on, with no epoch to train: the start is all there is.
    result = learn_rounding(block, batches[:1], targets[:1], layers, epochs=0, validation=(batches[1:], targets[1:]))
    assert result.moved == 0 and result.error_after == result.error_before
    for key, value in block.state_dict().items():
        assert torch.equal(value, state[key])


def test_learned_rounding_never_raises_the_held_out_error():
    block, batches, targets, layers = _solved_block("decoupleq")
    held_out = (batches[-1:], targets[-1:])
    before = block_error(block, *held_out)
    result = learn_rounding(block, batches[:-1], targets[:-1], layers, epochs=3, validation=held_out)
    assert result.error_after == pytest.approx(block_error(block, *held_out), rel=1e-5)
    assert result.error_after <= before * (1 + 1e-6)


def test_sign_sgd_steps_by_the_sign_and_stays_in_bounds():
    p = torch.zeros(3, requires_grad=True)
    opt = SignSGD([p], lr=0.4, bound=1.0)
    for _ in range(4):
        p.grad = torch.tensor([2.0, -1e-3, 0.0])
        opt.step()
    assert p.tolist() == pytest.approx([-1.0, 1.0, 0.0])


def test_quantize_with_learned_rounding_reloads_bit_identical(tiny_llama_dir, tmp_path):
    config = HfQuantConfig(
        bits=2, group_size=32, method="decoupleq", decoupleq_iters=1, blockwise_epochs=1, learned_rounding=True,
        e2e_epochs=0, **TINY_CALIBRATION,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config).eval()
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert again.config.quantization_config.learned_rounding is True
    card = (tmp_path / "q" / "README.md").read_text()
    assert "decoupleQ (Hessian shrunk 0.3 toward its diagonal) + learned rounding + block-wise minimization (1 epochs)" in card
    assert "- learned-rounding" in card  # a tag
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "rtn"},
        {"method": "inq"},
        {"blockwise_epochs": 0},
        {"kept_fraction": 0.01},
        {"split_clusters": 2, "method": "gptq"},
        {"gguf_type": "q4_0"},
    ],
)
def test_learned_rounding_config_is_checked(settings):
    with pytest.raises(ValueError, match="learned_rounding=True needs method='gptq' or 'decoupleq'"):
        HfQuantConfig(learned_rounding=True, **settings)
    with pytest.raises(ValueError, match="learned_rounding must be True or False"):
        HfQuantConfig(learned_rounding=1)
