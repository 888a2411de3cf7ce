"""Perplexity of a model (full precision or hfquant checkpoint) on the held-out yardstick.

    python examples/evaluate.py                   # the default model in full precision
    python examples/evaluate.py smollm2-w2g64 8   # a saved 2-bit checkpoint, 8 windows per domain

Three domains no calibration set uses (Python documentation prose, fortune-mod quotations,
standard-library code) and the in-domain held-out Book of Mormon chapters; see hfquant.corpora.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant  # noqa: F401
from hfquant.corpora import heldout_domains
from hfquant.eval import domain_perplexities
from hfquant.models import resolve_model

path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
max_windows = int(sys.argv[2]) if len(sys.argv) > 2 else 32
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
for name, ppl in domain_perplexities(model, tokenizer, heldout_domains(), seqlen=512, max_windows=max_windows).items():
    print(f"{name} perplexity: {ppl:.3f}")
