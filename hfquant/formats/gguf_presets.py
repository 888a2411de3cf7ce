"""llama.cpp's per-tensor type mixes: ``llama-quantize``'s K-quant file types ``Q2_K``, ``Q3_K_S``,
``Q3_K_M``, ``Q3_K_L``, ``Q4_K_S``, ``Q4_K_M``, ``Q5_K_S`` and ``Q5_K_M``.

A preset gives most linear weights its base K-quant and a few tensors more bits, by their role and
block: the attention value projection and the tensors llama.cpp counts with it (``attn_v``: the
fused ``attn_qkv`` and MLA's ``attn_kv_b`` too), the attention output (``attn_output``) and the
feed-forward down projection (``ffn_down``, MoE experts' included), as ``llama_tensor_get_type_impl``
in llama.cpp's ``src/llama-quant.cpp`` decides (``use_more_bits``: the first and last eighth of the
blocks and every third block between); the ``_S`` files bump only a few (``Q4_K_S``: the first four
``attn_v`` and the first eighth of ``ffn_down`` to Q5_K; ``Q3_K_S`` and ``Q5_K_S``: none on a dense
model), ``Q3_K_L`` all of ``attn_v``, ``attn_output`` and ``ffn_down`` to Q5_K. Models of exactly 8
experts (Mixtral 8x7B, 8x22B) get llama.cpp's bumps on top: ``attn_v`` and ``attn_k`` to ``Q8_0``,
``attn_output`` to ``Q5_K`` in ``Q2_K``, ``Q3_K_S``, ``Q3_K_M``, ``Q4_K_S`` and ``Q4_K_M`` (not in
``Q3_K_L``, whose attention output then stays Q3_K). :func:`layer_type` applies those rules to one weight; the type's
row-width fallback (``hfquant.formats.gguf.FALLBACK``) comes after, as in ``llama-quantize``.
The rules are those of the llama.cpp the tests build (llama-cpp-python 0.3.36's), checked tensor
for tensor against its ``llama-quantize`` on dense models (grouped-query ratios 1, 2 and 4), a
4-expert and an 8-expert model.

``q2_k_m`` is llama-quantize's ``Q2_K`` file type: llama.cpp names that mix like the block type
(its attention values in Q3_K, or Q4_K where 4 or more query heads share a key/value head, its
attention output and down projections in Q3_K); here ``q2_k`` stays the plain block type, so that a
checkpoint solved on it keeps its meaning, and the mix takes its siblings' ``_m``. ``Q2_K_S`` is
not offered: llama-quantize makes it only with an importance matrix.

Departures from llama.cpp: the 70B-specific ``attn_v`` bump and Falcon's ``ffn_down`` schedule are
not applied, and a weight's role is read from its name (:data:`ROLE_SUFFIXES`, the Hugging Face and
GGUF names of common architectures) rather than from llama.cpp's tensor categories, so a
projection under another name keeps the base type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

# Preset -> its base type (what every weight without a rule gets).
GGUF_PRESETS = {
    "q2_k_m": "q2_k",
    "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k",
    "q5_k_s": "q5_k", "q5_k_m": "q5_k",
}  # fmt: skip
# Preset -> the name llama-quantize gives that file type (its own for all but q2_k_m, see above).
LLAMA_QUANTIZE_NAMES = {preset: preset.upper() for preset in GGUF_PRESETS} | {"q2_k_m": "Q2_K"}

# Role -> dotted name endings that carry it (Hugging Face module names and GGUF tensor names).
ROLE_SUFFIXES = {
    # with what llama.cpp counts as value-like: fused qkv and MLA's kv_b (its category_is_attn_v)
    "attn_v": ("v_proj", "attn_v", "self_attention.value", "attention.value",
               "qkv_proj", "attn_qkv", "query_key_value", "c_attn", "Wqkv", "kv_b_proj", "attn_kv_b"),
    "attn_k": ("k_proj", "attn_k", "self_attention.key", "attention.key"),
    "attn_output": ("o_proj", "attn_output", "out_proj", "attn.c_proj", "attention.dense", "self_attention.dense"),
    # MoE experts too, as llama.cpp counts them (its category is every name holding "ffn_down"): hfquant's
    # split experts.down.3, llama.cpp's ffn_down_exps and shared experts' ffn_down_shexp
    "ffn_down": ("down_proj", "ffn_down", "fc2", "w2", "dense_4h_to_h", "mlp.c_proj", "experts.down", "ffn_down_exps",
                 "ffn_down_shexp"),
}


def tensor_role(name: str) -> str | None:
    """The role of the weight ``name`` (``"model.layers.3.self_attn.v_proj"``,
    ``"blk.3.attn_v.weight"``, an expert's ``"model.layers.3.mlp.experts.down.5"``) among
    :data:`ROLE_SUFFIXES`, or None."""
    stem = name.removesuffix(".weight")
    head, _, last = stem.rpartition(".")
    if last.isdecimal():  # one expert of a list
        stem = head
    for role, suffixes in ROLE_SUFFIXES.items():
        if any(stem == s or stem.endswith("." + s) for s in suffixes):
            return role
    return None


def block_index(name: str) -> int | None:
    """The decoder block a weight belongs to: the first all-digit part of its dotted name."""
    return next((int(part) for part in name.split(".") if part.isdecimal()), None)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expert_count(config: Any) -> int:
    """The number of routed experts of a Transformers model config (0 for a dense model), under the
    names llama.cpp's converter reads for its ``expert_count`` (DeepSeek's ``n_routed_experts`` too)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(n := getattr(config, key, None), int):
            return n
    return 0


