"""`hfquant eval --tasks`: lm-evaluation-harness on hfquant's offline tasks (nothing downloads)."""

import os

import pytest

from hfquant import harness
from hfquant.cli import build_parser, main
from hfquant.export.model_card import TaskScore, write_scores
from hfquant.tasks import LOCAL_TASKS, TASKS_DIR

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_local_tasks_ship_in_the_package():
    assert sorted(LOCAL_TASKS) == sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    assert sorted(harness.task_manager(LOCAL_TASKS).all_tasks) == sorted(LOCAL_TASKS)


def test_eval_tasks_prints_tables_and_writes_the_card(quantized_chat_dir, tiny_chat_model_dir, capsys):
    code = main(["eval", str(quantized_chat_dir), "--tasks", ",".join(LOCAL_TASKS), "--limit", "3",
                 "--batch-size", "2", "--device", "cpu", "--compare-fp", str(tiny_chat_model_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "|hfquant_facts       |" in out and "exact_match" in out  # the harness' own table
    assert "| task " in out and "full precision" in out
    card = (quantized_chat_dir / "README.md").read_text()
    assert card.index("## Quality") < card.index("## Benchmark scores") < card.index("## Usage")
    assert "| task | metric | value | stderr | full precision |" in card
    for metric in ("exact_match", "acc", "perplexity"):
        assert f"| {metric} |" in card
    assert "--limit 3" in card


def test_scores_section_is_replaced_not_repeated(quantized_chat_dir):
    write_scores(quantized_chat_dir, [TaskScore("hfquant_facts", "exact_match", 0.25, 0.1)], "first")
    write_scores(quantized_chat_dir, [TaskScore("hfquant_facts", "exact_match", 0.5, None)], "second")
    card = (quantized_chat_dir / "README.md").read_text()
    assert card.count("## Benchmark scores") == 1 and "second" in card and "first" not in card
    assert "| hfquant_facts | exact_match | 0.5000 | n/a |" in card and "## Usage" in card


def test_scores_reads_the_harness_results_dict():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "perplexity,none": 3.0, "perplexity_stderr,none": "N/A"}}}
    fp = {"results": {"t": {"acc,none": 0.75}}}
    assert harness.scores(results, fp) == [
        TaskScore("t", "acc", 0.5, 0.1, 0.75),
        TaskScore("t", "perplexity", 3.0, None, None),
    ]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--limit", "0", "must be a positive count or fraction, got 0"),
     ("--batch-size", "many", "must be a positive integer or 'auto', got many")],
)
def test_bad_harness_options_name_the_value(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--tasks", "hfquant_facts", flag, value])
    assert message in capsys.readouterr().err


def test_limit_is_a_count_or_a_fraction():
    args = build_parser().parse_args(["eval", "--tasks", "hfquant_facts", "--limit", "20", "--batch-size", "auto"])
    assert (args.limit, args.batch_size) == (20, "auto")
    assert build_parser().parse_args(["eval", "--tasks", "x", "--limit", "0.5"]).limit == 0.5
