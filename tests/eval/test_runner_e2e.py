"""A small fixed subset of the evaluation end to end (tiny model), run twice: same seed → same table."""
import json
import warnings

import pytest

from svd_ray.cli import main
from svd_ray.eval.config import EvalConfig
from svd_ray.eval.runner import per_item_scores, run_evaluation

warnings.filterwarnings("ignore")
CONFIG = "jobs/configs/eval-ci.yaml"


@pytest.mark.integration
def test_eval_subset_end_to_end_and_reproducible(tmp_path):
    runs = []
    for k in range(2):  # fresh store each time: the second run retrains from scratch
        # (the second run repeats one method, to keep the suite's time: the pipeline is the same for every method)
        over = {"store": (tmp_path / f"store{k}").as_uri(), "output_dir": str(tmp_path / f"out{k}")}
        cfg = EvalConfig.from_yaml(CONFIG, over if k == 0 else {**over, "methods": ["lora"]})
        runs.append(run_evaluation(cfg, log=lambda s: None))
    a, b = runs
    assert set(a["runs"]["truthfulqa"]) == {"lora", "prompt_tuning"} and set(b["runs"]["truthfulqa"]) == {"lora"}
    for family in ("truthfulqa", "commonsense"):
        assert a["runs"][family]["lora"]["metrics"] == b["runs"][family]["lora"]["metrics"]
        assert a["runs"][family]["lora"]["mu_estimates"] == b["runs"][family]["lora"]["mu_estimates"]
    tqa = a["runs"]["truthfulqa"]["lora"]["metrics"]
    for key in ("mc1", "mc2", "mc3", "paper_mc1", "paper_mc2", "paper_mc3"):
        assert {"base", "peft", "svdecode", "validated", "mask_only", "static"} <= set(tqa[f"truthfulqa/{key}"])
        assert tqa[f"truthfulqa/{key}"]["peft"]["n"] == 6  # one score per question
    cs = a["runs"]["commonsense"]["lora"]["metrics"]
    assert {f"{t}/acc" for t in ("boolq", "piqa", "siqa", "winogrande", "arc_e", "arc_c", "obqa")} <= set(cs)
    assert "average/acc" in cs and cs["all/acc"]["peft"]["n"] == 7 * 3  # every item pooled, with a CI
    assert set(a["runs"]["commonsense"]["lora"]["deltas"]) == {"svdecode", "validated", "mask_only"}
    assert set(a["runs"]["truthfulqa"]["lora"]["generation"]) == {"peft", "svdecode"}
    out = tmp_path / "out0"
    md = (out / "results.md").read_text()
    assert "## Headline" in md and "### truthfulqa" in md and "### commonsense" in md and "HellaSwag" in md
    assert "## Calibration verdict vs evaluation" in md and "## Comparison with the paper" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["runs"].keys() == {"truthfulqa", "commonsense"}
    # `svd-ray eval --render-only` re-renders from results.json (sorted keys): the very same file
    from svd_ray.eval.runner import render_reports
    render_reports(EvalConfig.from_yaml(CONFIG, {"output_dir": str(out)}))
    assert (out / "results.md").read_text() == md


def test_per_item_scores_pairs_mc1_and_mc2_by_question():
    rows = [
        {"id": "q1", "source": "truthfulqa_mc1", "labels": [1, 0], "choices": [" a", " b"], "num_tokens": [1, 1],
         "peft": [-1.0, -2.0]},
        {"id": "q1", "source": "truthfulqa_mc2", "labels": [1, 1, 0], "choices": [" a", " c", " b"],
         "num_tokens": [1, 1, 1], "peft": [-1.0, -3.0, -2.0]},
    ]
    s = per_item_scores(rows)
    assert s["truthfulqa/mc1"]["peft"] == [1.0]
    assert s["truthfulqa/mc3"]["peft"] == [0.5]  # one of two true answers beats the best false one
    import math
    assert math.isclose(s["truthfulqa/mc2"]["peft"][0], (math.e ** -1 + math.e ** -3) / (math.e ** -1 + math.e ** -3 + math.e ** -2))


