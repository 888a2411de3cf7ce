"""lm-evaluation-harness on an already-loaded model (``hfquant eval MODEL --tasks ...``).

People judge a quantized model by the harness' task scores, so hfquant runs the harness itself
(``lm_eval.simple_evaluate`` over an ``HFLM`` wrapping the loaded model) rather than asking it to
load the checkpoint again. Task names pass through to the harness unchanged (``hellaswag``,
``arc_easy``, ... need a network the first time); hfquant's own offline tasks (see
:mod:`hfquant.tasks`) are found through ``TaskManager(include_path=...)``. Requires the ``eval``
extra (``pip install hfquant[eval]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfquant.export.model_card import TaskScore
from hfquant.tasks import LOCAL_TASKS, TASKS_DIR


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "`hfquant eval --tasks` needs lm-evaluation-harness: pip install 'hfquant[eval]'"
        ) from err
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: Sequence[str]) -> Any:
    """The harness' task index for ``tasks``: hfquant's local tasks, plus the harness' own
    (indexing its thousands of YAML files takes a while) only when a task is not local. An
    unknown task name raises ``ValueError`` naming it."""
    _, _, TaskManager = _harness()
    include_defaults = any(t not in LOCAL_TASKS for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}: use hfquant's offline tasks {list(LOCAL_TASKS)} "
            "or a harness task name (`lm_eval ls tasks` lists them)"
        )
    return manager


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    limit: float | None = None,
    batch_size: int | str = 1,
    manager: Any = None,
) -> dict[str, Any]:
    """The harness' results dict for ``tasks`` on ``model`` where it is (move it to the device first).

    ``limit`` caps the examples per task (a count, or a fraction below 1); ``batch_size`` is an
    integer or ``"auto"``; ``manager`` is a :func:`task_manager` to reuse across models.
    """
    lm_eval, HFLM, _ = _harness()
    manager = manager or task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False
    )


def scores(results: dict[str, Any], full_precision: dict[str, Any] | None = None) -> list[TaskScore]:
    """One :class:`TaskScore` per task and metric in a results dict (with the full-precision
    model's value beside it when its results are given)."""
    rows = []
    fp = (full_precision or {}).get("results", {})
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, int | float) or not filter_name:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                TaskScore(
                    task=task,
                    metric=metric,
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, int | float) else None,
                    full_precision=fp.get(task, {}).get(key),
                )
            )
    return rows


def harness_table(results: dict[str, Any]) -> str:
    """The harness' own markdown table of a results dict."""
    from lm_eval.utils import make_table

    return make_table(results)
