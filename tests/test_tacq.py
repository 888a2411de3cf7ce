"""TaCQ: saliency, selection of kept 16-bit weights, quantization around them, save / reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.algorithms.grid import dequantize_grid
from hfquant.algorithms.tacq import quantization_change, saliency_scores, select_kept
from hfquant.cli import main
from hfquant.driver.kept import choose_kept, task_statistics
from hfquant.export import bits_per_weight
from hfquant.nn.replace import linears_to_convert
from hfquant.task_data import IGNORE, batches_from_ids, chat_example_tokens, task_batches

QA = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is the chemical symbol of gold?", "answer": "Au"},
    {
        "messages": [
            {"role": "user", "content": "Who wrote Hamlet?"},
            {"role": "assistant", "content": "Shakespeare"},
        ]
    },
    {"question": "How many legs does a spider have?", "answer": "Eight"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def _config(**overrides) -> HfQuantConfig:
    settings = dict(
        bits=2,
        group_size=32,
        method="gptq",
        nsamples=4,
        seqlen=32,
        blockwise_epochs=1,
        blockwise_batch_size=2,
    )
    return HfQuantConfig(**{**settings, **overrides})


def _quantize(model_dir, tokenizer, **overrides):
    config = _config(tokenizer=tokenizer, **overrides)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config).eval()


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer("The capital of France is Paris. Gold is Au.", return_tensors="pt").input_ids


def test_zero_gradient_gives_zero_saliency():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    g = torch.randn(8, 64)
    g[3] = 0.0
    g[:, 5] = 0.0
    scores = saliency_scores("tacq", w, 2, 32, gradient=g)
    assert (scores[3] == 0).all() and (scores[:, 5] == 0).all()
    assert (scores[g != 0] > 0).float().mean() > 0.9  # all but weights exactly on the grid


def test_tacq_formula_matches_the_paper():
    torch.manual_seed(0)
    w, g = torch.randn(4, 32), torch.randn(4, 32)
    change = quantization_change(w, 3, 32)
    expected = (g * change).abs() * (w * g).abs()
    assert torch.equal(saliency_scores("tacq", w, 3, 32, gradient=g), expected)


def test_scores_against_a_given_solve_and_the_fisher_term():
    """``quantized`` replaces round-to-nearest as ``Q(W)``; ``tacq_fisher`` adds ``F dW^2 / 2`` to QAL."""
    torch.manual_seed(0)
    w, g, f = torch.randn(4, 32), torch.randn(4, 32), torch.rand(4, 32)
    solved = w + 0.1 * torch.randn(4, 32)
    solved[0] = w[0]  # a row the solve holds exactly: nothing to keep there
    change = solved - w
    tacq = saliency_scores("tacq", w, 3, 32, gradient=g, quantized=solved)
    assert torch.equal(tacq, (g * change).abs() * (w * g).abs())
    assert (tacq[0] == 0).all()
    hybrid = saliency_scores("tacq_fisher", w, 3, 32, gradient=g, squared_gradient=f, quantized=solved)
    torch.testing.assert_close(hybrid, ((g * change).abs() + 0.5 * f * change.pow(2)) * (w * g).abs())
    zero_f = saliency_scores("tacq_fisher", w, 3, 32, gradient=g, squared_gradient=torch.zeros_like(f))
    assert torch.equal(zero_f, saliency_scores("tacq", w, 3, 32, gradient=g))
    hessian = saliency_scores("hessian", w, 3, 32, hessian_diag=f[0], quantized=solved)
    assert torch.equal(hessian, f[0][None, :] * change.pow(2))


def test_planted_weight_is_selected():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    g = torch.randn(32, 64) * 1e-3
    change = quantization_change(w, 2, 32).abs()
    # Among weights with a large quantization change, plant a large gradient on one.
    r, c = divmod(int(torch.argmax(change)), 64)
    g[r, c] = 1.0
    # A large gradient on a weight the grid holds exactly (its group's minimum) must not win.
    r0 = (r + 1) % 32
    c0 = int(torch.argmin(w[r0, :32]))
    g[r0, c0] = 10.0
    scores = {"a": saliency_scores("tacq", w, 2, 32, gradient=g), "b": torch.rand(16, 16) * 1e-12}
    for scope in ("layer", "global"):
        masks = select_kept(scores, 1 / 2048, scope)
        assert masks["a"][r, c] and not masks["a"][r0, c0]
        assert int(sum(m.sum() for m in masks.values())) == 1


def test_selection_counts_per_layer_and_global():
    torch.manual_seed(0)
    scores = {"big": torch.rand(64, 64) + 1.0, "small": torch.rand(64, 32)}
    layer = select_kept(scores, 0.01, "layer")
    assert [int(m.sum()) for m in layer.values()] == [round(0.01 * 4096), round(0.01 * 2048)]
    glob = select_kept(scores, 0.01, "global")
    assert int(glob["big"].sum()) == round(0.01 * 6144) and int(glob["small"].sum()) == 0


def test_chat_labels_cover_the_answer_only(tokenizer):
    ids, labels = chat_example_tokens(QA[0], tokenizer)
    answer = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    text = tokenizer.decode(answer)
    assert text.startswith("Paris") and "capital" not in text
    assert len(answer) <= 4  # "Paris", end-of-turn and newline


def test_every_chat_example_is_used(tokenizer):
    """``nsamples`` counts calibration windows; a few dozen chat answers are all the task signal."""
    batches = task_batches(QA * 5, tokenizer, nsamples=4, seqlen=64, batch_size=3)
    assert sum(b.input_ids.shape[0] for b in batches) == 20
    assert all((b.labels != IGNORE).any(dim=1).all() for b in batches)


def test_gradients_sum_absolute_per_example_values(tiny_chat_model_dir, tokenizer):
    """TaCQ's ``G`` is ``sum_n |dL_n/dW|``, whatever the batching; padding is never counted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    linears = linears_to_convert(model, ["lm_head"])
    ids = torch.randint(0, len(tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    stats = task_statistics(
        model, linears, batches_from_ids(ids, 3), gradients=True, hessian_diag=False, squared_gradients=True
    )
    direct = {name: torch.zeros_like(m.weight) for name, m in linears.items()}
    squares = {name: torch.zeros_like(m.weight) for name, m in linears.items()}
    for i in range(3):  # plain autograd, one example at a time
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for name, m in linears.items():
            direct[name] += m.weight.grad.abs()
            squares[name] += m.weight.grad.pow(2)
    model.zero_grad()
    assert not stats.hessian_diag
    for name in linears:
        torch.testing.assert_close(stats.gradients[name], direct[name], rtol=1e-4, atol=1e-7)
        # tacq_fisher's F: the per-example squares, not the square of the sum
        torch.testing.assert_close(stats.squared_gradients[name], squares[name], rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not model.is_activation_checkpointing and not model.training
    # Chat examples of different lengths: right padding in a shared batch changes nothing.
    padded = task_batches(QA, tokenizer, nsamples=4, seqlen=64, batch_size=4)
    single = task_batches(QA, tokenizer, nsamples=4, seqlen=64, batch_size=1)
    assert (padded[0].attention_mask == 0).any()
    one = task_statistics(model, linears, padded, gradients=True, hessian_diag=False).gradients
    two = task_statistics(model, linears, single, gradients=True, hessian_diag=False).gradients
    for name in linears:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-7)


def test_kept_weights_exact(tiny_chat_model_dir, tokenizer):
    fp = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    original = {n: m.weight.detach().clone() for n, m in linears_to_convert(fp, ["lm_head"]).items()}
    model = _quantize(
        tiny_chat_model_dir, tokenizer, kept_fraction=0.01, task_dataset=QA, kept_scope="layer"
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DecoupledLinear)}
    assert set(layers) == set(original)
    for name, m in layers.items():
        assert m.num_kept == round(0.01 * m.in_features * m.out_features)
        rows, cols = m.outlier_rows.long(), m.outlier_cols.long()
        grid = dequantize_grid(m.integers(), m.scales, m.zeros, m.group_size)
        # The sparse part adds exactly its 16-bit values to the dequantized grid ...
        expected = grid.index_put((rows, cols), m.outlier_values.float(), accumulate=True)
        assert torch.equal(m.dequantize(torch.float32), expected)
        assert torch.equal(m.outlier_values, m.outlier_values.half().float())
        # ... which gives back the original weights, up to float16 rounding of the residual.
        kept = original[name][rows, cols]
        residual = kept - grid[rows, cols]
        tolerance = residual.abs() * 2**-10 + 1e-7
        assert ((m.dequantize(torch.float32)[rows, cols] - kept).abs() <= tolerance).all()
    bpw = bits_per_weight(model)
    assert bpw == pytest.approx(
        bits_per_weight(_quantize(tiny_chat_model_dir, tokenizer)) + 0.01 * 80, abs=0.01
    )


def test_zero_fraction_gives_the_same_model(tiny_chat_model_dir, tokenizer):
    plain = _quantize(tiny_chat_model_dir, tokenizer)
    with_fields = _quantize(
        tiny_chat_model_dir,
        tokenizer,
        kept_fraction=0.0,
        saliency="hessian",
        kept_scope="global",
        task_dataset=QA,
    )
    plain_state, other_state = plain.state_dict(), with_fields.state_dict()
    assert plain_state.keys() == other_state.keys()
    assert all(torch.equal(plain_state[k], other_state[k]) for k in plain_state)
    assert all(m.num_kept == 0 for m in with_fields.modules() if isinstance(m, DecoupledLinear))


@pytest.mark.parametrize("saliency", ["magnitude", "hessian"])
def test_baselines_and_global_scope(tiny_chat_model_dir, tokenizer, saliency):
    fp = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    linears = linears_to_convert(fp, ["lm_head"])
    config = _config(kept_fraction=0.02, saliency=saliency, kept_scope="global", task_dataset=QA)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    masks = choose_kept(fp, linears, config, tokenizer, ids)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.02 * total)
    if saliency == "magnitude":
        threshold = min(float(linears[n].weight.detach().abs()[m].min()) for n, m in masks.items() if m.any())
        assert all(float(linears[n].weight.detach().abs()[~m].max()) <= threshold for n, m in masks.items())


