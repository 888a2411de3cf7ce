"""GGUF export (hfquant/export/gguf.py): block packing, every type read back with gguf's own
dequantize, tiny models through the whole export, bad inputs, and the default model run by
llama.cpp's own tools (built by `make llamacpp`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

gguf = pytest.importorskip("gguf")

from hfquant.export.gguf import (  # noqa: E402
    GGUF_TYPES,
    GGUFBlocks,
    GGUFExportError,
    quantize_k,
    quantize_tensor,
    save_gguf,
)
from hfquant.export.llamacpp import (  # noqa: E402
    LlamaCppError,
    llamacpp_kl_divergence,
    llamacpp_perplexity,
    llamacpp_source,
    llamacpp_tool,
)
from hfquant.formats.gguf import GGUF_GRIDS, K_QUANTS  # noqa: E402

TYPES = tuple(GGUF_GRIDS)
QMAX = {"q4_0": 15, "q4_1": 15, "q5_0": 31, "q5_1": 31, "q8_0": 255, "q2_k": 3, "q3_k": 7, "q4_k": 15, "q5_k": 31, "q6_k": 63}

needs_converter = pytest.mark.skipif(
    not (llamacpp_source() / "conversion").is_dir(),
    reason=f"llama.cpp's converter is absent ({llamacpp_source()}): run `make llamacpp` or set HFQUANT_LLAMACPP_SRC",
)


def tool(name: str):
    path = llamacpp_tool(name)
    if not path.is_file():
        pytest.skip(f"{name} is not built ({path}): run `make llamacpp` or set HFQUANT_LLAMACPP_BIN")
    return path


def gguf_dequantize(tensor) -> np.ndarray:
    """gguf's own dequantization of a tensor read by GGUFReader, as ``[rows, cols]``."""
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(-1, int(tensor.shape[0]))


def expected_stored(w: np.ndarray, written: str) -> np.ndarray:
    """What a requantized weight must read back as: gguf's quantize -> dequantize for the types gguf
    quantizes, hfquant's K-quant blocks (their own formula, independent of the byte layout) otherwise."""
    if written in K_QUANTS:
        return quantize_k(w, written).dequantize()
    qtype = gguf.GGMLQuantizationType[written.upper()]
    return np.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype), dtype=np.float32).reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# Blocks and their bytes
# ------------------------------------------------------------------------------------------------


def random_blocks(qtype: str, rows: int = 6, cols: int = 512, seed: int = 0) -> GGUFBlocks:
    rng = np.random.default_rng(seed)
    nb = cols // (256 if qtype in K_QUANTS else 32)
    q = rng.integers(0, QMAX[qtype] + 1, (rows, nb, 256 if qtype in K_QUANTS else 32), dtype=np.uint8)
    d = rng.normal(0, 0.01, (rows, nb)).astype(np.float16)
    if qtype in ("q4_0", "q5_0", "q8_0"):
        return GGUFBlocks(qtype, q, d)
    if qtype in ("q4_1", "q5_1"):
        return GGUFBlocks(qtype, q, d, m=rng.normal(0, 0.1, (rows, nb)).astype(np.float16))
    if qtype == "q6_k":
        return GGUFBlocks(qtype, q, d, sc=rng.integers(-128, 128, (rows, nb, 16)).astype(np.int8))
    n_sub, smax = {"q2_k": (16, 15), "q3_k": (16, 63), "q4_k": (8, 63), "q5_k": (8, 63)}[qtype]
    sc = rng.integers(0, smax + 1, (rows, nb, n_sub), dtype=np.uint8)
    if qtype == "q3_k":
        return GGUFBlocks(qtype, q, d, sc=sc)
    mn = rng.integers(0, smax + 1, (rows, nb, n_sub), dtype=np.uint8)
    return GGUFBlocks(qtype, q, d, dmin=np.abs(d), sc=sc, mn=mn)


