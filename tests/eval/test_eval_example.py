"""The multiple-choice task shipped in examples/eval (the README's `qlorakit eval` table runs it): the harness finds
it by --include-path and builds it from its JSON file, run from the repository root as the README says."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "examples" / "eval"


def test_the_shipped_task_builds_with_its_40_items(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    manager = TaskManager(include_path=str(FOLDER), include_defaults=False)
    assert manager.all_tasks == ["qlorakit_basics"]
    task = manager.load(["qlorakit_basics"])["tasks"]["qlorakit_basics"]
    docs = list(task.test_docs())
    assert len(docs) == 40
    assert task.doc_to_text(docs[0]) == "Question: How many legs does a spider have?\nAnswer:"
    assert task.doc_to_choice(docs[0]) == ["six", "eight", "ten", "four"] and task.doc_to_target(docs[0]) == 1


def test_every_item_has_four_distinct_choices_and_the_answers_are_spread_evenly():
    items = json.loads((FOLDER / "qlorakit_basics.json").read_text(encoding="utf-8"))
    assert all(len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4 for item in items)
    assert Counter(item["answer"] for item in items) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert len({item["question"] for item in items}) == len(items)
