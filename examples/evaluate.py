"""Perplexity of a model (full precision or hfquant checkpoint) on held-out English text.

    python examples/evaluate.py                 # the default model in full precision
    python examples/evaluate.py smollm2-w2g64   # a saved 2-bit checkpoint
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant  # noqa: F401
from hfquant.calibration import heldout_texts
from hfquant.eval import perplexity
from hfquant.models import resolve_model

path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
max_windows = int(sys.argv[2]) if len(sys.argv) > 2 else None
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
print(f"perplexity: {perplexity(model, tokenizer, heldout_texts(), seqlen=512, max_windows=max_windows):.3f}")