@pytest.mark.parametrize("qtype", TYPES)
def test_packed_blocks_read_back_exactly_by_gguf(qtype):
    """Every stored integer and scale lands where gguf (and so llama.cpp) reads it."""
    blocks = random_blocks(qtype)
    packed = blocks.pack()
    assert packed.dtype == np.uint8
    assert packed.shape[1] == 512 // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]][0] * (
        gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]][1]
    )
    back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[qtype.upper()])
    np.testing.assert_array_equal(back.reshape(blocks.shape), blocks.dequantize())


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quantizer_is_on_grid_and_close(qtype):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (16, 768)).astype(np.float32)
    blocks = quantize_k(w, qtype)
    assert int(blocks.q.max()) <= QMAX[qtype]
    assert int(blocks.sc.max()) <= {"q2_k": 15, "q6_k": 127}.get(qtype, 63)
    deq = blocks.dequantize()

    def rel_error(t: str) -> float:
        return float(np.sqrt(((quantize_k(w, t).dequantize() - w) ** 2).mean() / (w**2).mean()))

    rel = rel_error(qtype)
    assert rel < {"q2_k": 0.6, "q3_k": 0.35, "q4_k": 0.15, "q5_k": 0.08, "q6_k": 0.04}[qtype], rel
    # One more bit, less error.
    if qtype in ("q4_k", "q5_k", "q6_k"):
        assert rel < rel_error(K_QUANTS[K_QUANTS.index(qtype) - 1])
    np.testing.assert_array_equal(
        gguf.quants.dequantize(quantize_tensor(w, qtype), gguf.GGMLQuantizationType[qtype.upper()]).reshape(w.shape), deq
    )


def test_k_quantizer_in_row_chunks_gives_the_same_blocks(monkeypatch):
    """Large tensors go through in row chunks (bounded memory); the blocks are those of one pass."""
    import hfquant.export.gguf as export

    w = np.random.default_rng(2).normal(0, 0.02, (40, 512)).astype(np.float32)
    whole = {t: quantize_k(w, t).pack() for t in K_QUANTS}
    monkeypatch.setattr(export, "_K_CHUNK", 512 * 7)  # 7 rows per chunk: uneven last chunk
    for t in K_QUANTS:
        np.testing.assert_array_equal(quantize_k(w, t).pack(), whole[t], err_msg=t)


@pytest.mark.parametrize("qtype", ["q4_0", "q2_k", "q6_k"])
def test_3d_expert_tensors_quantize_as_each_expert_alone(qtype):
    """Fused float experts ``[experts, rows, cols]`` (kept unquantized, written in a K-quant) are
    quantized expert by expert, in the 3D byte layout the writer takes."""
    w = np.random.default_rng(3).normal(0, 0.02, (3, 4, 512)).astype(np.float32)
    got = quantize_tensor(w, qtype)
    assert got.shape[:2] == (3, 4)
    for e in range(3):
        np.testing.assert_array_equal(got[e], quantize_tensor(w[e], qtype), err_msg=f"{qtype} expert {e}")


def test_constant_and_zero_rows_quantize_without_nan():
    w = np.zeros((2, 256), np.float32)
    w[1] = 0.5
    for qtype in K_QUANTS:
        deq = quantize_k(w, qtype).dequantize()
        assert np.isfinite(deq).all()
        np.testing.assert_allclose(deq[0], 0)


# ------------------------------------------------------------------------------------------------
# Tiny models through the whole export
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from hfquant.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def tiny_llama(tokenizer, tie: bool = True, seed: int = 0):
    """A random Llama with 256-multiple widths (every K-quant holds its rows) and the real tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def hf_to_gguf_weights(model) -> dict[str, np.ndarray]:
    """The float weight llama.cpp expects under each GGUF name: names from gguf's tensor map, q/k
    rows in llama.cpp's rotary order (the permutation convert_hf_to_gguf applies), written here
    independently of the export code."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    from hfquant.nn import DecoupledLinear

    out = {}
    for hf_name, module in model.named_modules():
        if isinstance(module, DecoupledLinear | torch.nn.Linear | torch.nn.Embedding):
            if hf_name == "lm_head" and config.tie_word_embeddings:
                continue
            w = module.dequantize(torch.float32) if isinstance(module, DecoupledLinear) else module.weight.detach()
            w = w.float().numpy()
            if hf_name.endswith("q_proj"):
                w = permute(w, config.num_attention_heads)
            elif hf_name.endswith("k_proj"):
                w = permute(w, config.num_key_value_heads)
            out[names.get_name(hf_name + ".weight", try_suffixes=(".weight",))] = w
    return out


