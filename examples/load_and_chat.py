"""Load a saved hfquant checkpoint and ask it one question.

    python examples/load_and_chat.py smollm2-w2g64 "What is the capital of France?"
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant  # noqa: F401  (registers the "hfquant" quantization method with transformers)
from hfquant.chat import generate_reply

folder, question = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
print(generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=48))
