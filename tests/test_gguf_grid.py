"""Solving on a GGUF type's grid: ``HfQuantConfig(gguf_type=...)``, the projection onto what each type
stores, and the lossless export of the result (gguf's own dequantize == hfquant's weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_TEXTS
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    Qwen2MoeConfig,
)

from hfquant import HfQuantConfig
from hfquant.algorithms.decoupleq import decoupleq_quantize
from hfquant.algorithms.gguf_grid import project
from hfquant.formats import GGUFLinear, format_for
from hfquant.formats.gguf import GGUF_GRIDS, grid_for

gguf = pytest.importorskip("gguf")

from hfquant.export.gguf import quantize_k, quantize_tensor, save_gguf  # noqa: E402
from hfquant.export.llamacpp import llamacpp_source  # noqa: E402

TYPES = tuple(GGUF_GRIDS)
needs_converter = pytest.mark.skipif(
    not (llamacpp_source() / "conversion").is_dir(),
    reason=f"llama.cpp's converter is absent ({llamacpp_source()}): run `make llamacpp` or set HFQUANT_LLAMACPP_SRC",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_config_names_the_field_and_the_allowed_types():
    with pytest.raises(ValueError, match=r"gguf_type must be one of \[None, 'q4_0', .*'q6_k', 'q2_k_m', 'q3_k_s', .*'q5_k_m'\]"):
        HfQuantConfig(gguf_type="q7_k")
    with pytest.raises(ValueError, match="gguf_type='q2_k' is solved by method='decoupleq'"):
        HfQuantConfig(gguf_type="q2_k", method="gptq")
    with pytest.raises(ValueError, match="kept_fraction=0"):
        HfQuantConfig(gguf_type="q4_0", kept_fraction=0.01)
    config = HfQuantConfig(gguf_type="q3_k")
    assert format_for(config) is GGUFLinear
    assert HfQuantConfig.from_dict(config.to_dict()).gguf_type == "q3_k"


def test_rows_a_k_quant_cannot_hold_take_llama_cpp_fallback():
    assert grid_for("q2_k", 512).name == "q2_k" and grid_for("q2_k", 576).name == "q4_0"
    assert grid_for("q3_k", 576).name == "q4_0" and grid_for("q4_k", 576).name == "q5_0"
    assert grid_for("q5_k", 576).name == "q5_1" and grid_for("q6_k", 576).name == "q8_0"
    assert grid_for("q4_1", 576).name == "q4_1"
    with pytest.raises(ValueError, match="100 input columns fits no GGUF block type"):
        grid_for("q4_0", 100)


@pytest.mark.parametrize("name", sorted(GGUF_GRIDS))
def test_projection_is_on_the_type_and_idempotent(name):
    spec = GGUF_GRIDS[name]
    gen = torch.Generator().manual_seed(0)
    groups = 512 // spec.group_size
    scales = torch.rand(8, groups, generator=gen) * 0.01 + 1e-4
    if spec.offset is None:
        zeros = -scales * (2**spec.bits - 1) * torch.rand(8, groups, generator=gen)
    else:  # a nearly tied grid, as block-wise minimization hands over
        zeros = -spec.offset * scales * (1 + 0.01 * torch.randn(8, groups, generator=gen))
    codes = project(spec, scales, zeros)
    for t, bounds in ((codes.sc, spec.scale_codes), (codes.mn, spec.min_codes)):
        assert (t is None) == (bounds is None)
        if t is not None:
            assert t.dtype == torch.int8 and bounds[0] <= int(t.min()) and int(t.max()) <= bounds[1]
    assert codes.d.dtype == torch.float16 and codes.d.shape == (8, 512 // spec.block_size)
    if spec.offset is not None:
        assert torch.equal(codes.zeros, -spec.offset * codes.scales)
    again = project(spec, codes.scales, codes.zeros)
    assert torch.equal(again.scales, codes.scales) and torch.equal(again.zeros, codes.zeros)
    # The projection is close: within a few per cent of the scale on average.
    assert float(((codes.scales - scales).abs() / scales).mean()) < 0.1


def correlated_problem(rows: int = 32, cols: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    x = torch.randn(1024, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols**0.5)
    return w, x.T @ x / x.shape[0]


def reference_weight(w: torch.Tensor, name: str) -> torch.Tensor:
    """llama.cpp's (reference) quantization of ``w``: gguf's quantizer, hfquant's K-quant one."""
    if name.endswith("_k"):
        return torch.from_numpy(quantize_k(w.numpy(), name).dequantize())
    qtype = gguf.GGMLQuantizationType[name.upper()]
    out = gguf.quants.dequantize(quantize_tensor(w.numpy(), name), qtype)
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(w.shape))