@needs_converter
@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_reads_back_as_gguf_quantization_of_the_weights(tokenizer, tmp_path, qtype):
    """(a)/(b): each tensor of a 256-wide Llama, read back with gguf's own dequantize, is the type's
    quantization of the model's weight; K-quants hold every row (no fallback)."""
    model = tiny_llama(tokenizer)
    path = tmp_path / f"tiny-{qtype}.gguf"
    # The default output head (tied: the embedding) is checked for q4_0 (q6_k) and q8_0 (q8_0); the
    # other types write it in q8_0, which keeps the 49k-row embedding cheap to quantize.
    default_output = qtype in ("q4_0", "q8_0")
    summary = save_gguf(model, tokenizer, path, type=qtype, output_type=None if default_output else "q8_0")
    written = {t.name: t for t in summary.tensors}
    assert all("fallback" not in t.how for t in summary.tensors)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(written)
    expected = hf_to_gguf_weights(model)
    for name, w in expected.items():
        record = written[name]
        # tied: the embedding is the output head, by default q6_k as in llama.cpp's presets (q8_0 in a q8_0 file)
        want = qtype if name != "token_embd.weight" else ("q6_k" if qtype == "q4_0" else "q8_0")
        assert record.written == want and tensors[name].tensor_type.name == want.upper()
        np.testing.assert_array_equal(gguf_dequantize(tensors[name]), expected_stored(w, want), err_msg=name)
    norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in norms)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert "im_start" in fields["tokenizer.chat_template"].contents()


@needs_converter
def test_w4_g32_decoupled_model_exports_to_q4_1_losslessly(tokenizer, tmp_path):
    """A hfquant W4 g32 model is Q4_1: written from its integers and float16 scale/zero, and gguf reads
    back exactly hfquant's dequantized weight."""
    from hfquant import HfQuantConfig
    from hfquant.nn import DecoupledLinear

    base = tmp_path / "base"
    tiny_llama(tokenizer, tie=False).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=HfQuantConfig(bits=4, group_size=32, method="rtn"), dtype=torch.float32
    )
    assert any(isinstance(m, DecoupledLinear) for m in model.modules())
    summary = save_gguf(model, tokenizer, tmp_path / "w4.gguf", type="q4_1", output_type="f32", embedding_type="f16")
    hows = {t.name: t.how for t in summary.tensors}
    assert all(hows[n] == "lossless" for n in hows if n.startswith("blk.") and not n.endswith("norm.weight"))
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "w4.gguf").tensors}
    for name, w in hf_to_gguf_weights(model).items():
        got = gguf_dequantize(tensors[name])
        if name == "token_embd.weight":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)  # exact: no requantization