def query_groups(config: Any) -> int:
    """Query heads per key/value head of a Transformers model config (llama.cpp's ``n_gqa``; 1 without
    grouped-query attention or when the config names no head counts)."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or kv_heads <= 0:
        return 1
    return max(heads // kv_heads, 1)


@dataclass(frozen=True)
class MixShape:
    """What llama.cpp's mix rules read of a model besides a weight's name: its number of decoder
    blocks, of routed experts (0: dense) and of query heads per key/value head."""

    n_blocks: int
    n_experts: int = 0
    n_gqa: int = 1

    @classmethod
    def of(cls, config: Any, n_blocks: int) -> MixShape:
        """The shape of a model of ``n_blocks`` blocks with the Transformers config ``config``."""
        return cls(n_blocks, expert_count(config), query_groups(config))


def layer_type(gguf_type: str, name: str, shape: MixShape) -> str:
    """The GGUF type the weight ``name`` (in block ``i`` of a model of ``shape``) gets under
    ``gguf_type``: a single type is returned as it is; a preset applies llama.cpp's rules (before
    any fallback)."""
    base = GGUF_PRESETS.get(gguf_type)
    if base is None:
        return gguf_type
    role, i = tensor_role(name), block_index(name)
    if role is None or i is None:
        return base
    eight = shape.n_experts == 8  # llama.cpp's bumps for Mixtral-like models
    n = shape.n_blocks
    if role == "attn_v":
        if eight:
            return "q8_0"
        if gguf_type == "q2_k_m":
            return "q4_k" if shape.n_gqa >= 4 else "q3_k"
        if gguf_type == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if gguf_type == "q3_k_l":
            return "q5_k"
        if gguf_type == "q4_k_s":
            return "q5_k" if i < 4 else base
        if gguf_type in ("q4_k_m", "q5_k_m"):
            return "q6_k" if _use_more_bits(i, n) else base
        return base
    if role == "attn_k":
        return "q8_0" if eight else base
    if role == "attn_output":
        if eight:  # llama.cpp lists the files whose 8-expert attention output is Q5_K (not Q3_K_L)
            return "q5_k" if gguf_type in ("q2_k_m", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else base
        return {"q2_k_m": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(gguf_type, base)
    # ffn_down
    if gguf_type == "q2_k_m":
        return "q3_k"
    if gguf_type == "q3_k_m":
        return "q5_k" if i < n // 16 else "q4_k"
    if gguf_type == "q3_k_l":
        return "q5_k"
    if gguf_type == "q4_k_s":
        return "q5_k" if i < n // 8 else base
    if gguf_type in ("q4_k_m", "q5_k_m"):
        return "q6_k" if _use_more_bits(i, n) else base
    return base


def preset_types(gguf_type: str) -> tuple[str, ...]:
    """Every type ``layer_type`` can give under ``gguf_type`` (before fallbacks), ``q8_0`` for the
    value and key projections of 8-expert models included."""
    return {
        "q2_k_m": ("q2_k", "q3_k", "q4_k", "q5_k", "q8_0"),
        "q3_k_s": ("q3_k", "q5_k", "q8_0"),
        "q3_k_m": ("q3_k", "q4_k", "q5_k", "q8_0"),
        "q3_k_l": ("q3_k", "q5_k", "q8_0"),
        "q4_k_s": ("q4_k", "q5_k", "q8_0"),
        "q4_k_m": ("q4_k", "q5_k", "q6_k", "q8_0"),
        "q5_k_s": ("q5_k", "q8_0"),
        "q5_k_m": ("q5_k", "q6_k", "q8_0"),
    }.get(gguf_type, (gguf_type,))


def layer_config(config: Any, name: str, shape: MixShape) -> Any:
    """``config`` as it applies to the weight ``name`` of a model of ``shape``: under a preset, a copy
    whose ``gguf_type`` is that weight's own type (what the solver and the format read); otherwise
    ``config`` itself."""
    gguf_type = getattr(config, "gguf_type", None)
    if gguf_type not in GGUF_PRESETS:
        return config
    return layer_config_for_type(config, layer_type(gguf_type, name, shape))


def layer_config_for_type(config: Any, gguf_type: str) -> Any:
    """A copy of ``config`` with ``gguf_type`` set to one weight's type."""
    out = copy.copy(config)
    out.gguf_type = gguf_type
    return out
