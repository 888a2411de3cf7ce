"""LoRA fine-tuning on a saved 2-bit hfquant checkpoint (QLoRA-style), with PEFT and the Trainer.

The quantized layers stay frozen; LoRA adapters on every projection learn short factual answers
(hfquant's facts questions, chat-formatted, loss on the answers only). The adapter is saved
alone and reloaded on a fresh copy of the checkpoint.

With ``--init-from`` the full-precision model the checkpoint was quantized from, the adapters
start at the activation-weighted rank-r approximation of what quantization took away
(:func:`hfquant.lora.init_from_quantization_error`) instead of PEFT's zero: on W2 g64 and held-out
code that closed 51% of the loss gap to full precision + LoRA against 37% from zero
(``benchmarks/RESULTS.md``).

    python examples/finetune_lora.py smollm2-w2g64 --out smollm2-w2g64-facts --steps 200 \
        --init-from HuggingFaceTB/SmolLM2-135M-Instruct
"""

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

import hfquant.lora
from hfquant.task_data import chat_example_tokens, task_batches
from hfquant.tasks import TASKS_DIR

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

parser = argparse.ArgumentParser()
parser.add_argument("model", help="a saved hfquant checkpoint")
parser.add_argument("--out", required=True, help="where the adapter is saved")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--init-from", default=None, help="the full-precision model: start the adapters at the quantization error")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
rows = [json.loads(line) for line in (TASKS_DIR / "facts.jsonl").read_text().splitlines()]
chats = [{"question": row["question"], "answer": row["answers"][0]} for row in rows]
examples = []
for chat in chats:
    ids, labels = chat_example_tokens(chat, tokenizer)
    examples.append({"input_ids": ids, "labels": labels})

model = AutoModelForCausalLM.from_pretrained(args.model)
model.activation_checkpointing_enable()  # recompute each block in backward: activations of one block at a time
model = get_peft_model(model, hfquant.lora.register(LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)))
if args.init_from:
    reference = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    batches = task_batches(chats[:64], tokenizer, 64, 512, batch_size=8)  # data like the training data
    captured = hfquant.lora.init_from_quantization_error(
        model, reference, hfquant.lora.input_scales(reference, batches, TARGETS)
    )
    print(f"adapters start at the quantization error: {sum(captured.values()) / len(captured):.0%} of it captured on average")
    del reference
model.print_trainable_parameters()

training = TrainingArguments(
    output_dir=str(Path(args.out) / "trainer"),
    max_steps=args.steps,
    per_device_train_batch_size=8,
    learning_rate=args.lr,
    optim=hfquant.lora.training_optim(),  # paged 8-bit AdamW on CUDA with bitsandbytes, else AdamW
    logging_steps=max(1, args.steps // 10),
    save_strategy="no",
    report_to=[],
)
collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=collator)
trainer.train()
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f} ({training.optim})")

model.save_pretrained(args.out)
model = model.cpu().eval()  # compared on the CPU, where the reloaded copy loads
probe = collator(examples[:2])
with torch.no_grad():
    expected = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
base = AutoModelForCausalLM.from_pretrained(args.model)
reloaded = PeftModel.from_pretrained(base, args.out, config=hfquant.lora.register(args.out))
with torch.no_grad():
    same = torch.equal(reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits, expected)
print(f"adapter saved to {args.out}; reloaded on the checkpoint: {'identical' if same else 'DIFFERENT'} logits")