@needs_converter
def test_576_wide_rows_fall_back_like_llama_quantize(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64 * 9, intermediate_size=768, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=len(tokenizer), tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    summary = save_gguf(model, tokenizer, tmp_path / "q4k.gguf", type="q4_k")
    by_name = {t.name: t for t in summary.tensors}
    assert by_name["blk.0.attn_q.weight"].written == "q5_0"  # 576 columns: llama.cpp's fallback for Q4_K
    assert "fallback" in by_name["blk.0.attn_q.weight"].how
    assert by_name["blk.0.ffn_down.weight"].written == "q4_k"  # 768 columns hold super-blocks of 256
    assert any("fallback" in r["how"] for r in summary.rows())
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q4k.gguf").tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_0
    summary = save_gguf(model, tokenizer, tmp_path / "q2k.gguf", type="q2_k")
    assert {t.name: t.written for t in summary.tensors}["blk.0.attn_v.weight"] == "q4_0"


@needs_converter
@pytest.mark.parametrize(
    ("preset", "arch"),
    [(p, a) for p in ("q2_k_m", "q3_k_m", "q4_k_m", "q5_k_m") for a in ("llama", "mixtral", "mixtral8", "gpt2")]
    + [("q2_k_m", "llama-gqa4")]  # the one rule that reads the query groups
    + [(p, a) for p in ("q3_k_s", "q3_k_l", "q4_k_s", "q5_k_s") for a in ("llama", "mixtral8")],
)
def test_mixes_give_every_tensor_the_type_llama_quantize_gives_it(tokenizer, tmp_path, preset, arch):
    """The per-tensor rules against llama.cpp itself: a 16-block model exported as a mix has, tensor
    for tensor, the types of ``llama-quantize``'s file of that name (from the same model's F32 GGUF;
    ``q2_k_m`` is its ``Q2_K``); 4 query heads per key/value head give Q2_K's value projections more
    bits; in a Mixtral with 4 experts, the experts' ffn_down follows the ffn_down rules; with 8
    experts, llama.cpp's Mixtral bumps apply; GPT-2's fused qkv (``c_attn``) counts as a value
    projection."""
    from transformers import GPT2Config, MixtralConfig

    from hfquant.formats.gguf_presets import LLAMA_QUANTIZE_NAMES

    quantize = tool("llama-quantize")
    torch.manual_seed(0)
    shape = dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=False,
    )
    config = {
        "llama": lambda: LlamaConfig(**shape),
        "llama-gqa4": lambda: LlamaConfig(**{**shape, "num_attention_heads": 8}),
        "mixtral": lambda: MixtralConfig(**shape, num_local_experts=4),
        "mixtral8": lambda: MixtralConfig(**{**shape, "intermediate_size": 256}, num_local_experts=8),
        # n_ctx: the converter reads the key transformers 5 no longer writes
        "gpt2": lambda: GPT2Config(n_embd=256, n_layer=16, n_head=4, vocab_size=len(tokenizer), n_ctx=1024),
    }[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_gguf(model, tokenizer, tmp_path / "f32.gguf", type="f32")
    # The embedding and output types each preset gives are compared on Llama; elsewhere both sides keep
    # them in F16, which spares quantizing 2 x 12.6 M weights per case.
    float_ends = {} if arch == "llama" else dict(embedding_type="f16", output_type="f16")
    flags = [] if arch == "llama" else ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    llama = tmp_path / f"llama-{preset}.gguf"
    subprocess.run([str(quantize), *flags, str(tmp_path / "f32.gguf"), str(llama), LLAMA_QUANTIZE_NAMES[preset], "2"],
                   check=True, capture_output=True)  # fmt: skip
    summary = save_gguf(model, tokenizer, tmp_path / f"hfquant-{preset}.gguf", type=preset, **float_ends)
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(llama).tensors}
    ours = {t.name: t.written.upper() for t in summary.tensors}
    assert ours == theirs
    kinds = len({v for k, v in ours.items() if k.startswith("blk.") and not k.endswith("norm.weight")})
    plain_on_dense = preset in ("q3_k_s", "q5_k_s") and arch != "mixtral8"  # no rule bumps a dense model's tensor
    assert kinds == 1 if plain_on_dense else kinds >= 2


@needs_converter
def test_transformers_reads_the_export_back(tokenizer, tmp_path):
    """(b) An independent reader: transformers' GGUF loader (its own name map and inverse q/k
    permutation) gives back, for Q4_K, the weights gguf's dequantization of our blocks implies."""
    model = tiny_llama(tokenizer, tie=False)
    save_gguf(model, tokenizer, tmp_path / "m.gguf", type="q4_k", output_type="q4_k", embedding_type="q4_k")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        w = p.detach().numpy()
        want = quantize_k(w, "q4_k").dequantize() if w.ndim == 2 else w
        np.testing.assert_allclose(q.detach().numpy(), want, rtol=0, atol=1e-6, err_msg=name)


