"""SplitQuant: the k-means split is exact before quantization, each cluster gets its own narrow grid,
and split layers save, reload and refuse bad checkpoints like every hfquant layer."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_TEXTS, make_problem
from transformers import AutoModelForCausalLM

from hfquant import HfQuantConfig
from hfquant.algorithms.decoupleq import decoupleq_quantize
from hfquant.algorithms.gptq import gptq_quantize, masked_minmax_grid
from hfquant.algorithms.grid import cluster_grid, expand_groups, index_bits, layer_objective
from hfquant.algorithms.rtn import rtn_quantize
from hfquant.algorithms.splitquant import (
    cluster_weights,
    kmeans_1d,
    split_linear,
    split_minmax_grid,
    split_quantize,
)
from hfquant.nn import SplitLinear


def _outlier_weights(out_features: int = 24, in_features: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    spots = torch.rand(w.shape, generator=g) < 0.02
    return torch.where(spots, w.sign() * (0.2 + torch.rand(w.shape, generator=g) * 0.3), w)


def test_split_linear_computes_the_same_function():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 24)
    with torch.no_grad():
        linear.weight.copy_(_outlier_weights())
    parts = split_linear(linear, 3)
    x = torch.randn(5, 7, 96)
    with torch.no_grad():
        torch.testing.assert_close(sum(p(x) for p in parts), linear(x), rtol=0, atol=1e-6)
    # Parts are disjoint value intervals, lower to upper, and together hold every weight.
    nonzero = [p.weight.detach()[p.weight != 0] for p in parts]
    assert sum(v.numel() for v in nonzero) == int((linear.weight != 0).sum())
    assert float(nonzero[0].max()) < float(nonzero[1].min()) and float(nonzero[1].max()) < float(nonzero[2].min())
    assert all(p.bias.count_nonzero() > 0 for p in parts)


def test_kmeans_is_a_deterministic_lloyd_fixed_point():
    w = _outlier_weights(seed=1)
    bounds = kmeans_1d(w, 3)
    assert torch.equal(bounds, kmeans_1d(w, 3))
    cluster = cluster_weights(w, 3)
    means = torch.stack([w[cluster == c].mean() for c in range(3)])
    torch.testing.assert_close(bounds, (means[1:] + means[:-1]) / 2, rtol=1e-5, atol=1e-7)
    # The middle cluster holds the bulk; the outliers sit in the outer ones.
    counts = torch.bincount(cluster.flatten().long(), minlength=3)
    assert counts[1] > counts[0] + counts[2]


def _module(split, group_size: int) -> SplitLinear:
    out_f, in_f = split.qweight.shape
    config = HfQuantConfig(bits=2, group_size=group_size, method="rtn", split_clusters=split.scales.shape[0])
    return SplitLinear.from_result(split, torch.nn.Linear(in_f, out_f, bias=False), config)


@pytest.mark.parametrize("group_size", [32, -1, 0])
def test_each_cluster_gets_its_own_narrow_grid(group_size):
    w = _outlier_weights(seed=2)
    cluster = cluster_weights(w, 3)
    scales, zeros = split_minmax_grid(w, cluster, 3, 2, group_size)
    unsplit, _ = masked_minmax_grid(w, 2, group_size)
    for c in range(3):
        # Where cluster c spans a range (2+ weights; a lone weight gets scale 1, exact with Q = 0),
        # its grid is never wider than the unsplit one.
        present = _present(cluster == c, group_size)
        assert bool((scales[c][present] <= unsplit.expand_as(present)[present] * (1 + 1e-3)).all())
    # The bulk of the weights (the middle cluster) gets a far finer grid than the unsplit layer.
    assert float(scales[1][_present(cluster == 1, group_size)].mean()) < 0.5 * float(unsplit.mean())
    split = split_quantize(w, None, 2, group_size, 3, method="rtn")
    module = _module(split, group_size)
    # Stored form = the sum of k quantized layers, each zero outside its cluster.
    planes = sum(
        torch.where(
            cluster == c,
            split.qweight.float() * expand_groups(scales[c], 96, group_size) + expand_groups(zeros[c], 96, group_size),
            torch.zeros(()),
        )
        for c in range(3)
    )
    torch.testing.assert_close(module.dequantize(torch.float32), planes)
    # Round to nearest on the weight's own cluster grid: off by at most half that grid's step.
    step, _ = cluster_grid(scales, zeros, cluster, group_size)
    assert bool(((planes - w).abs() <= step / 2 * (1 + 1e-2) + 1e-6).all())


def _present(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Whether each (row, group) of the grid holds two or more weights of ``mask``."""
    if group_size == 0:
        return (mask.sum() >= 2).reshape(1, 1)
    gs = mask.shape[1] if group_size == -1 else group_size
    return mask.reshape(mask.shape[0], -1, gs).sum(dim=2) >= 2


@pytest.mark.parametrize("bits", [2, 3])
def test_split_lowers_the_layer_error_of_every_method(bits):
    w, h = make_problem(24, 96, seed=bits)
    w = w + _outlier_weights(seed=bits) * 10 * (w.abs().mean() / 0.02)
    objective = {}
    for method, unsplit in (
        ("rtn", rtn_quantize(w, bits, 32)),
        ("gptq", gptq_quantize(w, h, bits, 32)),
        ("decoupleq", decoupleq_quantize(w, h, bits, 32)),
    ):
        split = split_quantize(w, h, bits, 32, 3, method=method)
        assert split.qweight.dtype == torch.uint8 and int(split.qweight.max()) <= 2**bits - 1
        objective[method] = layer_objective(w, split.dequantize(32), h)
        assert objective[method] < layer_objective(w, unsplit.dequantize(32), h)
    assert objective["decoupleq"] <= objective["gptq"] < objective["rtn"]


def test_storage_counts_indices_and_every_grid():
    split = split_quantize(_outlier_weights(), None, 2, 32, 3, method="rtn")
    module = _module(split, 32)
    assert index_bits(3) == 2 and index_bits(2) == 1 and index_bits(5) == 3
    # 2 integer bits + 2 index bits per weight + 3 (scale, zero) pairs of 16 bits per 32 weights.
    assert module.storage_bits() == 24 * 96 * (2 + 2) + 3 * 2 * 16 * 24 * 3


def test_split_decoupleq_end_to_end(tiny_tokenized_dir):
    config = HfQuantConfig(
        bits=2, group_size=-1, method="decoupleq", split_clusters=3, dataset=TINY_TEXTS, nsamples=4, seqlen=32,
        decoupleq_iters=0, blockwise_epochs=1, blockwise_batch_size=2,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_tokenized_dir, quantization_config=config)
    assert all(b.error_after <= b.error_before * (1 + 1e-6) for b in model.hf_quantizer.report.blocks)
    assert all(isinstance(m, SplitLinear) for m in (model.model.layers[0].mlp.up_proj, model.model.layers[1].self_attn.q_proj))