@pytest.mark.parametrize("name", TYPES)
def test_decoupleq_on_the_type_grid_beats_the_reference_quantizer(name):
    """On a correlated Hessian the solved weights have a lower layer objective than llama.cpp-style
    rounding, and they are exactly what their codes store."""
    spec = GGUF_GRIDS[name]
    w, h = correlated_problem()
    history: list[float] = []
    result = decoupleq_quantize(w, h, 2, 64, iters=2, grid_spec=spec, history=history)
    assert history == sorted(history, reverse=True)
    codes = result.codes
    assert torch.equal(codes.scales, result.scales) and torch.equal(codes.zeros, result.zeros)
    assert int(result.qweight.max()) <= 2**spec.bits - 1

    def objective(w_hat):
        err = (w - w_hat).double()
        return float(torch.einsum("oi,ij,oj->", err, h.double(), err))

    assert objective(result.dequantize(spec.group_size)) < objective(reference_weight(w, name))


@pytest.fixture(scope="module")
def tokenizer():
    from hfquant.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def tiny_llama(tokenizer, hidden: int = 256, intermediate: int = 512):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def quantized_tiny(tokenizer, folder, gguf_type: str, e2e_epochs: int = 0, model=None, **sizes):
    """``model`` (a tiny Llama of ``sizes`` by default), saved in ``folder`` and quantized at load on ``gguf_type``."""
    base = folder / "base"
    if not base.exists():
        (model or tiny_llama(tokenizer, **sizes)).save_pretrained(base)
    config = HfQuantConfig(
        gguf_type=gguf_type, dataset=TINY_TEXTS, nsamples=4, seqlen=32, decoupleq_iters=1, blockwise_epochs=1,
        blockwise_batch_size=2, tokenizer=tokenizer, e2e_epochs=e2e_epochs, e2e_lr=1e-2,
    )
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32)


def gguf_weights(path) -> dict[str, np.ndarray]:
    """gguf's own dequantization of every tensor of a file, as ``[rows, cols]``."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(w, dtype=np.float32).reshape(-1, int(t.shape[0]))
    return out


def hfquant_weights(model) -> dict[str, np.ndarray]:
    """Each GGUFLinear's dequantized weight under its GGUF name, q/k rows in llama.cpp's order."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            w = module.dequantize().detach().numpy()
            if name.endswith("q_proj"):
                w = permute(w, config.num_attention_heads)
            elif name.endswith("k_proj"):
                w = permute(w, config.num_key_value_heads)
            out[names.get_name(name + ".weight", try_suffixes=(".weight",))] = w
    return out


@needs_converter
@pytest.mark.parametrize("gguf_type", TYPES)
def test_solved_model_exports_losslessly(tokenizer, tmp_path, gguf_type):
    """Every layer solved on the type's grid is written as is: gguf's dequantize of each exported
    tensor equals hfquant's dequantized weight exactly (float32 products of float16 factors and
    small integers are exact)."""
    model = quantized_tiny(tokenizer, tmp_path, gguf_type)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 7 and all(m.grid.name == gguf_type for m in layers)
    summary = save_gguf(model, tokenizer, tmp_path / "solved.gguf")
    assert summary.type == gguf_type
    read = gguf_weights(tmp_path / "solved.gguf")
    expected = hfquant_weights(model)
    hows = {t.name: t.how for t in summary.tensors}
    for name, w in expected.items():
        assert hows[name] == "lossless", name
        np.testing.assert_array_equal(read[name], w, err_msg=name)