@needs_converter
def test_kl_divergence_against_saved_base_logits(tokenizer, tmp_path):
    """The paired comparison the GGUF benchmark uses where perplexities alone are noise: a file
    against its own saved logits is identical; coarser types diverge more."""
    tool("llama-perplexity")
    model = tiny_llama(tokenizer)
    text = "\n\n".join(["The quick brown fox jumps over the lazy dog near the river bank. " * 40] * 2)
    paths = {}
    for qtype in ("f32", "q8_0", "q4_0"):
        paths[qtype] = tmp_path / f"tiny-{qtype}.gguf"
        save_gguf(model, tokenizer, paths[qtype], type=qtype, embedding_type="f32")
    logits = tmp_path / "base.logits"
    base_ppl = llamacpp_perplexity(paths["f32"], text, chunks=2, threads=2, context=128, save_logits=logits)
    assert base_ppl > 1 and logits.stat().st_size > 0
    same = llamacpp_kl_divergence(paths["f32"], logits, threads=2)
    assert same.mean_kld < 1e-6 and same.same_top == 1.0 and same.ppl_ratio == pytest.approx(1.0, abs=1e-5)
    q8, q4 = (llamacpp_kl_divergence(paths[t], logits, threads=2) for t in ("q8_0", "q4_0"))
    assert 0 < q8.mean_kld < q4.mean_kld and q4.same_top <= q8.same_top <= 1.0
    assert q4.mean_kld_unc > 0 and q4.ppl_ratio_unc > 0
    with pytest.raises(LlamaCppError, match="no saved base logits"):
        llamacpp_kl_divergence(paths["q8_0"], tmp_path / "missing.logits")


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, no partial file
# ------------------------------------------------------------------------------------------------


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@needs_converter
def test_kept_weights_are_refused(tokenizer, tmp_path):
    from hfquant import HfQuantConfig

    base = tmp_path / "base"
    tiny_llama(tokenizer).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=HfQuantConfig(bits=4, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude"),
        dtype=torch.float32,
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFExportError, match="GGUF has no sparse 16-bit weights"):
        save_gguf(model, tokenizer, out / "m.gguf", type="q4_1")
    assert leftovers(out) == []


def test_unsupported_type_lists_the_allowed_ones(tmp_path):
    model = torch.nn.Linear(4, 4)
    for kwargs in ({"type": "q7_k"}, {"type": "q4_1", "output_type": "iq2_xxs"}, {"type": "q4_1", "embedding_type": "bf17"}):
        with pytest.raises(GGUFExportError, match="expected one of " + ", ".join(GGUF_TYPES)):
            save_gguf(model, None, tmp_path / "m.gguf", **kwargs)
    assert leftovers(tmp_path) == []


