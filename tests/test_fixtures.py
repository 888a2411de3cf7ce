"""Checkpoints saved by an earlier hfquant (tests/fixtures/checkpoints/, one per stored format)
load bit-identical: same tensors, same logits as when they were written."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant  # noqa: F401  (registers the quantizer)

CHECKPOINTS = Path(__file__).parent / "fixtures" / "checkpoints"
NAMES = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "model.safetensors").is_file())


def test_every_format_has_a_fixture():
    assert NAMES == ["decoupled_kept", "decoupled_per_tensor", "power_of_two", "split"]


@pytest.mark.parametrize("name", NAMES)
def test_saved_checkpoint_loads_bit_identical(name):
    folder = CHECKPOINTS / name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stored = load_file(folder / "model.safetensors")
    state = model.state_dict()
    for key, tensor in stored.items():
        assert torch.equal(state[key].to(tensor.dtype), tensor), key
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
    if name == "decoupled_kept":  # saved with the fields' old names (outlier_fraction, outlier_scope)
        config = model.config.quantization_config
        assert (config.kept_fraction, config.kept_scope) == (0.02, "layer")