@needs_converter
@pytest.mark.parametrize("gguf_type", ["q2_k", "q4_1"])
def test_end_to_end_tuning_keeps_the_type_and_the_lossless_export(tokenizer, tmp_path, gguf_type):
    """e2e tuning on a GGUF type: the integers stay, the kept grid is one the type stores (codes in
    range, scales and zeros rebuilt from them), validation KL never rises, and the export is still
    exactly hfquant's weight."""
    plain = quantized_tiny(tokenizer, tmp_path, gguf_type)
    tuned = quantized_tiny(tokenizer, tmp_path, gguf_type, e2e_epochs=2)
    kl = tuned.hf_quantizer.report.e2e_validation_kl
    assert len(kl) == 3 and min(kl) <= kl[0]
    moved = False
    for name, module in tuned.named_modules():
        if isinstance(module, GGUFLinear):
            before = plain.get_submodule(name)
            assert torch.equal(module.qweight, before.qweight)
            moved |= not torch.equal(module.d, before.d)
            scales, zeros = module.scales.clone(), module.zeros.clone()
            module.check_loaded(name)  # codes within the type's ranges; grid rebuilt from them
            assert torch.equal(module.scales, scales) and torch.equal(module.zeros, zeros)
    assert moved == (min(kl) < kl[0])  # the factors move exactly when an epoch was kept
    save_gguf(tuned, tokenizer, tmp_path / "tuned.gguf")
    read = gguf_weights(tmp_path / "tuned.gguf")
    for name, w in hfquant_weights(tuned).items():
        np.testing.assert_array_equal(read[name], w, err_msg=name)


