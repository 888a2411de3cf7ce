"""Publish a saved hfquant checkpoint on the Hugging Face Hub (run `hf auth login` first).

    python examples/push_to_hub.py smollm2-w2g64 your-name/SmolLM2-135M-Instruct-hfquant-w2g64 --private

Uploads weights, config, generation config, tokenizer, chat template and a generated model card
in one commit. Others then load it with `import hfquant` and `from_pretrained(repo_id)`.
"""

import argparse

from transformers import AutoModelForCausalLM

import hfquant  # noqa: F401  (registers the "hfquant" quantization method with transformers)

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("repo_id")
parser.add_argument("--private", action="store_true")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.folder)
url = model.push_to_hub(args.repo_id, private=args.private or None)
print(f"uploaded {args.folder} to {args.repo_id}: {url}")