def test_solved_grid_scores_against_the_solvers_own_result(tiny_chat_model_dir, tokenizer):
    """``saliency_grid="solved"``: the first pass is the configured solver without kept weights or
    block-wise minimization, on a copy (the model is untouched), and its weights are what the
    saliency contrasts with; the result saves and reloads bit-identical."""
    from hfquant.driver.sequential import calibration_ids, first_solve

    fp = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    linears = linears_to_convert(fp, ["lm_head"])
    config = _config(method="decoupleq", decoupleq_iters=1, kept_fraction=0.02, task_dataset=QA,
                     saliency_grid="solved", tokenizer=tokenizer)  # fmt: skip
    ids = calibration_ids(fp, config, tokenizer)
    solved = first_solve(fp, linears, ids, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    plain = _quantize(tiny_chat_model_dir, tokenizer, method="decoupleq", decoupleq_iters=1, blockwise_epochs=0,
                      e2e_epochs=0)  # fmt: skip
    for name, m in plain.named_modules():
        if isinstance(m, DecoupledLinear):
            assert torch.equal(solved[name], m.dequantize(torch.float32))
    # The masks are TaCQ's scores against that solve, not against round-to-nearest.
    expected = choose_kept(fp, linears, config, tokenizer, ids, lambda: dict(solved))
    rtn_masks = choose_kept(fp, linears, _config(kept_fraction=0.02, task_dataset=QA), tokenizer, ids)
    assert any(not torch.equal(expected[n], rtn_masks[n]) for n in expected)
    model = _quantize(tiny_chat_model_dir, tokenizer, method="decoupleq", decoupleq_iters=1, kept_fraction=0.02,
                      task_dataset=QA, saliency_grid="solved")  # fmt: skip
    for name, m in model.named_modules():
        if isinstance(m, DecoupledLinear):
            rows, cols = m.kept_positions()
            mask = torch.zeros(m.out_features, m.in_features, dtype=torch.bool)
            mask[rows, cols] = True
            assert torch.equal(mask, expected[name]), name


def test_solved_grid_reloads_bit_identical(tiny_chat_model_dir, tokenizer, tmp_path):
    from hfquant.export import save_quantized

    model = _quantize(tiny_chat_model_dir, tokenizer, method="decoupleq", decoupleq_iters=1, kept_fraction=0.02,
                      saliency="tacq_fisher", task_dataset=QA, saliency_grid="solved")  # fmt: skip
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_quantized(model, tmp_path / "q", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.quantization_config.saliency_grid == "solved"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    card = (tmp_path / "q" / "README.md").read_text()
    assert "tacq_fisher kept weights (scored against a first solve)" in card


def test_rtn_with_magnitude_needs_no_data_and_keeps_weights(tiny_chat_model_dir):
    config = HfQuantConfig(bits=2, group_size=32, method="rtn", kept_fraction=0.01, saliency="magnitude")
    assert not config.needs_calibration
    fp = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    original = {n: m.weight.detach().clone() for n, m in linears_to_convert(fp, ["lm_head"]).items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, quantization_config=config)
    for name, m in model.named_modules():
        if isinstance(m, DecoupledLinear):
            rows, cols = m.outlier_rows.long(), m.outlier_cols.long()
            kept = original[name][rows, cols]
            assert torch.allclose(m.dequantize(torch.float32)[rows, cols], kept, rtol=1e-3, atol=1e-6)
            assert kept.abs().min() >= original[name].abs().median()


def test_config_fields_validated():
    with pytest.raises(
        ValueError, match=r"saliency must be one of \['tacq', 'tacq_fisher', 'magnitude', 'hessian'\], got 'fisher'"
    ):
        HfQuantConfig(saliency="fisher")
    with pytest.raises(ValueError, match=r"saliency_grid must be one of \['rtn', 'solved'\], got 'gptq'"):
        HfQuantConfig(saliency_grid="gptq")
    with pytest.raises(ValueError, match=r"saliency_grid='solved' needs method='gptq' or 'decoupleq'.*got method='rtn'"):
        HfQuantConfig(method="rtn", saliency_grid="solved")
    assert HfQuantConfig(saliency="tacq_fisher").kept_scope == "global"
    # TaCQ's scores are task-loss estimates, comparable across layers; the baselines' are not.
    assert HfQuantConfig(saliency="tacq").kept_scope == "global"
    assert HfQuantConfig(saliency="magnitude").kept_scope == "layer"
    assert HfQuantConfig(saliency="hessian").kept_scope == "layer"
    assert HfQuantConfig(saliency="tacq", kept_scope="layer").kept_scope == "layer"
    with pytest.raises(ValueError, match=r"kept_scope must be one of \['layer', 'global'\], got 'row'"):
        HfQuantConfig(kept_scope="row")
    assert HfQuantConfig(method="rtn", kept_fraction=0.01).needs_calibration
    assert not HfQuantConfig(method="rtn").needs_calibration
    config = HfQuantConfig(kept_fraction=0.005, task_dataset=["some code"])
    assert config.to_dict()["task_dataset"] == "custom (1 texts)"
    assert HfQuantConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_cli_outlier_flags(tiny_chat_model_dir, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(row) for row in QA), encoding="utf-8")
    out = tmp_path / "q"
    code = main(
        [
            "quantize", str(tiny_chat_model_dir), "--bits", "2", "--group-size", "32", "--method", "rtn",
            "--kept-fraction", "0.01", "--task-dataset", str(task), "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "tacq, global" in capsys.readouterr().out  # TaCQ ranks all layers together by default
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, DecoupledLinear)]
    total = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.num_kept for m in layers) == round(0.01 * total)
    assert model.config.quantization_config.task_dataset == str(task)
    assert model.config.quantization_config.kept_scope == "global"
