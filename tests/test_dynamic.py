"""Per-module settings (``HfQuantConfig(dynamic=...)``, GPTQModel's convention): rules on the full
module name give a layer its own bits and group size or keep it in full precision, and a saved
checkpoint reloads every layer at its own settings."""

import pytest
import torch
from helpers import TINY_CALIBRATION, input_ids, moe_model
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.export import bits_per_weight, save_quantized
from hfquant.formats import QuantizedLinear

# Block 0's query projection stays float; every down projection (block 1's too: the first match
# wins) is W4 g32; the rest of block 1 is W3; everything else takes the base W2 g64.
DYNAMIC = {
    "-:model[.]layers[.]0[.]self_attn[.]q_proj": {},
    r".*\.down_proj": {"bits": 4, "group_size": 32},
    "+:model[.]layers[.]1[.]": {"bits": 3},
}


def expected(name: str) -> tuple[int, int] | None:
    if name == "model.layers.0.self_attn.q_proj":
        return None
    if name.endswith(".down_proj"):
        return 4, 32
    return (3, 64) if name.startswith("model.layers.1.") else (2, 64)


def test_rules_give_each_module_its_settings():
    config = HfQuantConfig(bits=2, group_size=64, method="rtn", dynamic=DYNAMIC)
    names = [f"model.layers.{i}.{leaf}" for i in (0, 1, 10) for leaf in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")]
    for name in names:
        layer = config.module_config(name)
        assert (None if layer is None else (layer.bits, layer.group_size)) == expected(name), name
        assert config.keeps_full_precision(name) == (layer is None)
    assert config.module_config("model.layers.0.mlp.up_proj") is config  # no rule: the config itself
    assert config.module_config("x.model.layers.0.self_attn.q_proj") is config  # matched from the start
    assert (config.bits, config.group_size) == (2, 64)  # a rule's copy leaves the config alone
    assert HfQuantConfig(method="rtn").module_config("model.layers.0.mlp.down_proj").bits == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(dynamic="down_proj"), "dynamic must be a dict"),
        (dict(dynamic={"(": {"bits": 4}}), r"'\(' is not a regular expression"),
        (dict(dynamic={".*": 4}), r"dynamic\['.\*'\] must be a dict of settings"),
        (dict(dynamic={".*": {"bits": 5}}), r"dynamic\['.\*'\]\['bits'\] must be one of \[2, 3, 4\]"),
        (dict(dynamic={".*": {"group_size": 48}}), r"\['group_size'\] must be one of"),
        (dict(dynamic={".*": {"sym": True}}), r"sets \['sym'\]: a rule may set \['bits', 'group_size'\]"),
        (dict(dynamic={"-:.*": {"bits": 4}}), "takes no settings"),
        (dict(dynamic={1: {}}), "a pattern must be a string"),
        (dict(dynamic=[["a", {}, 1]]), r"must hold \[pattern, settings\] pairs"),
        (dict(dynamic={".*": {"bits": 4}}, gguf_type="q4_k", method="decoupleq"), "dynamic applies to method"),
        (dict(dynamic={".*": {"bits": 4}}, method="inq"), "dynamic applies to method"),
        (dict(dynamic={".*": {"bits": 4}}, split_clusters=3), "dynamic applies to method"),
    ],
)
def test_bad_rules_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        HfQuantConfig(**{"method": "rtn", **settings})


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_layer_is_stored_at_its_settings_and_reloads_so(tiny_model_dir, tmp_path, method):
    calibration = TINY_CALIBRATION if method != "rtn" else {}
    config = HfQuantConfig(bits=2, group_size=64, method=method, dynamic=DYNAMIC, e2e_epochs=0, **calibration)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config).eval()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear
    assert torch.equal(q_proj.weight, float_model.model.layers[0].self_attn.q_proj.weight)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 7 * model.config.num_hidden_layers - 1
    assert {n: (m.bits, m.group_size) for n, m in layers.items()} == {n: expected(n) for n in layers}
    with torch.no_grad():
        before = model(input_ids()).logits
    out = save_quantized(model, tmp_path / "q")
    assert "`.*\\.down_proj`: 4 bits, group size 32" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert list(reloaded.config.quantization_config.dynamic.items()) == list(DYNAMIC.items())  # order kept
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    again = {n: (m.bits, m.group_size) for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert again == {n: expected(n) for n in layers}
    with torch.no_grad():
        assert torch.equal(before, reloaded(input_ids()).logits)
    assert bits_per_weight(reloaded) == pytest.approx(bits_per_weight(model))


def test_widths_that_disagree_with_config_json_are_refused(tiny_llama_dir, tmp_path):
    """A checkpoint whose ``dynamic`` in config.json no longer says how a layer was stored is refused
    before any tensor is read, naming the layer."""
    import json

    config = HfQuantConfig(bits=2, group_size=64, method="rtn", dynamic={r".*\.down_proj": {"bits": 4}})
    out = save_quantized(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config), tmp_path / "q")
    saved = json.loads((out / "config.json").read_text())
    saved["quantization_config"]["dynamic"] = {}
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(Exception, match="down_proj"):
        AutoModelForCausalLM.from_pretrained(out)


