"""Sharing a quantized model: model card, Hub upload (faked at the network boundary), sharding,
integrity checks of sharded checkpoints, loading with device_map and in other dtypes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_TEXTS
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

import hfquant.export.hub as hub
from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.cli import main
from hfquant.export import QualityFigures, bits_per_weight, folder_size, save_quantized


def _ids(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """The tiny chat model, with a base-model card that names its Hub id and license."""
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_chat_model_dir, folder)
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage: en\nmodel_name: org/tiny-base\n---\n\nbase\n")
    return folder


@pytest.fixture(scope="module")
def quantized(base_dir):
    config = HfQuantConfig(bits=2, group_size=32, method="rtn")
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config).eval()


def test_card_fields(quantized, tmp_path, base_dir):
    from transformers import AutoTokenizer

    quantized.hfquant_quality = QualityFigures("held-out text", 20.0, 31.0, tokens=4096)
    try:
        out = save_quantized(quantized, tmp_path / "q", AutoTokenizer.from_pretrained(base_dir))
    finally:
        del quantized.hfquant_quality
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-base"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "mit" and data["language"] == ["en"]
    assert {"hfquant", "2-bit", "rtn"} <= set(data["tags"])
    text = card.text
    assert f"| bits per weight (quantized layers, all storage counted) | {bits_per_weight(quantized):.3f} |" in text
    assert f"{folder_size(out) / 1e6:.1f} MB" in text
    assert "| group size | 32 |" in text and "round to nearest" in text
    assert "| full precision | 20.00 | 1.00 |" in text and "| this model | 31.00 | 1.55 |" in text
    assert "on held-out text (4,096 tokens):" in text
    for snippet in ("pip install hfquant", "import hfquant", f'from_pretrained("{out}")', f"hfquant chat {out}"):
        assert snippet in text


def test_calibrated_card_names_data_and_kept_weights(tiny_chat_model_dir, tmp_path):
    config = HfQuantConfig(
        bits=3, group_size=32, method="decoupleq", nsamples=2, seqlen=32, blockwise_epochs=1,
        kept_fraction=0.01, saliency="magnitude",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, quantization_config=config)
    model.save_pretrained(tmp_path / "q")  # plain save_pretrained writes the card too
    card = ModelCard.load(tmp_path / "q" / "README.md")
    assert {"hfquant", "3-bit", "decoupleq", "blockwise-minimization", "magnitude"} <= set(card.data.tags)
    assert "mix (equal shares of Book of Mormon, Jargon File and zstd C source windows), 2 windows x 32 tokens" in card.text
    assert "1.00% (magnitude, per layer)" in card.text
    assert "Not measured in the run" in card.text


def test_reloaded_model_card_keeps_base_model(quantized, tmp_path):
    first = save_quantized(quantized, tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(first)
    second = save_quantized(reloaded, tmp_path / "b")
    card = ModelCard.load(second / "README.md")
    assert card.data.base_model == "org/tiny-base" and card.data.license == "mit"


UPLOADED = {
    "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "README.md",
}


def test_model_push_to_hub_uploads_a_loadable_folder(quantized, fake_hub):
    url = quantized.push_to_hub("me/tiny-w2", private=True)
    assert url == "https://hub.invalid/me/tiny-w2/commit/1"
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][1]["private"] is True and fake_hub.calls[0][1]["exist_ok"] is True
    remote = fake_hub.remote / "me" / "tiny-w2"
    assert UPLOADED <= {p.name for p in remote.iterdir()}
    assert 'from_pretrained("me/tiny-w2")' in (remote / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(remote)
    ids = _ids(quantized.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)


def test_cli_push_to_hub(base_dir, tmp_path, fake_hub, capsys):
    code = main([
        "quantize", str(base_dir), "--bits", "2", "--group-size", "32", "--method", "rtn", "--eval-windows", "1",
        "--out", str(tmp_path / "q"), "--push-to-hub", "me/cli-w2", "--private",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "pushed" in out and "perplexity before" in out
    remote = fake_hub.remote / "me" / "cli-w2"
    assert UPLOADED <= {p.name for p in remote.iterdir()}
    card = (remote / "README.md").read_text()
    assert "| full precision |" in card and 'from_pretrained("me/cli-w2")' in card
    AutoModelForCausalLM.from_pretrained(remote)


def test_push_folder_refuses_a_non_model_folder(tmp_path, fake_hub):
    with pytest.raises(ValueError, match="not a saved model folder"):
        hub.push_folder(tmp_path, "me/x")
    assert fake_hub.calls == []


def test_sharded_save_reload_bit_identical(sharded):
    model, out = sharded
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata()["hfquant_bits"] == "2" and f.metadata()["hfquant_format_version"] == "1"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, reloaded(_ids()).logits)
    for name, module in model.named_modules():
        if isinstance(module, DecoupledLinear):
            again = reloaded.get_submodule(name)
            assert torch.equal(module.qweight, again.qweight)
            assert torch.equal(module.outlier_values, again.outlier_values)


def test_failure_mid_write_keeps_previous_folder(sharded, monkeypatch):
    model, out = sharded
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import transformers.modeling_utils as modeling_utils

    real_save = modeling_utils.safe_save_file
    written = []

    def fail_on_second_shard(tensors, filename, metadata=None):
        if written:
            Path(filename).write_bytes(b"\0" * 100)  # half a file, then the disk "fills up"
            raise OSError(28, "No space left on device")
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(model, out, max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    AutoModelForCausalLM.from_pretrained(out)


def test_loads_with_device_map_auto(tmp_path):
    """``device_map="auto"`` through accelerate: alone (all on the CPU here), and with a
    ``max_memory`` that leaves the later blocks on disk, offloaded and onloaded per forward."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=HfQuantConfig(bits=2, group_size=32, method="rtn")
    ).eval()
    out = save_quantized(model, tmp_path / "q", max_shard_size="300KB")
    with torch.no_grad():
        ref = model(_ids()).logits
        auto = AutoModelForCausalLM.from_pretrained(out, device_map="auto")
        assert torch.equal(ref, auto(_ids()).logits)
        split = AutoModelForCausalLM.from_pretrained(
            out, device_map="auto", max_memory={"cpu": "600KB"}, offload_folder=tmp_path / "offload"
        )
        assert {"cpu", "disk"} <= set(split.hf_device_map.values())
        assert isinstance(split.model.layers[5].self_attn.q_proj, DecoupledLinear)
        assert torch.equal(ref, split(_ids()).logits)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_loads_in_other_dtypes(sharded, dtype, tol):
    model, out = sharded
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    layer = reloaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, DecoupledLinear) and layer.scales.dtype == dtype
    assert reloaded.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        ref = model(_ids()).logits
        logits = reloaded(_ids()).logits
    assert logits.dtype == dtype
    assert float((logits.float() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize(
    "settings,tag,storage",
    [
        ({"method": "rtn", "split_clusters": 3, "group_size": 0}, "splitquant", "a packed cluster index per weight"),
        ({"method": "inq", "blockwise_epochs": 1}, "inq", "signed power of two"),
    ],
)
def test_card_for_other_methods(tiny_chat_model_dir, tmp_path, settings, tag, storage):
    config = HfQuantConfig(bits=3, dataset=TINY_TEXTS, nsamples=2, seqlen=32, blockwise_batch_size=2, **settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, quantization_config=config)
    card = ModelCard.load(save_quantized(model, tmp_path / "q") / "README.md")
    assert tag in card.data.tags and storage in card.text
    assert f"| bits per weight (quantized layers, all storage counted) | {bits_per_weight(model):.3f} |" in card.text


def test_interrupted_save_keeps_previous_folder(sharded, monkeypatch):
    model, saved = sharded
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []
