"""Commonsense loaders on the real shared files (counts from ../shared/data/README.md)."""
import pytest

from svd_ray.data import DataUnavailableError, load_commonsense_mc, load_commonsense_records, load_commonsense_train
from svd_ray.data.commonsense import ALPACA_TEMPLATE, canonical_task, load_commonsense_train_mix, parse_instruction

COUNTS = {
    ("arc_c", "test"): 1172, ("arc_c", "train"): 1119,
    ("arc_e", "test"): 2376, ("arc_e", "train"): 2251,
    ("boolq", "test"): 3270, ("boolq", "train"): 9427,
    ("obqa", "test"): 500, ("obqa", "train"): 4957,
    ("piqa", "test"): 1838, ("siqa", "test"): 1954, ("winogrande", "test"): 1267,
}


@pytest.mark.parametrize("task, split", sorted(COUNTS))
def test_counts_and_labels(data_dir, task, split):
    recs = load_commonsense_records(task, split, data_dir)
    assert len(recs) == COUNTS[(task, split)]
    assert len({r.id for r in recs}) == len(recs)
    for r in recs:
        assert len(r.keys) == len(r.options) >= 2 and r.answer in r.keys
        assert r.output == "the correct answer is " + r.answer


def test_llm_adapters_style(data_dir):
    item = load_commonsense_mc("ARC-Challenge", "test", data_dir, limit=1)[0]
    assert item.id == "arc_c/test/00000" and item.source == "arc_c"
    assert item.prompt.startswith("Below is an instruction that describes a task.")
    assert item.prompt.endswith("Answer format: answer1/answer2/answer3/answer4\n\n### Response:\n")
    assert item.choices == [f"the correct answer is answer{i}" for i in range(1, 5)]
    assert item.labels == [0, 0, 1, 0]  # file says answer3


def test_text_style(data_dir):
    arc = load_commonsense_mc("arc_c", "test", data_dir, style="text", limit=1)[0]
    assert arc.prompt.startswith("Question: An astronomer observes") and arc.prompt.endswith("\nAnswer:")
    assert arc.choices[arc.gold_index] == " Planetary days will become shorter."
    boolq = load_commonsense_mc("boolq", "test", data_dir, style="text", limit=1)[0]
    assert boolq.prompt == "Question: does ethanol take more energy make that produces?\nAnswer:"
    assert boolq.choices == [" yes", " no"] and boolq.labels == [0, 1]
    wino = load_commonsense_mc("winogrande", "test", data_dir, style="text", limit=1)[0]
    assert wino.prompt == "Sarah was a much better surgeon than Maria so"
    assert wino.choices == [" Sarah always got the easier cases.", " Maria always got the easier cases."]
    assert wino.labels == [0, 1]
    piqa = load_commonsense_mc("piqa", "test", data_dir, style="text", limit=1)[0]
    assert len(piqa.choices) == 2 and piqa.labels == [1, 0]


def test_five_option_arc(data_dir):
    items = load_commonsense_mc("arc_e", "test", data_dir)
    five = [it for it in items if len(it.choices) == 5]
    three = [it for it in items if len(it.choices) == 3]
    assert len(five) == 4 and len(three) == 7


def test_limit_and_seeded_subsample(data_dir):
    first = load_commonsense_mc("obqa", "test", data_dir, limit=10)
    assert [it.id for it in first] == [f"obqa/test/{i:05d}" for i in range(10)]
    a = load_commonsense_mc("obqa", "test", data_dir, limit=10, seed=1)
    b = load_commonsense_mc("obqa", "test", data_dir, limit=10, seed=1)
    c = load_commonsense_mc("obqa", "test", data_dir, limit=10, seed=2)
    assert [x.id for x in a] == [x.id for x in b] != [x.id for x in c]
    assert [x.id for x in a] == sorted(x.id for x in a)  # kept in file order


def test_train_examples(data_dir):
    ex = load_commonsense_train("boolq", data_dir, limit=3)
    assert ex[0].answer == "the correct answer is true"
    assert ex[0].prompt == ALPACA_TEMPLATE.format(
        instruction="Please answer the following question with true or false, question: "
        "do iran and afghanistan speak the same language?\n\nAnswer format: true/false"
    )
    text = load_commonsense_train("arc_e", data_dir, style="text", limit=1)[0]
    assert text.answer == " a bacterial population in the bloodstream"
    mix = load_commonsense_train_mix(data_dir=data_dir, limit_per_task=5, seed=0)
    assert len(mix) == 20 and {e.id.split("/")[0] for e in mix} == {"arc_e", "arc_c", "boolq", "obqa"}


@pytest.mark.parametrize("task, split", [("hellaswag", "test"), ("piqa", "train"), ("siqa", "train"), ("winogrande", "train")])
def test_unavailable_offline(data_dir, task, split):
    with pytest.raises(DataUnavailableError, match="source='hub'"):
        load_commonsense_mc(task, split, data_dir)


def test_task_names_and_parser():
    assert canonical_task("ARC-Easy") == "arc_e" and canonical_task("social_i_qa") == "siqa"
    with pytest.raises(ValueError):
        canonical_task("mmlu")
    q, keys, opts = parse_instruction(
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "A _ B.\n\nOption1: x y Option2: z Answer format: option1/option2"
    )
    assert (q, keys, opts) == ("A _ B.", ("option1", "option2"), ("x y", "z"))
    with pytest.raises(ValueError):
        parse_instruction("no format here")
