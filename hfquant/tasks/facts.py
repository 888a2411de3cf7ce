"""Loads ``facts.jsonl`` from beside this file, wherever hfquant is installed.

A task YAML's ``dataset_kwargs: data_files`` is resolved against the working directory, not the
YAML's folder, so the tasks name this loader as their ``custom_dataset`` instead.
"""

from pathlib import Path

import datasets

FACTS = Path(__file__).with_name("facts.jsonl")


def load(**_task_metadata) -> datasets.DatasetDict:
    """The facts as a ``test`` split (the harness passes the task's metadata, unused here)."""
    return datasets.load_dataset("json", data_files={"test": str(FACTS)})