def test_eval_cli_bad_config_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [adalora]\n")
    assert main(["eval", str(bad)]) == 2
    assert "methods" in capsys.readouterr().err


@pytest.mark.integration
def test_user_jsonl_task_trains_calibrates_and_evaluates(tmp_path):
    from svd_ray.data import builtin_task, write_jsonl

    task = builtin_task(seed=3)
    items = [i for split in ("train", "calibration", "eval") for i in task.mc[split]][:40]
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, items)
    cfg = EvalConfig.model_validate({
        "name": "jsonl-e2e", "model": "tiny-llama", "methods": ["ia3"],
        "families": [{"task": f"jsonl:{path}", "calibration_size": 4, "eval_size": 5}],
        "training": {"max_steps": 1, "max_length": 64}, "num_shards": 1, "bootstrap_resamples": 100,
        "store": (tmp_path / "store").as_uri(), "output_dir": str(tmp_path / "out"),
    })
    res = run_evaluation(cfg, log=lambda s: None)
    run = res["runs"][f"jsonl:{path}"]["ia3"]
    assert run["sizes"]["eval"] == 5 and run["sizes"]["train"] == 16
    assert {"base", "peft", "svdecode"} <= set(run["metrics"]["builtin_addition/acc"])


def test_eval_cli_reports_every_format_error_of_a_user_jsonl_at_once(tmp_path, capsys):
    good = {"prompt": "Q: 1 + 1 = ?\nA:", "choices": [" 2", " 3"], "label": 0}
    lines = [json.dumps(good)] * 3 + [
        '{"prompt": "Q: 2 + 2 = ?\\nA:", "choices": [" 4", " 5"], "label": 0',      # line 4: bad JSON
        json.dumps({"prompt": "Q?", "choices": [" 4", " 5", " 4"], "label": 0}),      # line 5: duplicate option
        json.dumps({"prompt": "Q?", "choices": [" 4", "  "], "label": 0}),            # line 6: blank choice
    ] + [json.dumps(good)] * 2
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(json.dumps({
        "name": "bad-jsonl", "model": "tiny-llama", "methods": ["lora"], "families": [{"task": f"jsonl:{data}"}],
        "store": (tmp_path / "store").as_uri(), "output_dir": str(tmp_path / "out"),
    }))
    assert main(["eval", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "3 format errors" in err
    assert f"{data}:4: invalid JSON" in err
    assert f"{data}:5: field 'choices': choices must be distinct: choices[0] and choices[2] are both ' 4'" in err
    assert f"{data}:6: field 'choices[1]': must be a non-empty string" in err
    assert "Traceback" not in err and not (tmp_path / "store").exists()


@pytest.mark.integration
def test_interrupted_evaluation_resumes_from_its_cells_and_gives_the_same_table(tmp_path, monkeypatch):
    """Kill the run after two scored chunks: the rerun keeps those rows (scores only the rest) and ends with
    the table of an uninterrupted run; a third run reuses the finished cell without training or scoring."""
    from svd_ray.eval.cells import CellCache

    overrides = {"methods": ["lora"], "families": [{"task": "commonsense", "train_size": 4, "calibration_size": 4,
                                                    "eval_size": 3}]}

    def cfg(tag):
        return EvalConfig.from_yaml(CONFIG, {**overrides, "store": (tmp_path / f"store-{tag}").as_uri(),
                                             "output_dir": str(tmp_path / f"out-{tag}")})

    clean = run_evaluation(cfg("clean"), log=lambda s: None)["runs"]["commonsense"]["lora"]["metrics"]

    real_add, calls = CellCache.add_rows, []

    def add_then_die(self, rows):
        real_add(self, rows)
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill after two chunks")

    monkeypatch.setattr(CellCache, "add_rows", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg("resumed"), log=lambda s: None)
    monkeypatch.setattr(CellCache, "add_rows", real_add)
    # a torn last line (killed mid-write) is ignored and rescored
    rows_file = next((tmp_path / "out-resumed" / "cells").glob("*/rows.jsonl"))
    with rows_file.open("a") as f:
        f.write('{"source": "boolq", "id": "trunc')
    logs: list[str] = []
    again = run_evaluation(cfg("resumed"), log=logs.append)["runs"]["commonsense"]["lora"]["metrics"]
    assert again == clean
    resumed = [line for line in logs if "resuming:" in line]
    assert resumed and f"{sum(calls)} of 21 items" in resumed[0], logs
    logs.clear()
    third = run_evaluation(cfg("resumed"), log=logs.append)["runs"]["commonsense"]["lora"]["metrics"]
    assert third == clean
    assert any("reusing the finished cell" in line for line in logs)
    assert not any("trained + calibrated" in line or "scoring" in line for line in logs), logs


@pytest.mark.integration
def test_a_cell_interrupted_in_training_reuses_its_lr_search(tmp_path, monkeypatch):
    """The Ray Tune trials are saved in the cell before the warm-start: a run killed while training does not
    repeat them on restart, and the bundle records the same search."""
    from svd_ray.training import local

    cfg = EvalConfig.from_yaml(CONFIG, {
        "methods": ["lora"], "store": (tmp_path / "store").as_uri(), "output_dir": str(tmp_path / "out"),
        "families": [{"task": "commonsense", "train_size": 4, "calibration_size": 4, "eval_size": 1}],
        "training": {"max_steps": 2, "lr": 1.0e-3, "max_length": 512, "lr_search": {"lrs": [1e-9, 1e-2], "steps": 1}}})
    real_train = local.train_local

    def die(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during the warm-start")

    monkeypatch.setattr(local, "train_local", die)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg, log=logs.append)
    assert any("lr search (Ray Tune)" in line for line in logs)
    (saved,) = (tmp_path / "out" / "cells").glob("*/lr_search.json")
    record = json.loads(saved.read_text())["record"]

    monkeypatch.setattr(local, "train_local", real_train)
    logs.clear()
    result = run_evaluation(cfg, log=logs.append)
    assert not any("lr search (Ray Tune)" in line for line in logs), logs
    assert any("reusing the cell's lr search" in line for line in logs)
    trained = result["runs"]["commonsense"]["lora"]["training"]
    assert trained["lr_search"]["trials"] == record["trials"]
    check = trained["lr_search"]["final_checks"][-1]
    assert check["accepted"] and check["lr"] == trained["lr"] == trained["lr_search"]["chosen"]


def test_a_saved_lr_search_is_reused_only_for_the_same_search_config(tmp_path):
    from svd_ray.eval.cells import CellCache

    cache = CellCache(tmp_path, "run", {"k": 1})
    search = {"lrs": [1e-4, 1e-3], "steps": 48, "cpus_per_trial": 1, "max_concurrent_trials": None}
    assert cache.lr_search(search) is None
    cache.save_lr_search(search, {"chosen": 1e-3, "trials": []})
    assert CellCache(tmp_path, "run", {"k": 1}).lr_search(search) == {"chosen": 1e-3, "trials": []}
    assert cache.lr_search({**search, "steps": 96}) is None
    cache.lr_search_path.write_text('{"config": ')  # torn write: searched again, never a crash
    assert cache.lr_search(search) is None
    # the empty folder of a cell still training was removed (e.g. by a cleanup before a commit): writes recreate it
    import shutil

    shutil.rmtree(cache.dir)
    cache.save_lr_search(search, {"chosen": 1e-3, "trials": []})
    cache.add_rows([{"source": "boolq", "id": "x"}])
    assert cache.lr_search(search) == {"chosen": 1e-3, "trials": []} and list(cache.rows()) == [("boolq", "x")]
    shutil.rmtree(cache.dir)
    cache.bind({"digest": "d"})
    assert cache.meta() == {"digest": "d"}
