"""Every way hfquant refuses a checkpoint before reading its tensors: truncated or corrupt files,
pickles, missing or misshapen tensors of each format, mismatched settings, newer format versions,
broken shards and indexes; and the checks made once the values are loaded."""

import json
import shutil

import pytest
import torch
from helpers import TINY_TEXTS, ByteTokenizer, rewrite_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.export import CheckpointError, save_quantized


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=HfQuantConfig(bits=2, group_size=32, method="rtn")
    )
    return save_quantized(model, tmp_path / "q")


def test_truncated_file_refused(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors is truncated: expected \d+ bytes, found \d+"
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_corrupt_header_refused(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_scales_refused(saved):
    rewrite_checkpoint(saved, lambda t, m: t.pop("model.layers.1.self_attn.v_proj.scales"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.self_attn.v_proj.scales"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_wrong_shape_refused(saved):
    def edit(tensors, _):
        tensors["model.layers.0.mlp.up_proj.zeros"] = tensors["model.layers.0.mlp.up_proj.zeros"][
            :, :1
        ].clone()

    rewrite_checkpoint(saved, edit)
    with pytest.raises(
        CheckpointError, match=r"tensor model.layers.0.mlp.up_proj.zeros has shape \[160, 1\], expected"
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_wrong_bit_width_refused(saved):
    # config.json says 3 bits, the packed integers were written for 2.
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with bits=2 but config.json says bits=3"):
        AutoModelForCausalLM.from_pretrained(saved)
    # Without the metadata guard the shapes still give it away, naming the tensor.
    rewrite_checkpoint(saved, lambda t, m: m.pop("hfquant_bits"))
    with pytest.raises(CheckpointError, match=r"qweight has shape .* expected .* for bits=3"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_newer_format_refused(saved):
    # A writer that did not record its version: the message still says how to upgrade.
    rewrite_checkpoint(saved, lambda t, m: (m.update(hfquant_format_version="7"), m.pop("hfquant_version")))
    with pytest.raises(CheckpointError, match="format version 7 is newer.*pip install -U hfquant"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_pickle_weights_refused(saved, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(saved, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)


@pytest.fixture()
def saved_split(tiny_llama_dir, tmp_path):
    config = HfQuantConfig(bits=2, group_size=32, method="rtn", split_clusters=3)
    return save_quantized(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config), tmp_path / "q")


def test_wrong_shaped_cluster_tensor_refused(saved_split):
    key = "model.layers.0.mlp.down_proj.cluster"
    rewrite_checkpoint(saved_split, lambda t, m: t.update({key: t[key][:, :1].clone()}))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[64, 1\], expected \[64, 10\].*split_clusters=3"):
        AutoModelForCausalLM.from_pretrained(saved_split)


def test_missing_cluster_tensor_and_bad_index_refused(saved_split):
    key = "model.layers.1.self_attn.q_proj.cluster"
    rewrite_checkpoint(saved_split, lambda t, m: t.update({key: torch.full_like(t[key], -1)}))  # every index is 3
    with pytest.raises(CheckpointError, match=rf"tensor {key} holds cluster index 3, but the layer has 3 clusters"):
        AutoModelForCausalLM.from_pretrained(saved_split)
    rewrite_checkpoint(saved_split, lambda t, m: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        AutoModelForCausalLM.from_pretrained(saved_split)


def test_split_clusters_mismatch_refused(saved_split):
    import json

    config = json.loads((saved_split / "config.json").read_text())
    config["quantization_config"]["split_clusters"] = 4
    (saved_split / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with split_clusters=3 but config.json says split_clusters=4"):
        AutoModelForCausalLM.from_pretrained(saved_split)


@pytest.fixture()
def saved_inq(tiny_llama_dir, tmp_path):
    config = HfQuantConfig(
        bits=3, method="inq", dataset=TINY_TEXTS, nsamples=2, seqlen=32, blockwise_epochs=0, tokenizer=ByteTokenizer()
    )
    return save_quantized(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config), tmp_path / "q")


def test_inq_exponent_of_wrong_dtype_or_missing_refused(saved_inq):
    key = "model.layers.0.self_attn.o_proj.exponent"
    rewrite_checkpoint(saved_inq, lambda t, m: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has dtype F32, expected one of \['I8'\]"):
        AutoModelForCausalLM.from_pretrained(saved_inq)
    rewrite_checkpoint(saved_inq, lambda t, m: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        AutoModelForCausalLM.from_pretrained(saved_inq)


def test_tensors_of_another_format_refused(saved_split):
    key = "model.layers.0.mlp.up_proj"
    rewrite_checkpoint(saved_split, lambda t, m: t.update({f"{key}.outlier_values": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"layer {key} has tensors \['outlier_values'\], which the SplitLinear"):
        AutoModelForCausalLM.from_pretrained(saved_split)


def test_kept_weight_index_outside_the_matrix_refused(tiny_llama_dir, tmp_path):
    config = HfQuantConfig(bits=2, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude")
    saved = save_quantized(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config), tmp_path / "q")
    key = "model.layers.0.mlp.down_proj.outlier_cols"
    rewrite_checkpoint(saved, lambda t, m: t.update({key: t[key] + 10_000}))
    with pytest.raises(CheckpointError, match="outlier_rows/outlier_cols index outside the layer's weight matrix"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_shard_refused(sharded):
    _, out = sharded
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is missing"):
        AutoModelForCausalLM.from_pretrained(out)


def test_truncated_shard_refused(sharded):
    _, out = sharded
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=f"{victim.name} is truncated"):
        AutoModelForCausalLM.from_pretrained(out)


def test_index_pointing_to_the_wrong_shard_refused(sharded):
    _, out = sharded
    path = out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key, real = next((k, v) for k, v in index["weight_map"].items() if k.endswith(".scales"))
    wrong = next(s for s in shards if s != real)
    index["weight_map"][key] = wrong
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps tensor {key} to {wrong}, but it is in {real}"):
        AutoModelForCausalLM.from_pretrained(out)


def test_newer_format_names_the_version_to_install(sharded):
    _, out = sharded
    from safetensors.torch import load_file

    for shard in out.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        metadata.update(hfquant_format_version="2", hfquant_version="0.9.0")
        save_file(load_file(shard), shard, metadata=metadata)
    with pytest.raises(CheckpointError, match=r'written by hfquant 0\.9\.0: upgrade with `pip install "hfquant>=0\.9\.0"`'):
        AutoModelForCausalLM.from_pretrained(out)
