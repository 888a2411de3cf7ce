"""Quantize a model to 2 bits at load time and save it as safetensors.

    python examples/quantize_and_save.py --out smollm2-w2g64            # the default model
    python examples/quantize_and_save.py MODEL_ID_OR_DIR --out DIR --method rtn
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import HfQuantConfig
from hfquant.export import bits_per_weight, save_quantized
from hfquant.models import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=None)
parser.add_argument("--out", required=True)
parser.add_argument("--method", default="decoupleq")
parser.add_argument("--bits", type=int, default=2)
parser.add_argument("--nsamples", type=int, default=32)
parser.add_argument("--seqlen", type=int, default=256)
args = parser.parse_args()

path = resolve_model(args.model)
tokenizer = AutoTokenizer.from_pretrained(path)
config = HfQuantConfig(
    bits=args.bits, group_size=64, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen, tokenizer=tokenizer
)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
save_quantized(model, args.out, tokenizer)
print(f"saved {args.out}: {bits_per_weight(model):.3f} bits per weight")
