import pytest
import torch
from helpers import decoupled_layer

from hfquant.algorithms.grid import dequantize_grid, num_groups


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_forward_equals_dense_matmul(bits, group_size):
    _, module = decoupled_layer(bits, group_size, kept=5)
    x = torch.randn(3, 5, 200)
    expected = x @ module.dequantize().T + module.bias
    # 15 rows take the C++ kernel where it builds: float32 sums in another order, errors within 1e-5
    # of the output's scale (tests/test_kernels.py checks the kernels against a float64 reference).
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_ragged_last_group():
    # 576 columns in groups of 128: four full groups and one of 64.
    _, module = decoupled_layer(2, 128, in_f=576)
    assert module.scales.shape == (48, num_groups(576, 128)) == (48, 5)


def test_dequantize_is_grid_plus_kept_weights():
    _, module = decoupled_layer(2, 64, kept=7)
    base = dequantize_grid(module.integers(), module.scales, module.zeros, 64)
    delta = module.dequantize() - base
    rows, cols = module.outlier_rows.long(), module.outlier_cols.long()
    expected = torch.zeros_like(base).index_put((rows, cols), module.outlier_values.float(), accumulate=True)
    torch.testing.assert_close(delta, expected)


def test_forward_in_input_dtype():
    _, module = decoupled_layer(4, 64)
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16


def test_rtn_error_shrinks_with_bits():
    errors = []
    for bits in (2, 3, 4):
        weight, module = decoupled_layer(bits, 64, bias=False)
        errors.append(float((module.dequantize() - weight).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    # 4-bit min-max RTN of Gaussian weights: relative error a few percent, not more.
    assert errors[2] < 0.01


def test_storage_bits_counts_everything():
    _, module = decoupled_layer(2, 64, in_f=576, out_f=64, kept=10)
    ints = 64 * 576 * 2
    grid = 2 * 64 * 9 * 16
    sparse = 10 * (16 + 32 + 32)
    assert module.storage_bits() == ints + grid + sparse
