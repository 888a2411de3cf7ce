"""LoRA on a 2/3-bit base: how much of the task loss that quantization costs does an adapter win back?

    python benchmarks/finetune.py --configs w2g64,w3g64 --steps 200 --threads 2
    python benchmarks/finetune.py --task code --configs w2g64 --checkpoint w2g64=DIR --steps 150
    python benchmarks/finetune.py --configs w3g64 --tacq          # also TaCQ kept weights at equal bits
    python benchmarks/finetune.py --task code --init peft,scaled-error   # adapters started at the quantization error

Tasks (``--task``):

* ``facts``: hfquant's facts questions (``hfquant/tasks/facts.jsonl``), chat-formatted, loss on the
  answer tokens only, split once (seeded) into training and held-out questions. Held-out facts are
  knowledge the adapter never sees: it can teach the answer format, not the facts a quantized
  base has lost.
* ``code``: Python. The held-out windows are the yardstick's ``python-code`` windows (the first
  ``--holdout`` 512-token windows of the stdlib in the yardstick's fixed order); training windows are
  drawn (seeded) from the stdlib files after them, so no held-out file is trained on. A skill whose
  examples the adapter does see: QLoRA's use case.

For each config the default model is quantized (or a saved checkpoint loaded), then scored on the
held-out examples before and after the same LoRA training (PEFT on every projection, AdamW, a fixed
number of steps over shuffled batches), beside the full-precision model before and after that
training. ``gap closed`` is the share of the quantization's held-out loss gap that LoRA closes,
judged against full precision trained the same way: ``1 - (loss_q+lora - loss_fp+lora) / (loss_q -
loss_fp)`` (the issue's goal: at least 50%). Measured against the untrained full-precision model
instead, an adapter that only learns the task's format would count as recovery. With ``--tacq``,
TaCQ kept 16-bit weights chosen on the training examples are added at the adapter's extra bits per
weight (each kept weight costs its value and two int32 indices). ``--init`` compares adapter
initializations (:func:`hfquant.lora.init_from_quantization_error`), a LoRA row each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch
from _common import (
    add_common_arguments,
    append_results,
    load_default,
    machine_line,
    parse_config,
    parse_settings,
    print_table,
    setup,
)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

import hfquant.lora
from hfquant import HfQuantConfig
from hfquant.calibration import tokenize_texts
from hfquant.corpora import heldout_domain
from hfquant.task_data import IGNORE, TaskBatch, batches_from_ids, task_batches
from hfquant.tasks import TASKS_DIR

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEPT_WEIGHT_BITS = 16 + 32 + 32  # value, row and column index (DecoupledLinear.storage_bits)


def facts_split(holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) facts as chat rows, a seeded shuffle of ``facts.jsonl``."""
    rows = [json.loads(line) for line in (TASKS_DIR / "facts.jsonl").read_text().splitlines() if line.strip()]
    chats = [{"question": r["question"], "answer": r["answers"][0]} for r in rows]
    random.Random(seed).shuffle(chats)
    if not 0 < holdout < len(chats):
        raise SystemExit(f"--holdout must be between 1 and {len(chats) - 1}, got {holdout}")
    return chats[holdout:], chats[:holdout]


