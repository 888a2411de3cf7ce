"""Block-wise minimization: tune a quantized block's float parameters to match its full-precision output.

With the integers frozen, the block's scales, zeros and normalization weights are trained with
Adam so that ``block_q(x)`` matches ``block_fp(x)`` on the calibration inputs. The per-layer
solves each see one layer; this step sees the whole block (attention softmax, SiLU gates,
residuals) and corrects the errors the layers make together.

Steps are relative: ``scales = s0 * (1 + a)``, ``zeros = z0 + s0 * b``, ``norm = n0 * (1 + c)``
with ``a, b, c`` trained from zero, so one learning rate suits layers of any magnitude (Adam's
step is about ``lr`` per coordinate whatever the gradient's scale). After each epoch the
candidate is rounded to its 16-bit storage values and scored; the best state seen, the starting
one included, is kept. Scored on the training batches (the default), the block loss never
increases; scored on held-out ``validation`` batches, the kept epoch is the one that generalizes
best to windows the training never saw (early stopping; AutoRound and the decoupleQ paper keep
the best training-loss state instead).

A quantized module with a ``grid_spec`` (a GGUF block type, :mod:`hfquant.formats.gguf`) stores
its grid as codes: its candidate is projected onto that type's values
(:func:`hfquant.algorithms.gguf_grid.project`) in place of the 16-bit rounding, so it too is
scored as stored, and the kept state's codes are handed back through its ``set_codes``.
Training itself steps the unprojected grid.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.algorithms.block import Batches, batch_loss, block_error, train_keep_best
from hfquant.algorithms.gguf_grid import BlockCodes, GridSpec, project

GRID = ("scales", "zeros")


def trainable_float_parameters(
    block: nn.Module, grids: set[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name -> (starting value, unit of a relative step) for every float tensor block-wise tunes:
    the ``scales`` and ``zeros`` of the submodules named in ``grids``, and normalization weights."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if name in grids:
            scales = module.scales.detach().clone()
            found[prefix + "scales"] = (scales, scales)
            found[prefix + "zeros"] = (module.zeros.detach().clone(), scales)
        elif "norm" in type(module).__name__.lower() and isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            weight = module.weight.detach().clone()
            found[prefix + "weight"] = (weight, weight)
    return found


def relative_values(
    start: dict[str, tuple[torch.Tensor, torch.Tensor]],
    deltas: dict[str, torch.Tensor],
    storage_dtype: torch.dtype | None,
    typed: dict[str, GridSpec] | None = None,
) -> dict[str, torch.Tensor]:
    """Start plus relative step; grid tensors rounded through ``storage_dtype`` when given, except
    those of the ``typed`` modules (prefix -> GGUF grid spec), which :func:`project_typed_grids` stores."""
    values = {}
    for name, (value, unit) in start.items():
        new = value + unit * deltas[name]
        if storage_dtype is not None and name.endswith(GRID) and not name.startswith(tuple(typed or ())):
            new = new.to(storage_dtype).to(value.dtype)
        values[name] = new
    return values


def typed_grids(block: nn.Module, grids: set[str]) -> dict[str, GridSpec]:
    """Prefix (``"mlp.down_proj."``) -> grid spec of the modules in ``grids`` stored on a GGUF type."""
    return {
        f"{name}.": module.grid_spec
        for name, module in block.named_modules()
        if name in grids and getattr(module, "grid_spec", None) is not None
    }


def project_typed_grids(values: dict[str, torch.Tensor], typed: dict[str, GridSpec]) -> dict[str, BlockCodes]:
    """Replace the typed modules' grids in ``values`` by the values their type stores; return the codes."""
    codes = {}
    for prefix, spec in typed.items():
        stored = project(spec, values[prefix + "scales"], values[prefix + "zeros"])
        values[prefix + "scales"], values[prefix + "zeros"] = stored.scales, stored.zeros
        codes[prefix] = stored
    return codes


def block_minimize(
    block: nn.Module,
    batches: Batches,
    targets: list[torch.Tensor],
    grids: set[str],
    epochs: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    storage_dtype: torch.dtype = torch.float16,
    validation: tuple[Batches, list[torch.Tensor]] | None = None,
) -> float:
    """Train the block's float parameters in place; return the score (MSE) of the kept state.

    ``grids`` names the quantized submodules whose ``scales`` and ``zeros`` are tuned;
    ``storage_dtype`` is what those are saved in, so each epoch's candidate is scored as stored.
    ``validation`` (batches, targets), when given, is what each candidate is scored on, never
    trained on.
    """
    scored_batches, scored_targets = validation or (batches, targets)
    start = trainable_float_parameters(block, grids)
    if not start or epochs == 0:
        return block_error(block, scored_batches, scored_targets, {n: v for n, (v, _) in start.items()})
    deltas = {n: torch.zeros_like(v, dtype=torch.float32, requires_grad=True) for n, (v, _) in start.items()}
    typed = typed_grids(block, grids)

    def evaluate() -> tuple[float, tuple[dict[str, torch.Tensor], dict[str, BlockCodes]]]:
        candidate = relative_values(start, deltas, storage_dtype, typed)
        codes = project_typed_grids(candidate, typed)
        return block_error(block, scored_batches, scored_targets, candidate), (candidate, codes)

    best, (best_values, best_codes) = train_keep_best(
        torch.optim.Adam(list(deltas.values()), lr=lr),
        lambda i: batch_loss(block, *batches[i], targets[i], relative_values(start, deltas, None)),
        len(batches),
        epochs,
        evaluate,
        seed,
    )
    with torch.no_grad():
        for name, value in best_values.items():
            target = block.get_parameter(name) if name.endswith("weight") else block.get_buffer(name)
            target.copy_(value)
        for prefix, codes in best_codes.items():
            block.get_submodule(prefix[:-1]).set_codes(codes)
    return best
