import pytest
from transformers import AutoConfig
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hfquant
from hfquant import HfQuantConfig


def test_registered_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hfquant"] is HfQuantConfig
    assert AUTO_QUANTIZER_MAPPING["hfquant"] is hfquant.HfQuantQuantizer


def test_defaults_and_round_trip():
    config = HfQuantConfig(bits=3, group_size=128, method="gptq", nsamples=16, kept_fraction=0.005)
    data = config.to_dict()
    assert data["quant_method"] == "hfquant"
    assert data["modules_to_not_convert"] == ["lm_head"]
    again = HfQuantConfig.from_dict(data)
    assert again.to_dict() == data


def test_dataset_objects_recorded_by_description():
    config = HfQuantConfig(dataset=["some text", "more text"])
    assert config.to_dict()["dataset"] == "custom (2 texts)"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", 5, r"bits must be one of \[2, 3, 4\], got 5"),
        ("bits", True, "bits must be one of"),
        ("group_size", 48, r"group_size must be one of \[32, 64, 128, -1, 0\], got 48"),
        ("method", "awq", r"method must be one of \['rtn', 'gptq', 'decoupleq', 'inq'\], got 'awq'"),
        ("split_clusters", -1, "split_clusters must be an integer >= 0"),
        ("split_clusters", 9, "split_clusters must be at most 8"),
        ("nsamples", 0, "nsamples must be an integer >= 1"),
        ("seqlen", 1, "seqlen must be an integer >= 2"),
        ("kept_fraction", 1.5, r"kept_fraction must be a number in \[0, 1\)"),
        ("damp", 0.0, "damp must be a number in"),
        ("hessian_shrink", 1.0, r"hessian_shrink must be a number in \[0, 1\), got 1.0"),
        ("hessian_shrink", "0.3", "hessian_shrink must be a number in"),
        ("modules_to_not_convert", "lm_head", "modules_to_not_convert must be a list"),
        ("blockwise_lr", -1.0, "blockwise_lr must be a positive number"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        HfQuantConfig(**{field: value})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "inq", "split_clusters": 3}, "split_clusters applies to method rtn, gptq or decoupleq"),
        ({"method": "inq", "bits": 8}, r"bits must be one of \[2, 3, 4\], got 8"),
        ({"split_clusters": 3, "kept_fraction": 0.01}, "kept_fraction .* not supported .* split_clusters"),
        ({"method": "inq", "kept_fraction": 0.01}, "kept_fraction .* not supported with method='inq'"),
    ],
)
def test_invalid_combinations_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        HfQuantConfig(**fields)


def test_split_and_inq_round_trip():
    config = HfQuantConfig(bits=3, method="rtn", split_clusters=3, group_size=0)
    again = HfQuantConfig.from_dict(config.to_dict())
    assert (again.split_clusters, again.group_size) == (3, 0)
    assert HfQuantConfig(method="inq").needs_calibration


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="unknown fields"):
        HfQuantConfig(bitz=2)


def test_newer_format_version_refused():
    with pytest.raises(ValueError, match="format version 99.*pip install -U hfquant"):
        HfQuantConfig(format_version=99)


def test_autoconfig_carries_config(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(bits=4, group_size=32, method="rtn")
    )
    model.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).quantization_config
    assert loaded["quant_method"] == "hfquant" and loaded["bits"] == 4 and loaded["group_size"] == 32


def test_renamed_fields_name_their_new_names():
    with pytest.raises(ValueError, match="HfQuantConfig fields renamed: outlier_fraction is now kept_fraction"):
        HfQuantConfig(outlier_fraction=0.01)
    loaded = HfQuantConfig.from_dict({"bits": 3, "outlier_fraction": 0.01, "outlier_scope": "layer"})
    assert (loaded.kept_fraction, loaded.kept_scope, loaded.bits) == (0.01, "layer", 3)


@pytest.mark.parametrize("listed", [[], ["down_proj"]])
def test_a_list_without_the_output_embeddings_is_refused_before_loading(tiny_llama_dir, listed):
    """A list replaces transformers' default skips; hfquant does not quantize lm_head, so it says so."""
    from transformers import AutoModelForCausalLM

    config = HfQuantConfig(bits=4, group_size=32, method="rtn", modules_to_not_convert=listed)
    with pytest.raises(ValueError, match=r"leaves out the output embeddings 'lm_head'.*add 'lm_head'"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
