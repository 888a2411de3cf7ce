import pytest
import torch

from hfquant.formats.packing import pack_int, pack_int2, packed_width, unpack_int, unpack_int2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 200, 576])
def test_round_trip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 2**bits, (7, n), generator=g, dtype=torch.uint8)
    packed = pack_int(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_width(n, bits))
    assert torch.equal(unpack_int(packed, bits, n), values)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense(bits):
    # 32 values take exactly `bits` words: no padding bits between values.
    assert packed_width(576, bits) * 32 == 576 * bits


def test_int2_layout_is_sixteen_per_word():
    values = torch.tensor([[1, 2, 3, 0] * 8], dtype=torch.uint8)
    words = pack_int2(values)
    expected = sum(int(v) << (2 * i) for i, v in enumerate(values[0, :16]))
    assert words.shape == (1, 2)
    assert int(words[0, 0]) & 0xFFFFFFFF == expected
    assert torch.equal(unpack_int2(words, 32), values)


def test_extreme_values_use_the_sign_bit():
    values = torch.full((2, 32), 3, dtype=torch.uint8)
    packed = pack_int(values, 2)
    assert int(packed[0, 0]) == -1  # all 32 bits set
    assert torch.equal(unpack_int(packed, 2, 32), values)


def test_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"values must lie in \[0, 3\]"):
        pack_int(torch.tensor([[4]]), 2)


def test_wrong_width_rejected():
    with pytest.raises(ValueError, match="has 3 words per row, expected 4"):
        unpack_int(torch.zeros(1, 3, dtype=torch.int32), 2, 64)