def code_split(
    tokenizer, holdout: int, train: int, seed: int, train_seqlen: int, seqlen: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows of the stdlib: held-out = the first ``holdout`` ``seqlen``-token
    windows of the yardstick's ``python-code`` stream; training = ``train`` seeded random
    ``train_seqlen``-token windows of the files that come after the last held-out one."""
    docs = heldout_domain("python-code")
    heldout = tokenize_texts(docs[:1], tokenizer)
    used = 1
    while len(heldout) < holdout * seqlen:  # the yardstick's stream: documents joined at blank lines
        used += 1
        heldout = tokenize_texts(docs[:used], tokenizer)
    heldout = heldout[: holdout * seqlen].view(holdout, seqlen)
    end, chars = used, 0
    while end < len(docs) and chars < 16 * train * train_seqlen:  # ~4 characters per token: 4x the windows' tokens
        chars, end = chars + len(docs[end]), end + 1
    rest = tokenize_texts(docs[used:end], tokenizer).tolist()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(rest) - train_seqlen, (train,), generator=generator).tolist()
    return torch.tensor([rest[s : s + train_seqlen] for s in starts]), heldout


def answer_loss(model: PreTrainedModel, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed answer-token NLL, answer tokens, examples whose every answer token is the argmax)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    answer = labels != IGNORE
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
    )  # fmt: skip
    # Exact: every answer token and the end of turn; the template's newline after it is not asked for.
    final = answer & (answer.cumsum(1) == answer.sum(1, keepdim=True))
    exact = ((logits.argmax(-1) == labels) | ~(answer & ~final)).all(dim=1)
    return (nll * answer).sum(), answer.sum(), exact.sum()


@torch.no_grad()
def score(model: PreTrainedModel, batches: list[TaskBatch]) -> tuple[float, float]:
    """Mean answer-token NLL and exact-answer rate (teacher-forced argmax) over ``batches``."""
    model.eval()
    nll = tokens = exact = examples = 0
    for batch in batches:
        n, t, e = answer_loss(model, batch)
        nll, tokens, exact, examples = nll + float(n), tokens + int(t), exact + int(e), examples + len(batch.input_ids)
    return nll / tokens, exact / examples


def train_lora(model: PreTrainedModel, batches: list[TaskBatch], args, init=None) -> tuple[PreTrainedModel, int, float]:
    """``args.steps`` AdamW steps of rank-``args.rank`` LoRA on every projection, the adapters first
    set by ``init(peft_model)`` when given; returns the PEFT model, its trainable parameter count and
    the training seconds."""
    config = hfquant.lora.register(LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    model = get_peft_model(model, config)
    if init is not None:
        init(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        nll, tokens, _ = answer_loss(model, batches[order.pop()])
        optimizer.zero_grad(set_to_none=True)
        (nll / tokens).backward()
        optimizer.step()
    return model, sum(p.numel() for p in params), time.perf_counter() - start


def linear_weights(model: PreTrainedModel) -> int:
    """Weights of the decoder projections (what bits per weight are counted over)."""
    return sum(
        m.in_features * m.out_features for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="w2g64,w3g64")
    parser.add_argument("--method", default="decoupleq")
    parser.add_argument("--blockwise-epochs", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (of 512 tokens, the mix)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--task", default="facts", choices=["facts", "code"])
    parser.add_argument("--holdout", type=int, default=None, help="held-out questions (48) or code windows (16)")
    parser.add_argument("--train-windows", type=int, default=256, help="--task code: training windows")
    parser.add_argument("--train-seqlen", type=int, default=256, help="--task code: tokens per training window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default="peft",
                        help="comma-separated adapter initializations, a LoRA row each: peft (B = 0), error (LoftQ: "
                             "SVD of W - W_hat), scaled-error (the SVD weighted by input-channel scales on the "
                             "training data)")
    parser.add_argument("--tacq", action="store_true", help="also TaCQ kept weights at the adapter's bits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra HfQuantConfig field of every quantization (e.g. to match a --checkpoint's settings)")
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="CONFIG=DIR",
        help="use a saved hfquant model for CONFIG (e.g. w2g64=DIR) instead of quantizing",
    )  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args()
    setup(args)
    inits = args.init.split(",")
    if unknown := sorted(set(inits) - {"peft", "error", "scaled-error"}):
        raise SystemExit(f"--init: unknown {unknown}; choose from peft, error, scaled-error")
    path, tokenizer = load_default()
    if args.task == "facts":
        train_rows, heldout_rows = facts_split(args.holdout or 48, args.seed)
        train = task_batches(train_rows, tokenizer, len(train_rows), 512, batch_size=args.batch_size)
        heldout = task_batches(heldout_rows, tokenizer, len(heldout_rows), 512, batch_size=args.batch_size)
        task_text = (f"hfquant facts as chat, {len(train_rows)} training and {len(heldout_rows)} held-out questions "
                     f"(seed {args.seed}), loss on answer tokens; `exact` = every answer token and the end of turn is "
                     "the argmax under teacher forcing")  # fmt: skip
    else:
        train_ids, heldout_ids = code_split(tokenizer, args.holdout or 16, args.train_windows, args.seed, args.train_seqlen)
        train_rows = [tokenizer.decode(w) for w in train_ids]  # TaCQ's task examples
        train = batches_from_ids(train_ids, args.batch_size)
        heldout = batches_from_ids(heldout_ids, args.batch_size)
        task_text = (f"Python code, {len(heldout_ids)} held-out 512-token windows (the yardstick's python-code "
                     f"windows) and {len(train_ids)} training windows of {args.train_seqlen} tokens from the stdlib files after them (seed "
                     f"{args.seed}); loss on every token, perplexity in the `exact answers` column's place")  # fmt: skip

    def load(config: HfQuantConfig | None = None) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)

    rows: list[dict[str, str]] = []

    def record(config: str, model_name: str, extra_bpw: str, loss: float, exact: float, note: str = "") -> None:
        second = ("exact answers", f"{exact:.1%}") if args.task == "facts" else ("perplexity", f"{math.exp(loss):.2f}")
        row = {"config": config, "model": model_name, "extra bits/weight": extra_bpw,
               "held-out loss": f"{loss:.3f}", second[0]: second[1], "note": note}  # fmt: skip
        title = None if rows else f"finetune.py: LoRA on a quantized base, held-out {args.task}"
        rows.append(row)
        append_results([row], title=title, text=text)
        print(" | ".join(row.values()), flush=True)

    text = (
        f"SmolLM2-135M-Instruct, {machine_line()}. Task: {task_text}. LoRA r={args.rank} on {', '.join(TARGETS)}, AdamW lr "
        f"{args.lr}, {args.steps} steps of {args.batch_size} {'questions' if args.task == 'facts' else 'windows'}. Quantization: {args.method}, "
        f"{args.blockwise_epochs} block-wise epochs, {args.nsamples} x 512 calibration tokens of the mix"
        f"{', ' + ', '.join(args.set) if args.set else ''}. "
        "`gap closed` = 1 - (loss of quantized + LoRA - loss of fp + LoRA) / (loss of quantized - loss of fp): the "
        "share of quantization's loss gap that LoRA closes, judged against full precision trained the same way."
    )
    full = load()
    n_weights = linear_weights(full)
    fp_loss, fp_exact = score(full, heldout)
    record("fp32", "full precision", "-", fp_loss, fp_exact)
    tuned, n_adapter, seconds = train_lora(full, train, args)
    adapter_bpw = n_adapter * 16 / n_weights
    fp_lora_loss, fp_lora_exact = score(tuned, heldout)
    record("fp32", "full precision + LoRA", f"{adapter_bpw:.3f}", fp_lora_loss, fp_lora_exact, f"{seconds:.0f} s training")
    del full, tuned
    reference = load() if set(inits) - {"peft"} else None  # what the error-based inits approximate
    scale_batches = train[: max(1, 64 // args.batch_size)]  # about 64 training examples
    scales = hfquant.lora.input_scales(reference, scale_batches, TARGETS) if "scaled-error" in inits else None
    init_loss: dict[str, float] = {}  # held-out loss right after an error-based init, before training

    def init_with(kind: str):
        def init(peft_model) -> None:
            hfquant.lora.init_from_quantization_error(peft_model, reference, scales if kind == "scaled-error" else None)
            init_loss[kind] = score(peft_model, heldout)[0]

        return init

    init_fns = {"peft": None, "error": init_with("error"), "scaled-error": init_with("scaled-error")}
    saved = dict(item.split("=", 1) for item in args.checkpoint)
    for name in args.configs.split(","):
        bits, group_size = parse_config(name)
        settings = dict(bits=bits, group_size=group_size, method=args.method, dataset="mix", nsamples=args.nsamples,
                        blockwise_epochs=args.blockwise_epochs, e2e_epochs=0,  # as the TaCQ row, which excludes it
                        tokenizer=tokenizer, **parse_settings(args.set))  # fmt: skip
        start = time.perf_counter()
        if name in saved:
            quantized = AutoModelForCausalLM.from_pretrained(saved[name])
            origin = f"saved {saved[name]}"
        else:
            quantized = load(HfQuantConfig(**settings))
            origin = f"{time.perf_counter() - start:.0f} s quantization"
        q_loss, q_exact = score(quantized, heldout)
        record(f"W{bits} g{group_size}", "quantized", "-", q_loss, q_exact, origin)
        for init in inits:
            model = copy.deepcopy(quantized)  # PEFT wraps the model in place: each init gets its own copy
            tuned, _, seconds = train_lora(model, train, args, init_fns[init])
            lora_loss, lora_exact = score(tuned, heldout)
            gap = q_loss - fp_loss
            closed = f"gap closed {1 - (lora_loss - fp_lora_loss) / gap:.0%}" if gap > 0 else "no gap"
            label = "quantized + LoRA" + ("" if init == "peft" else f" ({init} init)")
            untrained = f"; loss {init_loss.pop(init):.3f} after the init alone" if init in init_loss else ""
            record(f"W{bits} g{group_size}", label, f"{adapter_bpw:.3f}", lora_loss, lora_exact,
                   f"{closed}; {lora_loss - fp_lora_loss:+.3f} vs fp + LoRA; {seconds:.0f} s training{untrained}")  # fmt: skip
            del model, tuned
        del quantized
        if args.tacq:
            fraction = adapter_bpw / KEPT_WEIGHT_BITS
            model = load(HfQuantConfig(**settings, kept_fraction=fraction, saliency="tacq", task_dataset=train_rows))
            t_loss, t_exact = score(model, heldout)
            closed = f"gap to fp closed {(q_loss - t_loss) / gap:.0%}" if gap > 0 else "no gap"
            record(f"W{bits} g{group_size}", f"TaCQ {fraction:.2%} kept", f"{adapter_bpw:.3f}", t_loss, t_exact,
                   closed)  # fmt: skip
            del model
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
