"""The source='hub' code path, run against a fake `datasets` module built from the local files.

No network: this checks the hub-row → item conversion gives the same items as the local files.
"""
import csv
import json
import types

import pytest

from svd_ray.data import commonsense, load_commonsense_mc, load_truthfulqa_gen, load_truthfulqa_mc, truthfulqa


def _fake_datasets(tables):
    def load_dataset(path, name=None, split=None):
        return tables[(path, name, split)]

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_truthfulqa_hub_matches_local(data_dir, monkeypatch):
    folder = data_dir / "truthfulqa"
    mc = [
        {
            "question": d["question"],
            "mc1_targets": {"choices": list(d["mc1_targets"]), "labels": list(d["mc1_targets"].values())},
            "mc2_targets": {"choices": list(d["mc2_targets"]), "labels": list(d["mc2_targets"].values())},
        }
        for d in json.loads((folder / "mc_task.json").read_text(encoding="utf-8"))
    ]
    with open(folder / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        gen = [
            {
                "type": r["Type"], "category": r["Category"], "question": r["Question"],
                "best_answer": r["Best Answer"],
                "correct_answers": [a.strip() for a in r["Correct Answers"].split(";")],
                "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";")],
                "source": r["Source"],
            }
            for r in csv.DictReader(f)
        ]
    fake = _fake_datasets({
        (truthfulqa.HUB_PATH, "multiple_choice", "validation"): mc,
        (truthfulqa.HUB_PATH, "generation", "validation"): gen,
    })
    monkeypatch.setattr(truthfulqa, "import_datasets", lambda: fake)
    assert load_truthfulqa_mc(source="hub") == load_truthfulqa_mc(data_dir)
    assert load_truthfulqa_gen(source="hub") == load_truthfulqa_gen(data_dir)


def test_commonsense_hub_path(data_dir, monkeypatch):
    rows = json.loads((data_dir / "commonsense" / "openbookqa" / "test.json").read_text(encoding="utf-8"))
    hella = [{
        "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
        "endings": ["bakes bread.", "swims.", "sings.", "flies."], "label": "0",
    }]
    fake = _fake_datasets({("me/obqa", None, "test"): rows, ("Rowan/hellaswag", None, "validation"): hella})
    monkeypatch.setattr(commonsense, "import_datasets", lambda: fake)
    assert load_commonsense_mc("obqa", source="hub", hub_path="me/obqa") == load_commonsense_mc("obqa", data_dir=data_dir)
    item = load_commonsense_mc("hellaswag", source="hub")[0]
    assert item.choices == [f"the correct answer is ending{i}" for i in range(1, 5)] and item.labels == [1, 0, 0, 0]
    text = load_commonsense_mc("hellaswag", source="hub", style="text")[0]
    assert text.prompt == "Baking: A man mixes flour. He" and text.choices[0] == " bakes bread."
    with pytest.raises(commonsense.DataUnavailableError, match="hub_path"):
        load_commonsense_mc("piqa", source="hub")
