"""End-to-end tuning of the float part: keeps its best state on held-back windows, reloads exactly."""

import pytest
import torch
from helpers import TINY_CALIBRATION
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.algorithms.end_to_end import _kl, float_parameters, tune_end_to_end


@pytest.fixture()
def pair(tiny_llama_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = HfQuantConfig(bits=2, group_size=32, method="rtn")
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, quantization_config=config)
    windows = torch.randint(0, teacher.config.vocab_size, (10, 24), generator=torch.Generator().manual_seed(0))
    return teacher, student, windows


def _validation_kl(student, teacher, windows) -> float:
    with torch.no_grad():
        return float(_kl(student(input_ids=windows).logits, teacher(input_ids=windows).logits))


def test_tuning_lowers_validation_kl_and_keeps_the_best_state(pair) -> None:
    teacher, student, windows = pair
    train, validation = windows[:8], windows[8:]
    teach = lambda ids: teacher(input_ids=ids).logits  # noqa: E731
    before = _validation_kl(student, teacher, validation)
    result = tune_end_to_end(student, teach, train, validation, epochs=3, lr=1e-2, batch_size=4)
    assert result.start_kl == pytest.approx(before, rel=1e-5)
    assert result.best_kl == min(result.validation_kl) and result.best_kl < result.start_kl
    assert _validation_kl(student, teacher, validation) == pytest.approx(result.best_kl, rel=1e-5)
    scales = [v for n, (v, _) in float_parameters(student).items() if n.endswith("scales")]
    assert scales and all(torch.equal(s, s.half().float()) for s in scales)  # storage values


def test_a_harmful_step_is_not_kept(pair) -> None:
    teacher, student, windows = pair
    state = {k: v.clone() for k, v in student.state_dict().items()}
    teach = lambda ids: teacher(input_ids=ids).logits  # noqa: E731
    result = tune_end_to_end(student, teach, windows[:8], windows[8:], epochs=1, lr=10.0)
    assert result.best_epoch == 0 and result.validation_kl[1] > result.start_kl
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())


def test_tuned_model_reloads_bit_identical(pair, tmp_path) -> None:
    teacher, student, windows = pair
    teach = lambda ids: teacher(input_ids=ids).logits  # noqa: E731
    tune_end_to_end(student, teach, windows[:8], windows[8:], epochs=1, lr=1e-2, batch_size=4)
    student.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=windows).logits, student(input_ids=windows).logits)


def test_bad_arguments_are_named(pair) -> None:
    teacher, student, windows = pair
    with pytest.raises(ValueError, match="validation windows"):
        tune_end_to_end(student, lambda ids: ids, windows, windows[:0])
    with pytest.raises(ValueError, match="lr > 0"):
        tune_end_to_end(student, lambda ids: ids, windows, windows, lr=0)


def test_quantize_with_e2e_epochs_tunes_against_the_full_precision_copy(tiny_llama_dir) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    # The unshrunk solve leaves the tiny model's grids far enough from the teacher on random windows
    # for tuning on 4 calibration windows to show there too (shrunk, both are within 2% there).
    settings = dict(bits=2, group_size=32, method="gptq", blockwise_epochs=0, hessian_shrink=0.0, **TINY_CALIBRATION)
    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(**settings, e2e_epochs=0)
    )
    tuned = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(**settings, e2e_epochs=2, e2e_lr=1e-2)
    )
    kl = tuned.hf_quantizer.report.e2e_validation_kl
    assert len(kl) == 3 and min(kl) < kl[0]  # the start, then two epochs; one of them helped
    assert not plain.hf_quantizer.report.e2e_validation_kl
    # Same integers, other grids: the tuning moved only the float part.
    for name, module in plain.named_modules():
        if hasattr(module, "qweight"):
            other = tuned.get_submodule(name)
            assert torch.equal(module.qweight, other.qweight)
    windows = torch.randint(0, teacher.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(5))
    assert _validation_kl(tuned, teacher, windows) < _validation_kl(plain, teacher, windows)


@pytest.mark.parametrize(
    ("settings", "resolved"),
    [
        (dict(method="decoupleq"), 2),
        (dict(method="gptq"), 2),
        (dict(method="gptq", e2e_epochs=1), 1),
        (dict(method="gptq", e2e_epochs=0), 0),
        (dict(method="rtn"), 0),
        (dict(method="gptq", kept_fraction=0.02, saliency="magnitude"), 0),
    ],
)
def test_default_e2e_epochs_apply_to_calibrated_solvers_and_are_saved(tiny_llama_dir, tmp_path, settings, resolved):
    """``e2e_epochs=None`` (the default) runs 2 epochs for gptq/decoupleq without kept weights, none
    otherwise; the number that ran is what config.json records."""
    config = HfQuantConfig(bits=2, group_size=32, blockwise_epochs=0, **TINY_CALIBRATION, **settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert model.config.quantization_config.e2e_epochs == resolved
    assert len(model.hf_quantizer.report.e2e_validation_kl) == (resolved + 1 if resolved else 0)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.e2e_epochs == resolved


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(e2e_epochs=-1), "e2e_epochs"),
        (dict(e2e_epochs=1, e2e_lr=0), "e2e_lr must be a positive number"),
        (dict(e2e_epochs=1, kept_fraction=0.01), "not supported with kept 16-bit weights"),
    ],
)
def test_e2e_config_errors_name_the_field(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        HfQuantConfig(**settings)