def test_gpt2_conv1d_layers_follow_the_rules(tmp_path):
    """Not Llama-only: GPT-2's Conv1D layers (``transformer.h.N.attn.c_attn``) take the rules too."""
    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128)).save_pretrained(path)
    rules = {"-:transformer[.]h[.]0[.]attn[.]c_attn": {}, r".*\.mlp\.c_proj": {"bits": 4, "group_size": 32}}
    config = HfQuantConfig(bits=2, group_size=64, method="rtn", dynamic=rules)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert not isinstance(model.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert isinstance(model.transformer.h[1].attn.c_attn, DecoupledLinear)
    assert (model.transformer.h[0].mlp.c_proj.bits, model.transformer.h[0].mlp.c_proj.group_size) == (4, 32)
    assert model.transformer.h[0].mlp.c_fc.bits == 2
    with torch.no_grad():
        before = model(input_ids()).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    with torch.no_grad():
        assert torch.equal(before, reloaded(input_ids()).logits)


def test_split_moe_experts_are_matched_under_their_split_names(tmp_path):
    """An MoE's fused experts are split into one linear per expert before the rules apply: a rule on
    ``experts.down.E`` reaches one expert's down projection, at quantization and at reload."""
    moe_model("mixtral").save_pretrained(tmp_path / "fp")
    rules = {r"-:.*\.experts\.down\.0$": {}, r".*\.experts\.down\.": {"bits": 4, "group_size": 32}}
    config = HfQuantConfig(bits=2, group_size=32, method="rtn", dynamic=rules)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    downs = model.model.layers[1].mlp.experts.down
    assert not isinstance(downs[0], QuantizedLinear)
    assert [(m.bits, m.group_size) for m in list(downs)[1:]] == [(4, 32)] * (len(downs) - 1)
    assert model.model.layers[1].mlp.experts.gate_up[0].bits == 2
    with torch.no_grad():
        before = model(input_ids()).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_quantized(model, tmp_path / "q")).eval()
    assert [getattr(m, "bits", None) for m in reloaded.model.layers[1].mlp.experts.down] == [None] + [4] * (len(downs) - 1)
    with torch.no_grad():
        assert torch.equal(before, reloaded(input_ids()).logits)


def test_the_model_card_states_each_rule_in_order():
    from hfquant.export.model_card import _dynamic_text

    rules = {"-:.*(q|k)_proj": {}, "+:.*down_proj": {"group_size": -1}, ".*up_proj": {}, ".*": {"bits": 3}}
    text = _dynamic_text(HfQuantConfig(method="rtn", dynamic=rules))
    assert text == (
        r"`.*(q\|k)_proj`: full precision; `.*down_proj`: group size one group per row; "
        "`.*up_proj`: the base settings; `.*`: 3 bits (first match wins)"
    )
    assert _dynamic_text(HfQuantConfig(method="rtn")) == "none"
