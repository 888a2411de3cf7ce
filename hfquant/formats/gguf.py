"""``GGUFLinear``: a weight stored as the blocks of one GGUF (llama.cpp) type, solved on its grid.

With ``HfQuantConfig(gguf_type=...)`` every quantized layer keeps exactly what that GGUF type
stores (see :class:`GGUFGrid` and :data:`GGUF_GRIDS`), so ``hfquant.export.save_gguf`` writes it
without requantizing and llama.cpp computes the weights hfquant optimized:

* ``qweight``: the unsigned integers ``q`` packed at the type's width (``q4_0``'s ``q - 8`` and
  ``q8_0``'s int8 ``q - 128`` are held offset, as unsigned values);
* ``d`` (float16 per block of 32, or per super-block of 256 for the K-quants);
* ``dmin`` (float16, same shape): ``q4_1``'s ``m``, the K-quants' ``dmin``; absent for tied zeros;
* ``sc`` / ``mn`` (int8 per sub-block): the K-quants' sub-block scale and min codes (``q3_k``'s
  signed, ``-32..31``, i.e. llama.cpp's 6-bit value minus 32; ``q6_k``'s signed 8-bit, as stored).

The grid they encode, ``scales`` and ``zeros`` per group (float32, ``d * sc``, ``-dmin * mn``, ...),
is kept beside them as non-persistent buffers: the forward reads it, and block-wise minimization
tunes it by name and hands the projected result back through :meth:`GGUFLinear.set_codes`.

Row widths a type cannot hold take llama.cpp's per-tensor fallback (``FALLBACK``, as
``llama-quantize`` does for widths not a multiple of 256: ``q2_k``/``q3_k`` -> ``q4_0``, ``q4_k`` ->
``q5_0``, ``q5_k`` -> ``q5_1``, ``q6_k`` -> ``q8_0``), and the layer is solved on the fallback's
grid; widths not a multiple of 32 are refused. A preset (``q2_k_m``, ``q3_k_s`` ... ``q5_k_m``:
:mod:`hfquant.formats.gguf_presets`) gives each layer its own type; a reloaded layer's type is read
from its tensors' shapes (:meth:`GGUFLinear.check_header`).
Departure from llama.cpp: ``q8_0`` may use the integer -128, which llama.cpp's quantizer never
writes but its format and kernels read like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfquant.algorithms.grid import dequantize_grid, num_groups
from hfquant.formats.base import CheckpointError, QuantizedLinear, TensorSpecs
from hfquant.formats.gguf_presets import (
    GGUF_PRESETS,
    LLAMA_QUANTIZE_NAMES,
    layer_config_for_type,
    preset_types,
)
from hfquant.formats.packing import pack_int, packed_width, unpack_int


@dataclass(frozen=True)
class GGUFGrid:
    """One GGUF block type as a grid ``w = s * q + z`` per group (the attributes
    :func:`hfquant.algorithms.gguf_grid.project` reads)."""

    name: str
    bits: int  # width of the integers q
    group_size: int  # columns per (s, z)
    block_size: int  # columns per float16 factor d
    offset: int | None  # tied zero z = -offset * s; None: free
    scale_codes: tuple[int, int] | None  # integer range of the sub-block scale codes (s = d * sc)
    min_codes: tuple[int, int] | None  # integer range of the sub-block min codes (z = -dmin * mn)

    @property
    def description(self) -> str:
        if self.scale_codes is None:
            zero = f"zero -{self.offset} * d" if self.offset is not None else "a float16 min"
            return f"{self.bits}-bit integers, a float16 scale d and {zero} per block of {self.block_size}"
        code_bits = (self.scale_codes[1] - self.scale_codes[0]).bit_length()
        mins = " and mins" if self.min_codes else ""
        return (
            f"{self.bits}-bit integers, {code_bits}-bit scale{mins} codes per sub-block of {self.group_size}, "
            f"float16 factors per super-block of {self.block_size}"
        )


GGUF_GRIDS = {
    "q4_0": GGUFGrid("q4_0", 4, 32, 32, 8, None, None),
    "q4_1": GGUFGrid("q4_1", 4, 32, 32, None, None, None),
    "q5_0": GGUFGrid("q5_0", 5, 32, 32, 16, None, None),
    "q5_1": GGUFGrid("q5_1", 5, 32, 32, None, None, None),
    "q8_0": GGUFGrid("q8_0", 8, 32, 32, 128, None, None),
    "q2_k": GGUFGrid("q2_k", 2, 16, 256, None, (0, 15), (0, 15)),
    "q3_k": GGUFGrid("q3_k", 3, 16, 256, 4, (-32, 31), None),
    "q4_k": GGUFGrid("q4_k", 4, 32, 256, None, (0, 63), (0, 63)),
    "q5_k": GGUFGrid("q5_k", 5, 32, 256, None, (0, 63), (0, 63)),
    "q6_k": GGUFGrid("q6_k", 6, 16, 256, 32, (-128, 127), None),
}
# The K-quants: super-blocks of 256 columns with integer-coded sub-block scales.
K_QUANTS = tuple(name for name, grid in GGUF_GRIDS.items() if grid.scale_codes is not None)
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp) for rows a 256-block type cannot hold.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def grid_for(gguf_type: str, in_features: int) -> GGUFGrid:
    """The grid a layer of ``in_features`` columns is stored on for ``gguf_type`` (with fallback)."""
    grid = GGUF_GRIDS[gguf_type]
    if in_features % grid.block_size:
        grid = GGUF_GRIDS[FALLBACK.get(gguf_type, gguf_type)]
    if in_features % grid.block_size:
        raise ValueError(
            f"gguf_type={gguf_type!r}: a layer with {in_features} input columns fits no GGUF block type "
            f"(blocks of {grid.block_size}); add it to modules_to_not_convert"
        )
    return grid


class GGUFLinear(QuantizedLinear):
    """Drop-in replacement of ``nn.Linear`` holding one GGUF type's blocks (see the module docstring)."""

    name = "gguf"
    tunable_grid = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        gguf_type: str,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        grid = grid_for(gguf_type, in_features)
        super().__init__(in_features, out_features, grid.bits, bias, dtype, device)
        self.grid = grid
        self.gguf_type = gguf_type
        self.group_size = self.grid.group_size
        for name, (dt, shape) in self._stored(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        shape = (out_features, num_groups(in_features, self.group_size))
        self.register_buffer("scales", torch.zeros(shape, device=device), persistent=False)
        self.register_buffer("zeros", torch.zeros(shape, device=device), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _stored(self, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        return _stored_tensors(self.grid, out_features, in_features)

    @property
    def grid_spec(self) -> GGUFGrid:
        """The grid block-wise minimization projects onto (the hook it looks for)."""
        return self.grid

    @classmethod
    def expected_tensors(cls, config: Any, out_features: int, in_features: int) -> TensorSpecs:
        grid = grid_for(config.gguf_type, in_features)
        names = {torch.int32: ("I32",), torch.float16: ("F16",), torch.int8: ("I8",)}
        return {n: (names[dt], shape) for n, (dt, shape) in _stored_tensors(grid, out_features, in_features).items()}

    @classmethod
    def check_header(cls, tensors: dict[str, Any], name: str, linear: nn.Linear, config: Any) -> dict[str, Any]:
        """Under a preset the layer's type is the one of the preset's types (fallbacks included)
        whose tensors have the stored shapes; then the usual checks, for that type."""
        if config.gguf_type not in GGUF_PRESETS:
            return {**super().check_header(tensors, name, linear, config), "gguf_type": config.gguf_type}
        out_f, in_f = linear.out_features, linear.in_features
        for gguf_type in preset_types(config.gguf_type):
            try:
                grid = grid_for(gguf_type, in_f)
            except ValueError:
                continue
            stored = _stored_tensors(grid, out_f, in_f)
            present = {s for s in _ALL_STORED if f"{name}.{s}" in tensors}
            if present == set(stored) and all(tuple(tensors[f"{name}.{s}"].shape) == shape for s, (_, shape) in stored.items()):
                layer = layer_config_for_type(config, gguf_type)
                return {**super().check_header(tensors, name, linear, layer), "gguf_type": gguf_type}
        raise CheckpointError(
            f"layer {name} stores none of the types of gguf_type={config.gguf_type!r} "
            f"({', '.join(preset_types(config.gguf_type))}, with their fallbacks) for {in_f} input columns"
        )

    @classmethod
    def skeleton(cls, linear: nn.Linear, config: Any, gguf_type: str | None = None) -> GGUFLinear:
        return cls(linear.in_features, linear.out_features, gguf_type or config.gguf_type, **cls._layout(linear))

    @classmethod
    def from_result(cls, result: Any, linear: nn.Linear, config: Any, kept: torch.Tensor | None = None) -> GGUFLinear:
        """Pack a solver's integers and take its codes (a ``BlockGridWeight`` of
        :mod:`hfquant.algorithms.gguf_grid`); GGUF has no kept weights."""
        if kept is not None and kept.any():
            raise ValueError("GGUF types store no kept 16-bit weights: use kept_fraction=0 with gguf_type")
        layout = {**cls._layout(linear), "device": result.qweight.device}
        module = cls(linear.in_features, linear.out_features, config.gguf_type, **layout)
        module.qweight.copy_(pack_int(result.qweight, module.bits))
        module.set_codes(result.codes)
        module._copy_bias(linear)
        return module

    @classmethod
    def storage_line(cls, config: Any) -> str:
        if config.gguf_type in GGUF_PRESETS:
            types = ", ".join(t for t in preset_types(config.gguf_type) if t != "q8_0")
            return (
                f"GGUF blocks of llama.cpp's {LLAMA_QUANTIZE_NAMES[config.gguf_type]} mix (per tensor {types} by role and block, "
                "q8_0 for the attention values and keys of 8-expert models, "
                "as llama-quantize chooses; the sub-block codes as int8), rows a type cannot hold in its fallback"
            )
        grid = GGUF_GRIDS[config.gguf_type]
        text = f"GGUF {grid.name} blocks ({grid.description}; the sub-block codes as int8)"
        if config.gguf_type in FALLBACK:
            text += f", rows not a multiple of {grid.block_size} as {FALLBACK[config.gguf_type]} as in llama.cpp"
        return text

    def set_codes(self, codes: Any) -> None:
        """Store ``codes`` (a ``BlockCodes``: ``d``, ``dmin``, ``sc``, ``mn``) and the grid they encode."""
        with torch.no_grad():
            for name in self._stored(self.out_features, self.in_features):
                if name != "qweight":
                    getattr(self, name).copy_(getattr(codes, name))
            self.refresh_grid()

    def refresh_grid(self) -> None:
        """Recompute ``scales`` and ``zeros`` from the stored codes (after loading or ``set_codes``)."""
        if self.d.is_meta:
            return
        g = self.grid
        per = g.block_size // g.group_size
        with torch.no_grad():
            d = self.d.float().repeat_interleave(per, dim=1)
            scales = d if g.scale_codes is None else d * self.sc.float()
            if g.offset is not None:
                zeros = -g.offset * scales
            elif g.min_codes is None:
                zeros = self.dmin.float()
            else:
                zeros = -(self.dmin.float().repeat_interleave(per, dim=1) * self.mn.float())
            self.scales.copy_(scales)
            self.zeros.copy_(zeros)

    def check_loaded(self, name: str) -> None:
        """Codes within their ranges; then the grid is recomputed from them."""
        g = self.grid
        for code, bounds in (("sc", g.scale_codes), ("mn", g.min_codes)):
            t = getattr(self, code, None)
            if bounds is not None and t.numel() and (int(t.min()) < bounds[0] or int(t.max()) > bounds[1]):
                raise CheckpointError(f"tensor {name}.{code} holds codes outside {list(bounds)} of {g.name}")
        self.refresh_grid()

    def integers(self) -> torch.Tensor:
        """The unpacked unsigned integers ``q`` (uint8 ``[out, in]``)."""
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat = scales * q + zeros``: in float32 the very values llama.cpp decodes."""
        w = dequantize_grid(self.integers(), self.scales, self.zeros, self.group_size)
        return w if dtype is None else w.to(dtype)

    def storage_bits(self) -> int:
        """Packed integers, float16 factors, int8 codes (the GGUF file packs codes into 4 or 6 bits)."""
        sizes = {torch.int32: 32, torch.float16: 16, torch.int8: 8}
        return sum(
            getattr(self, n).numel() * sizes[dt] for n, (dt, _) in self._stored(self.out_features, self.in_features).items()
        )

    def _extra_repr_fields(self) -> str:
        return f"gguf_type={self.grid.name}, "


def _refresh_after_load(module: GGUFLinear, _incompatible_keys: Any) -> None:
    """``load_state_dict`` (a resumed ``work_dir`` block) replaced the codes: rebuild the grid."""
    module.refresh_grid()


_ALL_STORED = ("qweight", "d", "dmin", "sc", "mn")


def _stored_tensors(grid: GGUFGrid, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """Name -> (dtype, shape) of what a layer stores on ``grid``."""
    factors = (out_features, in_features // grid.block_size)
    groups = (out_features, in_features // grid.group_size)
    out = {"qweight": (torch.int32, (out_features, packed_width(in_features, grid.bits))), "d": (torch.float16, factors)}
    if grid.offset is None:
        out["dmin"] = (torch.float16, factors)
    if grid.scale_codes is not None:
        out["sc"] = (torch.int8, groups)
    if grid.min_codes is not None:
        out["mn"] = (torch.int8, groups)
    return out
