"""The sequential driver and block-wise minimization on tiny random models."""

import copy

import pytest
import torch
from helpers import solved_block, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.algorithms.block import block_error
from hfquant.algorithms.blockwise import block_minimize, trainable_float_parameters
from hfquant.driver import quantize_model
from hfquant.driver.blocks import capture_block_inputs, find_decoder_blocks
from hfquant.driver.sequential import validation_batches
from hfquant.models import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_capture_keeps_block_kwargs():
    model = tiny_model().eval()
    prefix, blocks = find_decoder_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    ids = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(0))
    batches = capture_block_inputs(model, blocks[0], ids, batch_size=4)
    assert [h.shape[0] for h, _ in batches] == [4, 2]
    hidden, kwargs = batches[0]
    assert hidden.shape == (4, 16, 64)
    assert "position_embeddings" in kwargs  # rotary cos/sin travel with the block inputs
    with torch.no_grad():
        direct = model.model.layers[0](hidden, **kwargs)
    assert torch.isfinite(direct[0] if isinstance(direct, tuple) else direct).all()


def _quantized_block():
    block, batches, targets, layers = solved_block("rtn")
    return block, batches, targets, set(layers)


def test_block_minimize_lowers_block_loss_and_never_raises_it():
    block, batches, targets, grids = _quantized_block()
    before = block_error(block, batches, targets)
    after = block_minimize(block, batches, targets, grids, epochs=5, lr=5e-3)
    assert after == pytest.approx(block_error(block, batches, targets), rel=1e-5)
    assert after < 0.9 * before
    # Scales and zeros stay on their float16 storage grid.
    for name, (value, _) in trainable_float_parameters(block, grids).items():
        if name.endswith(("scales", "zeros")):
            assert torch.equal(value, value.half().float())


def test_block_minimize_keeps_start_when_training_hurts():
    block, batches, targets, grids = _quantized_block()
    before = block_error(block, batches, targets)
    state = copy.deepcopy(block.state_dict())
    after = block_minimize(block, batches, targets, grids, epochs=1, lr=10.0)  # a learning rate that can only hurt
    assert after <= before * (1 + 1e-6)
    if after == pytest.approx(before):
        for key, value in block.state_dict().items():
            assert torch.equal(value, state[key])


def test_block_minimize_keeps_the_epoch_best_on_held_out_batches():
    block, batches, targets, grids = _quantized_block()
    train, held_out = (batches[:-1], targets[:-1]), (batches[-1:], targets[-1:])
    before = block_error(block, *held_out)
    scored = block_minimize(block, *train, grids, epochs=3, lr=5e-3, validation=held_out)
    # The score returned is the held-out error of the state left in place, never above the start's.
    assert scored == pytest.approx(block_error(block, *held_out), rel=1e-5)
    assert scored <= before * (1 + 1e-6)
    # Scored on the training batches themselves, the same call is the default behaviour.
    again, _, _, _ = _quantized_block()
    assert block_minimize(again, *train, grids, epochs=3, lr=5e-3, validation=train) == pytest.approx(
        block_minimize(_quantized_block()[0], *train, grids, epochs=3, lr=5e-3), rel=1e-6
    )


@pytest.mark.parametrize(("n_batches", "fraction", "held_out"), [(8, 0.0, 0), (8, 0.125, 1), (8, 0.2, 2), (1, 0.5, 0), (2, 0.9, 1)])
def test_validation_batches(n_batches, fraction, held_out):
    assert validation_batches(n_batches, fraction) == held_out


def test_quantize_with_held_out_blockwise_batches(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    config = HfQuantConfig(
        bits=2, group_size=32, method="gptq", nsamples=8, seqlen=32, blockwise_epochs=2,
        blockwise_batch_size=4, blockwise_validation=0.5,
    )  # fmt: skip
    report = quantize_model(model, config, tokenizer=tokenizer, skip=["lm_head"], progress=False)
    # "after" is the error on every calibration batch, held-out ones included, like "before".
    assert len(report.blocks) == 2
    assert all(0 < b.error_after < float("inf") and 0 < b.error_before < float("inf") for b in report.blocks)


def test_blockwise_validation_config_is_checked():
    with pytest.raises(ValueError, match="blockwise_validation must be a fraction in \\[0, 1\\)"):
        HfQuantConfig(blockwise_validation=1.0)


@pytest.mark.parametrize("method", ["gptq", "decoupleq"])
def test_calibrated_methods_beat_rtn_end_to_end(tokenizer, method):
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[
        :, :64
    ]
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for m in ("rtn", method):
        quantized = copy.deepcopy(model)
        config = HfQuantConfig(
            bits=2, group_size=32, method=m, nsamples=8, seqlen=32, blockwise_epochs=2, blockwise_batch_size=4
        )
        report = quantize_model(quantized, config, tokenizer=tokenizer, skip=["lm_head"], progress=False)
        assert report.layers == 14
        with torch.no_grad():
            errors[m] = float((quantized(ids).logits - reference).pow(2).mean())
        if m != "rtn":
            assert len(report.blocks) == 2
            assert all(b.error_after <= b.error_before * (1 + 1e-6) for b in report.blocks)
    assert errors[method] < errors["rtn"]


def test_offloaded_model_quantizes_to_the_same_result(tokenizer, tmp_path, caplog):
    """max_memory/device_map offload: blocks on disk are loaded one at a time and give identical results.
    End-to-end tuning, which needs the whole model, is skipped there by default (and says so)."""
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    model.save_pretrained(tmp_path / "fp")

    def config():
        return HfQuantConfig(
            bits=2,
            group_size=32,
            method="gptq",
            nsamples=4,
            seqlen=32,
            blockwise_epochs=1,
            tokenizer=tokenizer,
        )

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        quantization_config=config(),
    )
    assert offloaded.hf_device_map["model.layers.1"] == "cpu"  # quantized, the block is resident
    assert offloaded.config.quantization_config.e2e_epochs == 0
    assert "end-to-end tuning skipped: some weights are offloaded" in caplog.text
    same = config()
    same.e2e_epochs = 0
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=same)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, in_memory(ids).logits)


def test_token_id_calibration_and_stage_times():
    """``dataset`` as token ids needs no tokenizer; the report times every stage that ran, and the
    stages add up to no more than the whole; end-to-end tuning asks for windows it does not train on."""
    model = tiny_model(vocab_size=320).eval()
    ids = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(0))
    config = HfQuantConfig(bits=2, group_size=32, nsamples=8, seqlen=32, blockwise_epochs=1, blockwise_batch_size=4,
                           e2e_epochs=1, dataset=ids)  # fmt: skip
    assert config.to_dict()["dataset"] == "custom (token ids [10, 32])"
    report = quantize_model(copy.deepcopy(model), config, skip=["lm_head"], progress=False)
    assert list(report.stage_seconds) == ["calibration", "hessian pass", "solve", "block-wise", "end-to-end"]
    assert all(t > 0 for t in report.stage_seconds.values())
    assert sum(report.stage_seconds.values()) <= report.seconds
    assert report.stage_shares().startswith("calibration ") and "end-to-end" in report.stage_shares()
    with pytest.raises(ValueError, match=r"at least nsamples \+ 2 = 10 rows \(got 9\), or set e2e_epochs=0"):
        config.dataset = ids[:9]
        quantize_model(copy.deepcopy(model), config, skip=["lm_head"], progress=False)
