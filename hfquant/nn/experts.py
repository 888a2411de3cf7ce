"""Mixture-of-experts layers: fused 3D expert weights as one ``nn.Linear`` per expert.

transformers stores the experts of an MoE block (Qwen3-MoE, Mixtral, DeepSeek, gpt-oss, ...) as 3D
parameters of one module, ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` of shape
``[experts, out, in]`` (``[experts, in, out]`` where the class is ``is_transposed``), declared with
``@use_experts_implementation``, whose flags (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``) and ``_apply_gate`` say how they are applied. No ``nn.Linear`` holds
them, so left alone they would stay in full precision: most of an MoE model's weights.

:func:`unfuse_experts` replaces each such module by :class:`ExpertLinears`, which holds the same
weights as one linear per expert and projection (``nn.ModuleList``) and computes the same
function, under names that transformers' weight conversions for these models do not match (they
rewrite ``.experts.gate_up_proj`` and ``.experts.down_proj`` keys when saving): ``gate_up[e]``
(``up[e]`` for ungated experts) and ``down[e]``. Everything hfquant does to a linear then applies per expert: the Hessian of an expert's
linear is collected from the tokens routed to it (its forward pre-hook sees only those), each is
solved and stored in the config's format, block-wise minimization and end-to-end tuning reach its
grid, and a checkpoint names its tensors ``...experts.gate_up.<e>.qweight``. Loading such a
checkpoint unfuses the skeleton the same way before the tensors are read. This is what GPTQModel
and AutoRound do for these models; the forward loops over the experts a batch routes to (the eager
implementation), whatever ``config._experts_implementation`` says.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hfquant.nn.replace import is_skipped, set_module

# What @use_experts_implementation sets on every instance of a fused experts class.
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module holding 3D expert weights."""
    down = module._parameters.get("down_proj")
    return all(hasattr(module, flag) for flag in _FLAGS) and down is not None and down.dim() == 3


class ExpertLinears(nn.Module):
    """The experts of one MoE layer as ``nn.Linear`` modules: ``gate_up[e]`` (``up[e]`` for ungated
    experts) and ``down[e]``. Built from a fused experts module by :meth:`from_fused`;
    called like it, ``(hidden_states [tokens, hidden], top_k_index, top_k_weights [tokens, k])``."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        # Plain attributes: the flags, and what the class's gate reads (gpt-oss's alpha and limit, ...).
        for name, value in vars(fused).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self._fused_class = type(fused)
        self.calibrate_all = False
        self.up_name = "gate_up" if fused.has_gate else "up"
        self.num_experts = fused._parameters["down_proj"].shape[0]
        for name, child in fused.named_children():  # act_fn, post_expert_norm
            self.add_module(name, child)
        for name, buffer in fused.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> ExpertLinears:
        """Split ``fused``'s 3D weights (and biases) into one linear per expert and projection (copies:
        the linears own their weights, so each can be replaced and saved on its own)."""
        names = {"up_proj", "gate_up_proj", "down_proj", "up_proj_bias", "gate_up_proj_bias", "down_proj_bias"}
        unknown = sorted(set(fused._parameters) - names)
        if unknown:
            raise ValueError(
                f"{type(fused).__name__} holds parameters {unknown} besides the expert weights and biases, "
                "which hfquant does not know how to apply; exclude the experts with modules_to_not_convert"
            )
        module = cls(fused)
        fused_up = "gate_up_proj" if fused.has_gate else "up_proj"
        for projection, fused_name in ((module.up_name, fused_up), ("down", "down_proj")):
            weight = fused._parameters[fused_name]
            bias = fused._parameters.get(f"{fused_name}_bias") if fused.has_bias else None
            linears = nn.ModuleList()
            for e in range(module.num_experts):
                w = weight.data[e].T if fused.is_transposed else weight.data[e]
                linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")  # no init
                linear.weight = nn.Parameter(w.clone(), requires_grad=weight.requires_grad)
                if bias is not None:
                    linear.bias = nn.Parameter(bias.data[e].clone(), requires_grad=bias.requires_grad)
                linears.append(linear)
            module.add_module(projection, linears)
        return module

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        return self._fused_class._apply_gate(self, gate_up_out)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        experts = range(self.num_experts) if self.calibrate_all else top_k_index.unique().tolist()
        for e in experts:
            if e >= self.num_experts:  # expert-parallel sentinel: not this rank's expert
                continue
            token_idx, slot = torch.where(top_k_index == e)
            if self.calibrate_all:
                h = self._expert(e, hidden_states)[token_idx]
            else:
                h = self._expert(e, hidden_states[token_idx])
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to the tokens ``x``."""
        h = getattr(self, self.up_name)[e](x)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = self.down[e](h)
        return self.post_expert_norm(h) if self.has_post_expert_norm else h

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, from={self._fused_class.__name__}"


@contextmanager
def all_experts_calibrated(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every :class:`ExpertLinears` under ``module`` runs all its experts on every token while the
    context is open (``calibrate_all_experts``); nothing changes when ``enabled`` is false."""
    layers = [m for m in module.modules() if isinstance(m, ExpertLinears)] if enabled else []
    for layer in layers:
        layer.calibrate_all = True
    try:
        yield
    finally:
        for layer in layers:
            layer.calibrate_all = False


def unfuse_experts(model: nn.Module, modules_to_not_convert: list[str], skeleton: bool = False) -> list[str]:
    """Replace every fused experts module that is not skipped by :class:`ExpertLinears`, in place;
    return their names. Their weights must be in memory, unless ``skeleton`` (a model about to load
    a checkpoint, on the meta device)."""
    names = [
        name
        for name, module in model.named_modules()
        if is_fused_experts(module) and not is_skipped(name, modules_to_not_convert)
    ]
    for name in names:
        fused = model.get_submodule(name)
        if not skeleton and any(p.device.type == "meta" for p in fused.parameters()):
            raise ValueError(
                f"{name} is offloaded by accelerate: hfquant splits MoE experts into linears before "
                "quantizing, which needs their weights in memory; load the model without offloading"
            )
        set_module(model, name, ExpertLinears.from_fused(fused))
    return names
