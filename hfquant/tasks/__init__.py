"""lm-evaluation-harness tasks that ship with hfquant, so ``hfquant eval --tasks`` works offline.

Each ``*.yaml`` here is a harness task over ``facts.jsonl`` (248 short factual questions, the
same as ``benchmarks/data/facts.jsonl``), loaded from this folder by :func:`facts.load`:

* ``hfquant_facts``: 3-shot question answering, greedy generation up to a newline, scored by
  exact match (case and punctuation ignored) against any accepted answer.
* ``hfquant_facts_loglik``: the same prompts, scored by the log-likelihood of the first
  accepted answer: ``acc`` (the answer is the greedy continuation) and ``perplexity``.

The harness finds them through ``TaskManager(include_path=TASKS_DIR)``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
LOCAL_TASKS = ("hfquant_facts", "hfquant_facts_loglik")