@needs_converter
def test_unwritable_paths_are_clear_errors(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    (tmp_path / "file").write_text("x")
    for bad, message in [
        (tmp_path / "missing" / "m.gguf", "cannot write"),
        (tmp_path / "file" / "m.gguf", "cannot write"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(GGUFExportError, match=message):
            save_gguf(model, tokenizer, bad, type="q8_0")
    assert leftovers(tmp_path) == ["file"]


@needs_converter
def test_an_error_mid_write_leaves_no_file(tokenizer, tmp_path, monkeypatch):
    import hfquant.export.gguf as module

    calls = []

    def failing(w, qtype):
        calls.append(qtype)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return quantize_tensor(w, qtype)

    monkeypatch.setattr(module, "quantize_tensor", failing)
    (tmp_path / "m.gguf").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_gguf(tiny_llama(tokenizer), tokenizer, tmp_path / "m.gguf", type="q4_0")
    assert leftovers(tmp_path) == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"previous"  # the old file is untouched


@needs_converter
def test_cli_export_gguf(tokenizer, tmp_path, capsys):
    from hfquant.cli import main

    folder = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["export-gguf", str(folder), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    out = capsys.readouterr().out
    assert "q4_0" in out and "bits/weight" in out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    assert main(["export-gguf", str(folder), str(tmp_path / "x.gguf"), "--type", "q9"]) == 2
    assert "unsupported GGUF type 'q9'" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------
# The default model in llama.cpp itself
# ------------------------------------------------------------------------------------------------

# A chat prompt whose greedy answer has no near-tie that llama.cpp's 8-bit rounding of activations
# (its Q4_1 / Q8_0 matmuls quantize the input rows too) flips within 16 tokens; "What is the capital
# of France?" does not qualify: "The" leads "L" by 0.08 logits, and the rounding flips it.
QUESTION = "Explain photosynthesis in one sentence."
NEW_TOKENS = 16
CHUNKS = 6  # 512-token windows scored by both sides
SEQLEN = 512


def llama_greedy(model_path, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation (llama-simple: greedy sampler, special tokens parsed, BOS as
    the GGUF says)."""
    run = subprocess.run(
        [str(tool("llama-simple")), "-m", str(model_path), "-n", str(n), prompt],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(prompt), run.stdout
    return run.stdout[len(prompt):].rstrip("\n")


def hf_greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def hf_perplexity(model, tokenizer, text: str, chunks: int = CHUNKS) -> float:
    """llama-perplexity's measure in transformers: consecutive SEQLEN-token chunks of the file's tokens
    (no BOS: the model does not add one); in each, logits at positions ``SEQLEN/2 .. SEQLEN-2`` score
    the next token (perplexity.cpp: ``first = n_ctx/2``, ``n_ctx - 1 - first`` tokens per chunk)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = ids[: chunks * SEQLEN].view(chunks, SEQLEN)
    first = SEQLEN // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[first:-1], window[first + 1 :], reduction="sum").item()
            count += SEQLEN - first - 1
    return float(np.exp(nll / count))


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    from hfquant.calibration import heldout_texts

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(heldout_texts()), encoding="utf-8")
    return path


def with_weights_as_stored(model, qtype: str):
    """The float model with every linear weight replaced by its ``qtype`` value (gguf's quantize ->
    dequantize): what the exported file stores, run by transformers."""
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.numpy()
                module.weight.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)).reshape(w.shape)))
    return model


@pytest.mark.slow
@needs_converter
@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_1"])
def test_default_model_in_llama_cpp_matches_hfquant(qtype, tmp_path, heldout_file):
    """(c) The default model in llama.cpp computes what transformers computes on the same weights:
    greedy answer equal for 16 tokens, held-out perplexity within 1% on the same tokens and windows.
    Q4_1: hfquant's RTN W4 g32 model, written losslessly, against itself. Q8_0: the float model
    requantized, against transformers running the file's Q8_0 weights. F32: the float model (its
    greedy continuation of a prompt with near-ties matches too). The embedding / output head is
    written as F32 so both sides use the same one."""
    tool("llama-simple"), tool("llama-perplexity")
    from hfquant import HfQuantConfig
    from hfquant.models import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = tmp_path / f"smollm2-{qtype}.gguf"
    if qtype == "q4_1":
        config = HfQuantConfig(bits=4, group_size=32, method="rtn")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()
        summary = save_gguf(model, tokenizer, out, type=qtype, embedding_type="f32")
        assert all(t.how == "lossless" for t in summary.tensors if t.requested == "q4_1")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        save_gguf(model, tokenizer, out, type=qtype, embedding_type="f32")
        if qtype != "f32":
            model = with_weights_as_stored(model, qtype)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)]
    if qtype == "f32":
        prompts.append("The Book of Mormon is a sacred text that")  # near-ties: only exact arithmetic agrees
    for prompt in prompts:
        assert llama_greedy(out, prompt, NEW_TOKENS) == hf_greedy(model, tokenizer, prompt, NEW_TOKENS)
    ppl_llama = llamacpp_perplexity(out, heldout_file.read_text(encoding="utf-8"), chunks=CHUNKS, threads=2, context=SEQLEN)
    ppl_hf = hf_perplexity(model, tokenizer, heldout_file.read_text(encoding="utf-8"))
    print(f"{qtype}: llama.cpp {ppl_llama:.4f}, transformers {ppl_hf:.4f}", file=sys.stderr)
    assert abs(ppl_llama / ppl_hf - 1) < 0.01, (ppl_llama, ppl_hf)