@needs_converter
def test_576_wide_rows_are_solved_on_the_fallback_type(tokenizer, tmp_path):
    model = quantized_tiny(tokenizer, tmp_path, "q2_k", hidden=576, intermediate=512)
    grids = {name.rsplit(".", 1)[-1]: m.grid.name for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert grids["down_proj"] == "q2_k" and grids["q_proj"] == "q4_0" and grids["gate_proj"] == "q4_0"
    summary = save_gguf(model, tokenizer, tmp_path / "fallback.gguf")
    written = {t.name: t for t in summary.tensors}
    assert written["blk.0.attn_q.weight"].written == "q4_0" and "fallback" in written["blk.0.attn_q.weight"].how
    assert written["blk.0.attn_q.weight"].how.startswith("lossless")  # solved on the fallback: still exact
    assert written["blk.0.ffn_down.weight"].how == "lossless"
    read = gguf_weights(tmp_path / "fallback.gguf")
    for name, w in hfquant_weights(model).items():
        np.testing.assert_array_equal(read[name], w, err_msg=name)


def test_saved_model_reloads_the_same_weights(tokenizer, tmp_path):
    """The codes are what is saved; the grid the forward reads is rebuilt from them on load."""
    model = quantized_tiny(tokenizer, tmp_path, "q4_k", hidden=256, intermediate=512)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    before = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    after = {n: m for n, m in again.named_modules() if isinstance(m, GGUFLinear)}
    assert before.keys() == after.keys()
    for name, module in before.items():
        assert torch.equal(module.dequantize(), after[name].dequantize()), name
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Sharing: the GGUF file beside the safetensors (save_quantized / push_to_hub / the CLI)
# ------------------------------------------------------------------------------------------------


@needs_converter
def test_push_to_hub_uploads_the_gguf_beside_the_safetensors(tokenizer, tmp_path, fake_hub):
    from huggingface_hub import ModelCard

    from hfquant.export.llamacpp import llamacpp_perplexity, llamacpp_tool

    model = quantized_tiny(tokenizer, tmp_path, "q4_1")
    model.push_to_hub("me/tiny-q4_1", tokenizer=tokenizer, gguf_type="q4_1")
    remote = fake_hub.remote / "me" / "tiny-q4_1"
    path = remote / "tiny-q4_1-Q4_1.gguf"
    assert path.is_file() and (remote / "model.safetensors").is_file()
    read, expected = gguf_weights(path), hfquant_weights(model)
    for name, w in expected.items():  # what was solved is what llama.cpp gets
        np.testing.assert_array_equal(read[name], w, err_msg=name)
    card = ModelCard.load(remote / "README.md").text
    assert "## GGUF for llama.cpp" in card and "| `tiny-q4_1-Q4_1.gguf` | Q4_1 |" in card
    assert "7 tensors written exactly as hfquant solved them" in card
    assert "llama-cli -hf me/tiny-q4_1:Q4_1" in card
    if llamacpp_tool("llama-perplexity").is_file():  # built by `make test`: the card has llama.cpp's figure
        from hfquant.corpora import heldout_texts

        measured = llamacpp_perplexity(path, "\n\n".join(heldout_texts()), chunks=8)
        assert f"| {measured:.2f} (`llama-perplexity`, 8 chunks of 512 tokens of held-out Book of Mormon" in card
    else:
        assert "not measured (" in card and "is not built" in card
    AutoModelForCausalLM.from_pretrained(remote)  # the .gguf beside does not disturb transformers


@needs_converter
def test_cli_quantize_solves_on_the_type_and_writes_the_gguf(tokenizer, tmp_path, capsys):
    from hfquant.cli import main

    base = tmp_path / "base"
    tiny_llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(TINY_TEXTS * 4), encoding="utf-8")
    out = tmp_path / "q"
    code = main([
        "quantize", str(base), "--gguf-type", "q4_0", "--dataset", str(text), "--nsamples", "2", "--seqlen", "32",
        "--blockwise-epochs", "1", "--decoupleq-iters", "1", "--eval-windows", "0", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "GGUF Q4_0" in printed and f"GGUF for llama.cpp: {out / 'q-Q4_0.gguf'}" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in reloaded.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 7 and all(m.grid.name == "q4_0" for m in layers)
    read = gguf_weights(out / "q-Q4_0.gguf")
    for name, w in hfquant_weights(reloaded).items():
        np.testing.assert_array_equal(read[name], w, err_msg=name)


def test_gguf_beside_needs_a_tokenizer_and_a_known_type(tokenizer, tmp_path):
    from hfquant.export import GGUFExportError, save_quantized

    model = AutoModelForCausalLM.from_pretrained(
        _saved_tiny(tokenizer, tmp_path), quantization_config=HfQuantConfig(bits=4, group_size=32, method="rtn")
    )
    with pytest.raises(ValueError, match="gguf_type='q4_1' needs the tokenizer"):
        save_quantized(model, tmp_path / "a", gguf_type="q4_1")
    with pytest.raises(GGUFExportError, match=r"unsupported GGUF type \(gguf_type\) 'q9'"):
        save_quantized(model, tmp_path / "b", tokenizer, gguf_type="q9")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temporary folder left either


def _saved_tiny(tokenizer, folder):
    base = folder / "base"
    tiny_llama(tokenizer).save_pretrained(base)
    return base


# ------------------------------------------------------------------------------------------------
# llama-quantize's per-tensor mixes (q3_k_m, q4_k_m, q5_k_m)
# ------------------------------------------------------------------------------------------------


def test_presets_choose_types_as_llama_quantize_does():
    """The rules of llama.cpp's llama_tensor_get_type_impl for a dense 30-block model (the default
    model's depth), by Hugging Face and by GGUF name."""
    from hfquant.formats.gguf_presets import MixShape, layer_type

    def hf(block: int, leaf: str) -> str:
        return f"model.layers.{block}.{'mlp' if leaf.endswith('proj') and leaf[0] in 'gud' else 'self_attn'}.{leaf}"

    more_bits = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    assert more_bits == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert layer_type("q4_k_m", hf(i, "v_proj"), MixShape(30)) == ("q6_k" if i in more_bits else "q4_k")
        assert layer_type("q4_k_m", f"blk.{i}.ffn_down.weight", MixShape(30)) == ("q6_k" if i in more_bits else "q4_k")
        assert layer_type("q5_k_m", hf(i, "down_proj"), MixShape(30)) == ("q6_k" if i in more_bits else "q5_k")
        assert layer_type("q3_k_m", hf(i, "v_proj"), MixShape(30)) == ("q5_k" if i < 2 else "q4_k")
        assert layer_type("q3_k_m", hf(i, "down_proj"), MixShape(30)) == ("q5_k" if i < 1 else "q4_k")  # 30 // 16 = 1
        assert layer_type("q3_k_m", hf(i, "o_proj"), MixShape(30)) == "q4_k"
        assert layer_type("q4_k_m", hf(i, "o_proj"), MixShape(30)) == "q4_k"
        for leaf in ("q_proj", "k_proj", "gate_proj", "up_proj"):
            assert layer_type("q3_k_m", hf(i, leaf), MixShape(30)) == "q3_k"
            assert layer_type("q4_k_m", hf(i, leaf), MixShape(30)) == "q4_k"
    # fused qkv and MLA's kv_b count as value projections (llama.cpp's category_is_attn_v)
    assert layer_type("q4_k_m", "transformer.h.3.attn.c_attn", MixShape(30)) == "q4_k"  # GPT-2 names; 3 has no more bits
    assert layer_type("q4_k_m", "model.layers.2.self_attn.qkv_proj", MixShape(30)) == "q6_k"
    assert layer_type("q3_k_m", "blk.2.attn_kv_b.weight", MixShape(30)) == "q4_k"
    # MoE experts' down projections are ffn_down, split (hfquant's names) or stacked (llama.cpp's)
    assert layer_type("q4_k_m", "model.layers.2.mlp.experts.down.7", MixShape(30)) == "q6_k"
    assert layer_type("q4_k_m", "blk.2.ffn_down_exps.weight", MixShape(30)) == "q6_k"
    assert layer_type("q4_k_m", "blk.2.ffn_down_shexp.weight", MixShape(30)) == "q6_k"
    assert layer_type("q4_k_m", "model.layers.2.mlp.experts.gate_up.7", MixShape(30)) == "q4_k"
    assert layer_type("q3_k", "model.layers.0.self_attn.v_proj", MixShape(30)) == "q3_k"  # a single type is itself


def test_s_and_l_files_bump_as_llama_quantize_does():
    """llama-quantize's Q3_K_S, Q5_K_S (no bump on a dense model), Q4_K_S (the first four attn_v and
    the first eighth of ffn_down in Q5_K) and Q3_K_L (attn_v, attn_output, ffn_down all Q5_K)."""
    from hfquant.formats.gguf_presets import LLAMA_QUANTIZE_NAMES, MixShape, layer_type

    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    for i in range(32):
        types = {leaf: {p: layer_type(p, f"model.layers.{i}.{leaf}", MixShape(32)) for p in
                        ("q3_k_s", "q3_k_l", "q4_k_s", "q5_k_s")} for leaf in leaves}  # fmt: skip
        for leaf, got in types.items():
            assert got["q3_k_s"] == "q3_k" and got["q5_k_s"] == "q5_k", leaf
            wide = leaf in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
            assert got["q3_k_l"] == ("q5_k" if wide else "q3_k"), leaf
            bumped = (leaf == "self_attn.v_proj" and i < 4) or (leaf == "mlp.down_proj" and i < 32 // 8)
            assert got["q4_k_s"] == ("q5_k" if bumped else "q4_k"), (leaf, i)
    assert LLAMA_QUANTIZE_NAMES["q4_k_s"] == "Q4_K_S" and LLAMA_QUANTIZE_NAMES["q3_k_l"] == "Q3_K_L"


def test_q2_k_m_is_llama_quantizes_q2_k_file():
    """llama-quantize's Q2_K file type (a mix under the block type's name; hfquant's ``q2_k_m``):
    attention values Q3_K, or Q4_K where 4 or more query heads share a key/value head, attention
    output and every down projection Q3_K, the rest Q2_K; 8 experts: llama.cpp's bumps."""
    from hfquant.formats.gguf_presets import LLAMA_QUANTIZE_NAMES, MixShape, layer_type, query_groups

    def hf(block: int, leaf: str) -> str:
        return f"model.layers.{block}.{'mlp' if leaf in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{leaf}"

    for i in range(30):
        for gqa, v in ((1, "q3_k"), (3, "q3_k"), (4, "q4_k"), (8, "q4_k")):
            assert layer_type("q2_k_m", hf(i, "v_proj"), MixShape(30, 0, gqa)) == v
        assert layer_type("q2_k_m", hf(i, "o_proj"), MixShape(30)) == "q3_k"
        assert layer_type("q2_k_m", hf(i, "down_proj"), MixShape(30)) == "q3_k"
        for leaf in ("q_proj", "k_proj", "gate_proj", "up_proj"):
            assert layer_type("q2_k_m", hf(i, leaf), MixShape(30, 0, 4)) == "q2_k"
        assert layer_type("q2_k_m", hf(i, "v_proj"), MixShape(30, 8, 4)) == "q8_0"
        assert layer_type("q2_k_m", hf(i, "k_proj"), MixShape(30, 8, 4)) == "q8_0"
        assert layer_type("q2_k_m", hf(i, "o_proj"), MixShape(30, 8, 4)) == "q5_k"
    assert layer_type("q2_k_m", "transformer.h.3.attn.c_attn", MixShape(30)) == "q3_k"  # fused qkv: a value projection
    assert layer_type("q2_k_m", "model.layers.4.mlp.experts.down.1", MixShape(30, 4)) == "q3_k"
    assert layer_type("q2_k", hf(0, "v_proj"), MixShape(30, 0, 4)) == "q2_k"  # the block type stays itself
    assert LLAMA_QUANTIZE_NAMES["q2_k_m"] == "Q2_K"
    assert query_groups(LlamaConfig(num_attention_heads=32, num_key_value_heads=8)) == 4
    assert query_groups(LlamaConfig(num_attention_heads=32, num_key_value_heads=None)) == 1
    assert query_groups(GPT2Config()) == 1


def test_presets_bump_models_of_eight_experts_as_llama_quantize_does():
    """llama.cpp's rules for exactly 8 experts (Mixtral 8x7B): value and key projections Q8_0,
    attention output Q5_K in Q2_K, Q3_K_M and Q4_K_M; the rest as for any model. 4 or 16 experts: no bump."""
    from hfquant.formats.gguf_presets import MixShape, expert_count, layer_type

    for preset in ("q2_k_m", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m"):
        for i in range(32):
            assert layer_type(preset, f"model.layers.{i}.self_attn.v_proj", MixShape(32, 8)) == "q8_0"
            assert layer_type(preset, f"model.layers.{i}.self_attn.k_proj", MixShape(32, 8)) == "q8_0"
            # Q3_K_L is not on llama.cpp's list of 8-expert files with a Q5_K attention output
            o_proj = "q3_k" if preset == "q3_k_l" else "q5_k"
            assert layer_type(preset, f"model.layers.{i}.self_attn.o_proj", MixShape(32, 8)) == o_proj
            assert layer_type(preset, f"model.layers.{i}.self_attn.q_proj", MixShape(32, 8)) == preset[:4]
            for n in (0, 4, 16):
                assert layer_type(preset, f"model.layers.{i}.self_attn.k_proj", MixShape(32, n)) == preset[:4]
            down = f"model.layers.{i}.mlp.experts.down.5"
            assert layer_type(preset, down, MixShape(32, 8)) == layer_type(preset, down, MixShape(32, 4))
    assert layer_type("q4_k_m", "model.layers.10.self_attn.v_proj", MixShape(32, 4)) == "q4_k"
    assert layer_type("q4_k", "model.layers.9.self_attn.v_proj", MixShape(32, 8)) == "q4_k"  # a single type is itself
    assert expert_count(MixtralConfig(num_local_experts=8)) == 8
    assert expert_count(Qwen2MoeConfig(num_experts=60)) == 60
    assert expert_count(LlamaConfig()) == 0


def test_preset_types_are_every_type_the_rules_give():
    """``preset_types`` (what a reloaded layer's shapes are checked against) lists exactly the types
    ``layer_type`` gives some weight of some model depth under the preset."""
    from hfquant.formats.gguf_presets import GGUF_PRESETS, ROLE_SUFFIXES, MixShape, layer_type, preset_types

    for preset in GGUF_PRESETS:
        given = {
            layer_type(preset, f"blk.{i}.{leaf}.weight", MixShape(n, experts, gqa))
            for n in range(1, 81)
            for i in range(n)
            for leaf in (*(suffixes[0] for suffixes in ROLE_SUFFIXES.values()), "q_proj", "up_proj")
            for experts in (0, 8)
            for gqa in (1, 4)
        }
        assert sorted(given) == sorted(preset_types(preset)), preset
        assert set(given) <= set(GGUF_GRIDS)


@needs_converter
@pytest.mark.parametrize("preset", ["q2_k_m", "q3_k_m", "q4_k_m"])
def test_preset_is_solved_per_tensor_exported_losslessly_and_reloaded(tokenizer, tmp_path, preset):
    """Each layer is solved on the type its role and block give (llama.cpp's mix), the export writes
    every one of them as is, and a saved model reloads each layer's type from its tensors."""
    from hfquant.formats.gguf_presets import LLAMA_QUANTIZE_NAMES, MixShape, layer_type

    model = quantized_tiny(tokenizer, tmp_path, preset)
    grids = {n: m.grid.name for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert grids == {n: layer_type(preset, n, MixShape.of(model.config, 1)) for n in grids}
    assert grids["model.layers.0.self_attn.v_proj"] == {"q2_k_m": "q3_k", "q3_k_m": "q5_k", "q4_k_m": "q6_k"}[preset]
    assert len(set(grids.values())) == 3 if preset == "q3_k_m" else 2
    summary = save_gguf(model, tokenizer, tmp_path / "mix.gguf")
    assert summary.type == preset
    hows = {t.name: t for t in summary.tensors}
    read = gguf_weights(tmp_path / "mix.gguf")
    for name, w in hfquant_weights(model).items():
        assert hows[name].how == "lossless", name
        np.testing.assert_array_equal(read[name], w, err_msg=name)
    fields = gguf.GGUFReader(tmp_path / "mix.gguf").fields
    llama_name = LLAMA_QUANTIZE_NAMES[preset]
    assert fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType, f"MOSTLY_{llama_name}"))
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert {n: m.grid.name for n, m in again.named_modules() if isinstance(m, GGUFLinear)} == grids
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            assert torch.equal(module.dequantize(), again.get_submodule(name).dequantize()), name


@needs_converter
def test_preset_of_an_eight_expert_model_is_solved_exported_and_reloaded_on_its_bumped_types(tokenizer, tmp_path):
    """A Mixtral of 8 experts under Q4_K_M: the solver puts attention values and keys on Q8_0 and the
    output on Q5_K (the expert count read from the model config), the export writes each type as
    solved (no requantization), and the saved model reloads the same types."""
    from hfquant.formats.gguf_presets import MixShape, layer_type

    torch.manual_seed(0)
    base = MixtralConfig(
        hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
    )
    model = quantized_tiny(tokenizer, tmp_path, "q4_k_m", model=AutoModelForCausalLM.from_config(base))
    grids = {n: m.grid.name for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert grids["model.layers.0.self_attn.v_proj"] == grids["model.layers.0.self_attn.k_proj"] == "q8_0"
    assert grids["model.layers.0.self_attn.o_proj"] == "q5_k"
    assert grids == {n: layer_type("q4_k_m", n, MixShape(1, 8)) for n in grids}
    summary = save_gguf(model, tokenizer, tmp_path / "mix.gguf")
    written = {t.name: (t.written, t.how) for t in summary.tensors}
    assert written["blk.0.attn_k.weight"] == written["blk.0.attn_v.weight"] == ("q8_0", "lossless")
    assert written["blk.0.attn_output.weight"] == ("q5_k", "lossless")
    assert written["blk.0.ffn_down_exps.weight"] == ("q6_k", "lossless")  # block 0 of 1: more bits
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert {n: m.grid.name for n, m in again.named_modules() if isinstance(m, GGUFLinear)} == grids


def test_preset_checkpoint_with_a_foreign_layer_type_is_refused(tokenizer, tmp_path):
    """A layer whose tensors match none of the preset's types names the layer and the types."""
    from hfquant.export.checkpoint import plan_quantized_layers, read_checkpoint
    from hfquant.formats import CheckpointError
    from hfquant.nn.replace import linears_to_convert

    model = quantized_tiny(tokenizer, tmp_path, "q2_k")
    model.save_pretrained(tmp_path / "q2k")
    tensors, _ = read_checkpoint([str(tmp_path / "q2k" / "model.safetensors")])
    linears = linears_to_convert(tiny_llama(tokenizer), ["lm_head"])
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.0\.[\w.]+ stores none of the types of gguf_type='q4_k_m'"):
        plan_quantized_layers(tensors, linears, HfQuantConfig(gguf_type="q4_k_m"))
