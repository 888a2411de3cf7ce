"""Task examples for the kept-weight saliency (TaCQ): chat rows or text, as token batches with labels.

``task_dataset`` is either text (anything :func:`hfquant.calibration.load_texts` reads: language
modelling loss on every token) or chat examples -- ``{"messages": [...]}`` or
``{"question": ..., "answer": ...}`` rows, as a list, a ``datasets.Dataset`` or a ``.jsonl`` file --
rendered with the tokenizer's chat template, the loss taken on the assistant turns only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfquant.calibration import get_calibration_data, is_hf_dataset

IGNORE = -100  # label of tokens the task loss does not cover
GRADIENT_BATCH_SIZE = 4  # examples per backward: bounds the logits' memory ([batch, seqlen, vocab])


@dataclass
class TaskBatch:
    input_ids: torch.Tensor  # long [b, L]
    labels: torch.Tensor  # long [b, L], IGNORE where no loss is taken
    attention_mask: torch.Tensor  # long [b, L], 0 on right padding


def _chat_rows(task_dataset: Any) -> list[dict[str, Any]] | None:
    """The examples as chat rows, or None when the task set is plain text."""
    if isinstance(task_dataset, (str, os.PathLike)) and str(task_dataset).endswith(".jsonl"):
        lines = Path(task_dataset).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    elif is_hf_dataset(task_dataset):
        if not (
            {"messages"} <= set(task_dataset.column_names)
            or {"question", "answer"} <= set(task_dataset.column_names)
        ):
            return None
        rows = list(task_dataset)
    elif isinstance(task_dataset, Sequence) and not isinstance(task_dataset, str) and task_dataset:
        if not all(isinstance(row, dict) for row in task_dataset):
            return None
        rows = list(task_dataset)
    else:
        return None
    for row in rows:
        if not (isinstance(row, dict) and ("messages" in row or {"question", "answer"} <= set(row))):
            raise ValueError(
                f"task_dataset chat examples need 'messages' or 'question' and 'answer', got {row!r:.200}"
            )
    return rows


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return list(row["messages"])
    return [
        {"role": "user", "content": str(row["question"])},
        {"role": "assistant", "content": str(row["answer"])},
    ]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def chat_example_tokens(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and labels that cover the assistant turns only."""
    messages = _messages(row)
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True))
        end = len(_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    if all(label == IGNORE for label in labels):
        raise ValueError("a task_dataset chat example has no assistant answer to take the loss on")
    return ids, labels


def task_batches(
    task_dataset: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    batch_size: int = GRADIENT_BATCH_SIZE,
) -> list[TaskBatch]:
    """Batches of task examples: every chat row (answer-only loss, each cut to its last ``seqlen``
    tokens so the answer survives: a few dozen short answers are the whole task signal, so none
    is dropped), or ``nsamples`` random ``seqlen``-token windows of a text source."""
    rows = _chat_rows(task_dataset)
    if rows is None:
        return batches_from_ids(
            get_calibration_data(task_dataset, tokenizer, nsamples, seqlen, seed), batch_size
        )
    examples = [chat_example_tokens(row, tokenizer) for row in rows]
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = [(ids[-seqlen:], labels[-seqlen:]) for ids, labels in examples[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches.append(
            TaskBatch(
                torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in chunk]),
                torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            )
        )
    return batches


def batches_from_ids(ids: torch.Tensor, batch_size: int = GRADIENT_BATCH_SIZE) -> list[TaskBatch]:
    """Language-modelling batches (loss on every token) from ``[n, seqlen]`` token windows."""
    return [TaskBatch(chunk, chunk.clone(), torch.ones_like(chunk)) for chunk in ids.split(batch_size)]


def single_examples(batch: TaskBatch) -> list[TaskBatch]:
    """One batch per example, without its right padding."""
    out = []
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask, strict=True):
        n = int(mask.sum())
        out.append(TaskBatch(ids[None, :n], labels[None, :n], mask[None, :n]))
    return out