@needs_converter
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_the_converter_loads_for_qwen_models(arch):
    """llama.cpp's Qwen converter module names gguf constants PyPI's gguf 0.19.0 lacks (DFLASH):
    `make llamacpp` installs the gguf-py vendored beside the converter."""
    from hfquant.export.gguf import _converter_class

    assert _converter_class(arch).__name__.startswith("Qwen")


@needs_converter
def test_float_mixtral_experts_export_under_their_checkpoint_names(tokenizer, tmp_path):
    """Unquantized (fused) experts go to the converter as the checkpoint stores them too: Mixtral's
    converter maps only ``block_sparse_moe.experts.{e}.w1``, and failed on ``mlp.experts.gate_up_proj``."""
    from transformers import MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_gguf(model, tokenizer, tmp_path / "f.gguf", type="f32")
    tensors = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    for b, layer in enumerate(model.model.layers):
        gate_up, down = layer.mlp.experts.gate_up_proj.detach().numpy(), layer.mlp.experts.down_proj.detach().numpy()
        np.testing.assert_array_equal(tensors[f"blk.{b}.ffn_gate_exps.weight"], gate_up[:, :32])
        np.testing.assert_array_equal(tensors[f"blk.{b}.ffn_up_exps.weight"], gate_up[:, 32:])
        np.testing.assert_array_equal(tensors[f"blk.{b}.ffn_down_exps.weight"], down)
        np.testing.assert_array_equal(tensors[f"blk.{b}.ffn_gate_inp.weight"], layer.mlp.gate.weight.detach().numpy())


# Tiny MoE models for the export (random weights, the real tokenizer): every routed MLP has 4 experts.
MOE_EXPORT = {
    "Qwen3MoeForCausalLM": dict(head_dim=16, num_experts=4, moe_intermediate_size=32),
    # per-expert checkpoint names (block_sparse_moe.experts.{e}.w1) are all its converter maps
    "MixtralForCausalLM": dict(num_local_experts=4, intermediate_size=32),
    # a shared expert and its gate beside the routed ones
    "Qwen2MoeForCausalLM": dict(
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=16, intermediate_size=64
    ),
    # a dense first block, shared experts, and MLA's kv_b_proj, which the converter splits and
    # transposes per head: that one is requantized from its dequantized weight
    "DeepseekV3ForCausalLM": dict(
        num_key_value_heads=4, n_routed_experts=4, moe_intermediate_size=32, intermediate_size=64,
        first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1,
    ),
    # experts stored [experts, in, out] with biases, gate and up interleaved; attention sinks
    "GptOssForCausalLM": dict(head_dim=16, num_local_experts=4, intermediate_size=32, sliding_window=128),
}  # fmt: skip


