"""`make demo`: quantize the default model to 2 bits, compare with full precision, chat with it.

Prints perplexity on held-out English text (never seen in calibration), size on disk, bits per
weight and time for full precision, round-to-nearest and decoupleQ with block-wise minimization,
saves the 2-bit checkpoint, reloads it from disk and prints one chat answer from the reloaded model.
"""

import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.chat import generate_reply
from hfquant.cli import print_table
from hfquant.corpora import heldout_texts
from hfquant.eval import perplexity
from hfquant.export import bits_per_weight, folder_size, save_quantized
from hfquant.models import default_model_path

OUT = Path(os.environ.get("HFQUANT_DEMO_OUT", "demo-out")) / "SmolLM2-135M-Instruct-hfquant-w2g64"
EVAL_WINDOWS = int(os.environ.get("HFQUANT_DEMO_WINDOWS", "16"))
QUESTION = "What is the capital of France?"

torch.manual_seed(0)
start = time.perf_counter()
path = default_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
texts = heldout_texts()


def ppl(model) -> float:
    return perplexity(model, tokenizer, texts, seqlen=512, max_windows=EVAL_WINDOWS)


full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
rows = [{"model": "full precision", "perplexity": f"{ppl(full):.2f}", "bits/weight": "32",
         "size (MB)": f"{folder_size(path) / 1e6:.0f}", "quantize time (s)": "-"}]
del full

for name, config in [
    ("RTN W2 g64", HfQuantConfig(bits=2, group_size=64, method="rtn")),
    ("decoupleQ + block-wise + end-to-end W2 g64", HfQuantConfig(
        bits=2, group_size=64, method="decoupleq", nsamples=32, seqlen=256, decoupleq_iters=4,
        blockwise_epochs=4, blockwise_batch_size=4, tokenizer=tokenizer)),
]:
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - t0
    if config.method == "rtn":
        size = "-"
    else:
        save_quantized(model, OUT, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(OUT)  # everything below runs on the reloaded checkpoint
        size = f"{folder_size(OUT) / 1e6:.0f}"
    rows.append({"model": name, "perplexity": f"{ppl(model):.2f}", "bits/weight": f"{bits_per_weight(model):.3f}",
                 "size (MB)": size, "quantize time (s)": f"{seconds:.0f}"})

print(f"\nSmolLM2-135M-Instruct, perplexity on {EVAL_WINDOWS} x 512 tokens of held-out Book of Mormon text")
print_table(rows)
print(f"\nsaved and reloaded: {OUT}")
print(f"user: {QUESTION}")
print(f"assistant (2-bit): {generate_reply(model, tokenizer, [{'role': 'user', 'content': QUESTION}], 48)}")
print(f"\ndemo took {time.perf_counter() - start:.0f} s")
