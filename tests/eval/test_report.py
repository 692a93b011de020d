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


def _delta(mean, low, high):
    return {"mean": mean, "low": low, "high": high}


def test_the_scorecard_counts_every_row_once_by_its_paired_ci():
    from svd_ray.eval.report import scorecard

    def run(paper, validated):
        return {"metrics": {"all/acc": {}}, "deltas": {"svdecode": {"all/acc": paper}, "validated": {"all/acc": validated}}}

    zero = _delta(0.0, 0.0, 0.0)
    results = {"runs": {"commonsense": {
        "lora": run(_delta(0.010, 0.001, 0.019), zero),                 # paper helps; validated fell back
        "ia3": run(_delta(-0.022, -0.042, -0.002), _delta(0.004, -0.002, 0.010)),  # paper hurts; validated within
        "prompt_tuning": run(_delta(0.007, -0.001, 0.015), _delta(0.012, 0.002, 0.022)),  # validated helps
    }}}
    card = scorecard(results)
    assert {k: card["svdecode"][k] for k in ("rows", "better", "worse", "within", "identical")} == \
        {"rows": 3, "better": 1, "worse": 1, "within": 1, "identical": 0}
    assert {k: card["validated"][k] for k in ("rows", "better", "worse", "within", "identical")} == \
        {"rows": 3, "better": 1, "worse": 0, "within": 2, "identical": 1}
    assert card["validated"]["best"][1].startswith("prompt_tuning") and card["svdecode"]["worst"][1].startswith("ia3")
    assert "mask_only" not in card  # a variant with no rows is not invented


def test_a_report_rendered_from_results_json_keeps_the_plan_order():
    """results.json is written with sorted keys; re-rendering from it must not reorder the tables."""
    from svd_ray.eval.config import EvalConfig
    from svd_ray.eval.runner import in_plan_order

    cfg = EvalConfig.from_yaml("jobs/configs/eval-ci.yaml")  # methods [lora, prompt_tuning]; truthfulqa first
    read_back = {"seconds": 1.0, "runs": {"commonsense": {"prompt_tuning": 1, "lora": 2},
                                          "truthfulqa": {"prompt_tuning": 3, "lora": 4}}}
    ordered = in_plan_order(cfg, read_back)
    assert [(f, list(c.items())) for f, c in ordered["runs"].items()] == \
        [("truthfulqa", [("lora", 4), ("prompt_tuning", 3)]), ("commonsense", [("lora", 2), ("prompt_tuning", 1)])]
    assert ordered["seconds"] == 1.0
