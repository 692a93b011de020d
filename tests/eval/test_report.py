"""Report columns that repeat another column's numbers are dropped (issue 11: a readable report)."""
from svd_ray.eval.report import _repeats_pooled


def _runs(average: float, pooled: float) -> dict:
    cell = {"peft": {"mean": pooled, "low": pooled - 0.02, "high": pooled + 0.02},
            "svdecode": {"mean": 0.4, "low": 0.38, "high": 0.42}}
    return {"lora": {"metrics": {"all/acc": cell,
                                 "average/acc": {"peft": {"mean": average}, "svdecode": {"mean": 0.4}}}}}


def test_the_macro_average_is_dropped_only_when_it_equals_the_pooled_accuracy_everywhere():
    assert _repeats_pooled("average/acc", _runs(0.365, 0.365))  # equal task sizes: same numbers
    assert not _repeats_pooled("average/acc", _runs(0.361, 0.365))  # unequal sizes: it says something else
    assert not _repeats_pooled("all/acc", _runs(0.365, 0.365))
    runs = _runs(0.365, 0.365)
    del runs["lora"]["metrics"]["all/acc"]
    assert not _repeats_pooled("average/acc", runs)  # nothing to repeat