@needs_converter
@pytest.mark.parametrize("arch", list(MOE_EXPORT))
def test_moe_experts_export_losslessly_and_run_in_llama_cpp(arch, tokenizer, tmp_path, heldout_file, monkeypatch):
    """A W4 g32 MoE: its split experts are written as llama.cpp's 3D expert tensors (gate and up
    apart), losslessly as Q4_1, the router in F32, and llama.cpp computes what transformers computes
    on them. The experts reach the converter as the architecture's checkpoints name them (transformers'
    reverse conversion): fused for some, one tensor per expert for others (Mixtral, Qwen2-MoE)."""
    tool("llama-perplexity")
    import transformers

    from hfquant import HfQuantConfig
    from hfquant.export.gguf import _converter_class
    from hfquant.nn import ExpertLinears

    shape = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        num_experts_per_tok=2, initializer_range=0.08,  # larger weights than the default: perplexity tells the experts apart
    )  # fmt: skip
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**shape, **MOE_EXPORT[arch]})
    if arch != "MixtralForCausalLM":
        # The only tokenizer offline is SmolLM2's, under another architecture here; the converter identifies a
        # BPE tokenizer by a hash of its output and does not find this pairing: it is SmolLM2's ("smollm").
        monkeypatch.setattr(_converter_class(arch), "get_vocab_base_pre", lambda self, tok: "smollm")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "DeepseekV3ForCausalLM":  # the router's bias (a buffer) steers the choice of experts
        base.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=HfQuantConfig(bits=4, group_size=32, method="rtn"), dtype=torch.float32
    ).eval()
    out = tmp_path / "moe.gguf"
    summary = save_gguf(model, tokenizer, out, type="q4_1", embedding_type="f32", output_type="f32")
    written = {t.name: t for t in summary.tensors}
    assert written["blk.1.ffn_gate_exps.weight"].shape == (4, 32, 64)
    assert written["blk.1.ffn_gate_inp.weight"].written == "f32"  # the router, as llama.cpp keeps it
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    moe_blocks = [b for b, layer in enumerate(model.model.layers) if isinstance(getattr(layer.mlp, "experts", None), ExpertLinears)]
    assert moe_blocks == ([1] if arch == "DeepseekV3ForCausalLM" else [0, 1])
    if arch == "DeepseekV3ForCausalLM":
        assert "reshaped by llama.cpp's converter" in written["blk.0.attn_k_b.weight"].how
        np.testing.assert_array_equal(  # a buffer, not a parameter, in transformers
            tensors["blk.1.exp_probs_b.bias"].data, model.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
        )
    for b in moe_blocks:
        experts = model.model.layers[b].mlp.experts
        gate_up = torch.stack([m.dequantize(torch.float32) for m in experts.gate_up]).numpy()
        down = torch.stack([m.dequantize(torch.float32) for m in experts.down]).numpy()
        gate, up = (gate_up[:, ::2], gate_up[:, 1::2]) if arch == "GptOssForCausalLM" else (gate_up[:, :32], gate_up[:, 32:])
        for part, want in (("gate", gate), ("up", up), ("down", down)):
            assert written[f"blk.{b}.ffn_{part}_exps.weight"].how == "lossless"
            got = gguf_dequantize(tensors[f"blk.{b}.ffn_{part}_exps.weight"]).reshape(want.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"{b} {part}")
    # Reloaded from its hfquant checkpoint (experts stored split, so transformers loads it without the expert
    # conversions the export reverses), the model exports to the same tensors.
    model.save_pretrained(tmp_path / "quantized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized", dtype=torch.float32)
    save_gguf(reloaded, tokenizer, tmp_path / "reloaded.gguf", type="q4_1", embedding_type="f32", output_type="f32")
    again = {t.name: t for t in gguf.GGUFReader(tmp_path / "reloaded.gguf").tensors}
    assert sorted(again) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(again[name].data, t.data, err_msg=name)
    # A random model's next-token logits are near ties, so greedy text is not compared; perplexity is.
    text = heldout_file.read_text(encoding="utf-8")
    ppl_llama = llamacpp_perplexity(out, text, chunks=2, threads=2, context=SEQLEN)
    ppl_hf = hf_perplexity(model, tokenizer, text, chunks=2)
    print(f"MoE q4_1: llama.cpp {ppl_llama:.4f}, transformers {ppl_hf:.4f}", file=sys.stderr)
    assert abs(ppl_llama / ppl_hf - 1) < 0.01, (ppl_llama, ppl_hf)
    # ... and it would see experts in the wrong order: with two of them swapped transformers scores otherwise
    for b in moe_blocks:
        experts = model.model.layers[b].mlp.experts
        experts.gate_up[0], experts.gate_up[1] = experts.gate_up[1], experts.gate_up[0]
    ppl_swapped = hf_perplexity(model, tokenizer, text, chunks=2)
    print(f"MoE q4_1: transformers with experts 0 and 1 swapped {ppl_swapped:.4f}", file=sys.stderr)
    # measured: 3.4% against 0.7% between the engines (Qwen3-MoE), 1.1% / 0.05% (Mixtral), 3.6% / 0.09%
    # (Qwen2-MoE), 1.6% / 0.09% (DeepSeek-V3)
    assert abs(ppl_swapped / ppl_hf - 1) > max(3 * abs(ppl_llama / ppl_hf - 1), 0.005)
