"""lm-evaluation-harness scores of a model (full precision or hfquant checkpoint).

    python examples/lm_eval_scores.py                                   # default model, hfquant's offline tasks
    python examples/lm_eval_scores.py smollm2-w2g64 --limit 20          # a saved 2-bit checkpoint, 20 examples
    python examples/lm_eval_scores.py smollm2-w2g64 --tasks arc_easy    # a harness task (downloads it once)

Named ``lm_eval_scores.py``, not ``lm_eval.py``: a script's folder comes first on ``sys.path``, so
a script called ``lm_eval.py`` would be imported in place of the harness itself. The same runs as
``hfquant eval MODEL --tasks ...``, which also writes the scores into the checkpoint's card.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant import harness
from hfquant.models import resolve_model
from hfquant.tasks import LOCAL_TASKS

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=None)
parser.add_argument("--tasks", default=",".join(LOCAL_TASKS))
parser.add_argument("--limit", type=int, default=None)
args = parser.parse_args()

path = resolve_model(args.model)
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()  # hfquant checkpoints load without `import hfquant`
results = harness.run_tasks(model, tokenizer, args.tasks.split(","), limit=args.limit)
print(harness.harness_table(results))
for score in harness.scores(results):
    print(f"{score.task} {score.metric}: {score.value:.4f}")
