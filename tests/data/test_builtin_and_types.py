"""The built-in addition task and the shared item types."""
import pytest

from svd_ray.data import GenItem, MCItem, TrainExample, builtin_task


def test_builtin_deterministic_and_split():
    a, b = builtin_task(seed=0), builtin_task(seed=0)
    assert a == b
    assert {k: len(v) for k, v in a.mc.items()} == {"train": 50, "calibration": 20, "eval": 30}
    ids = {k: {it.id for it in v} for k, v in a.mc.items()}
    assert not (ids["train"] & ids["eval"]) and not (ids["train"] & ids["calibration"])
    assert not (ids["calibration"] & ids["eval"])
    assert sum(len(v) for v in ids.values()) == 100
    assert {e.id for e in a.examples["train"]} == ids["train"]
    assert builtin_task(seed=1).split.ids["eval"] != a.split.ids["eval"]


def test_builtin_items_correct():
    task = builtin_task(seed=0)
    for part in task.split.names:
        for ex, mc, gen in zip(task.examples[part], task.mc[part], task.gen[part]):
            a, b = (int(x) for x in ex.id.split("-")[1:])
            assert ex.prompt == mc.prompt == gen.prompt == f"Q: {a} + {b} = ?\nA:"
            assert ex.answer == f" {a + b}" == mc.choices[mc.gold_index]
            assert len(mc.choices) == 4 and len(set(mc.choices)) == 4
            assert all(int(c) >= 0 and abs(int(c) - (a + b)) <= 3 for c in mc.choices)
            assert gen.references == [str(a + b)] and str(a + b) not in gen.negatives


def test_builtin_options():
    t = builtin_task(seed=0, max_operand=3, n_distractors=2, fractions={"train": 0.5, "eval": 0.5})
    assert {k: len(v) for k, v in t.mc.items()} == {"train": 8, "eval": 8}
    assert all(len(it.choices) == 3 for v in t.mc.values() for it in v)


def test_types_validate():
    with pytest.raises(ValueError):
        MCItem(id="x", prompt="p", choices=[" a"], labels=[1], source="s")
    with pytest.raises(ValueError):
        MCItem(id="x", prompt="p", choices=[" a", " b"], labels=[0, 0], source="s")
    with pytest.raises(ValueError):
        MCItem(id="x", prompt="p", choices=[" a", " b"], labels=[1, 0, 0], source="s")
    with pytest.raises(ValueError):
        _ = MCItem(id="x", prompt="p", choices=[" a", " b"], labels=[1, 1], source="s").gold_index
    with pytest.raises(ValueError):
        GenItem(id="x", prompt="p", references=[])
    with pytest.raises(TypeError):
        TrainExample(prompt="p", answer=3)
    it = MCItem(id="x", prompt="p", choices=(" a", " b"), labels=(0, True), source="s")
    assert it.choices == [" a", " b"] and it.labels == [0, 1] and it.gold_index == 1
