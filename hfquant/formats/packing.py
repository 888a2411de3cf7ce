"""Dense bit packing of small unsigned integers into int32 words.

Each row is one little-endian bit stream: value ``j`` occupies bits ``[j*bits, (j+1)*bits)``,
word ``k`` holds stream bits ``[32k, 32k+32)``. Rows are padded to a multiple of 32 values so
every width (3 bits included) fills whole words: 32 values take exactly ``bits`` words. For
2 and 4 bits this is the usual "16 (or 8) values per int32, lowest value in the lowest bits"
layout of GPTQ-style kernels.
"""

from __future__ import annotations

import torch

VALUES_PER_BLOCK = 32  # values per packing block; a block takes exactly ``bits`` int32 words


def packed_width(in_features: int, bits: int) -> int:
    """int32 words per row of ``in_features`` values."""
    return -(-in_features // VALUES_PER_BLOCK) * bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[rows, n]`` integers in ``[0, 2**bits)`` into ``[rows, packed_width(n, bits)]`` int32."""
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, n = values.shape
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    pad = -n % VALUES_PER_BLOCK
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
        words = (v.reshape(rows, -1, per_word) << shifts).sum(dim=-1)
    else:
        bit_index = torch.arange(bits, dtype=torch.int64, device=v.device)
        stream = (v.unsqueeze(-1) >> bit_index) & 1  # [rows, n, bits], stream order value-major
        stream = stream.reshape(rows, -1, 32)
        words = (stream << torch.arange(32, dtype=torch.int64, device=v.device)).sum(dim=-1)
    return _to_int32(words)


def unpack_int(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int`: ``[rows, words]`` int32 to ``[rows, n]`` uint8."""
    rows = packed.shape[0]
    if packed.shape[1] != packed_width(n, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[1]} words per row, expected {packed_width(n, bits)} "
            f"for {n} values of {bits} bits"
        )
    mask = 2**bits - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
        values = (packed.unsqueeze(-1) >> shifts) & mask
    else:
        bit_pos = torch.arange(32, dtype=torch.int32, device=packed.device)
        stream = (packed.unsqueeze(-1) >> bit_pos) & 1  # [rows, words, 32]
        stream = stream.reshape(rows, -1, bits)
        weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
        values = (stream * weights).sum(dim=-1)
    return values.reshape(rows, -1)[:, :n].to(torch.uint8)


def pack_int2(values: torch.Tensor) -> torch.Tensor:
    """2-bit packing: 16 values per int32."""
    return pack_int(values, 2)


def unpack_int2(packed: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_int(packed, 2, n)
