"""Fast checks of the distributed-training pieces that need no Ray cluster."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from training_helpers import tiny_config
from svd_ray.config import ClusterConfig, RunConfig, TrainingConfig
from svd_ray.training import jobs_client
from svd_ray.training.deepspeed_config import deepspeed_config, dist_backend
from svd_ray.training.distributed_calibration import (
    calibrate_distributed,
    calibrate_shard,
    randomize_adapter,
    shard,
    shard_bounds,
)
from svd_ray.training.ray_train import config_fingerprint, train_storage
from svd_ray.training.ray_worker import step_examples


# ------------------------------------------------------------------------------------ DeepSpeed config


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_config_stages(stage):
    ds = deepspeed_config(ClusterConfig(zero_stage=stage, num_workers=2), TrainingConfig(lr=3e-4, batch_size=2))
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True and opt["params"]["lr"] == 3e-4
    assert opt["params"]["weight_decay"] == 0.01  # torch.optim.AdamW's default = the local path
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_deepspeed_config_precision_and_backend():
    ds = deepspeed_config(ClusterConfig(precision="bf16"), TrainingConfig())
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    gpu = ClusterConfig(precision="fp16", use_gpu=True)
    assert deepspeed_config(gpu, TrainingConfig())["fp16"]["enabled"]
    assert dist_backend(gpu) == "nccl" and dist_backend(ClusterConfig()) == "gloo"
    with pytest.raises(ValueError, match="fp16"):
        ClusterConfig(precision="fp16")  # CPU fp16 is rejected by the config itself


# ------------------------------------------------------------------------------------ data sharding


def test_step_examples_partition_each_epoch():
    items = list(range(12))
    for world in (1, 2, 3):
        for bs in (1, 2):
            per_epoch = math.ceil(len(items) / (bs * world))
            for epoch in range(2):
                seen = []
                for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                    for r in range(world):
                        got = step_examples(items, s, batch_size=bs, world_size=world, rank=r, seed=7)
                        assert len(got) == bs
                        seen += got
                assert sorted(seen) == items, (world, bs, epoch)  # 12 divisible: exactly once per epoch


def test_step_examples_pads_by_wrapping_and_is_deterministic():
    items = list(range(5))
    steps = [step_examples(items, s, batch_size=1, world_size=2, rank=r, seed=0) for s in range(3) for r in range(2)]
    flat = [x for b in steps for x in b]
    assert len(flat) == 6 and set(flat) == set(items)  # one example repeated to fill the last step
    again = [step_examples(items, s, batch_size=1, world_size=2, rank=r, seed=0) for s in range(3) for r in range(2)]
    assert steps == again
    other_seed = [step_examples(items, s, batch_size=1, world_size=2, rank=r, seed=1) for s in range(3) for r in range(2)]
    assert other_seed != steps


def test_single_worker_order_matches_local_epoch_order():
    from svd_ray.training.local import epoch_order

    items = list(range(8))
    got = [step_examples(items, s, batch_size=2, world_size=1, rank=0, seed=3) for s in range(4)]
    order = epoch_order(items, 3, 0)
    assert got == [order[i : i + 2] for i in range(0, 8, 2)]


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (16, 2), (16, 4)])
def test_shards_are_contiguous_and_cover(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert [x for p in parts for x in p] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_bounds(n, 0, 1) == (0, n)
    with pytest.raises(ValueError):
        shard_bounds(n, world, world)


# ------------------------------------------------------------------------------------ calibration shards


@pytest.fixture(scope="module")
def tiny_adapter():
    from svd_ray.training.local import prepare_model
    from svd_ray.training.task_data import load_task_data

    cfg = tiny_config("/tmp/unused-store")
    peft_model, tok, _ = prepare_model(cfg)
    randomize_adapter(peft_model, seed=1)
    peft_model.eval()
    return cfg, peft_model, tok, load_task_data(cfg.data).calibration


def test_shard_accumulators_merge_to_the_whole(tiny_adapter):
    cfg, model, tok, examples = tiny_adapter
    kw = dict(alpha=0.1, batch_size=4, max_length=64)
    whole = calibrate_distributed(model, tok, examples, **kw)  # no process group: the plain calibration
    parts = [calibrate_shard(model, tok, examples, rank=r, world_size=2, **kw) for r in range(2)]
    merged = parts[0].merge(parts[1])
    assert merged.count == whole.count > 0
    assert merged.mean() == pytest.approx(whole.mean(), rel=1e-12)
    assert torch.equal(merged.hist_count, whole.hist_count)
    torch.testing.assert_close(merged.sum_delta, whole.sum_delta, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("world", [3, 5, 24])  # shard edges off the batch grid; 24 > 16 examples: empty shards
def test_misaligned_and_empty_shards_merge_to_the_whole(tiny_adapter, world):
    """Shards whose boundaries do not fall on calibration batches (other padding, other batch mates) and
    ranks with no example at all still add up to the single-worker statistics — including the validation
    and its exactly scored candidates."""
    cfg, model, tok, examples = tiny_adapter
    kw = dict(alpha=0.1, batch_size=4, max_length=64)
    whole = calibrate_distributed(model, tok, examples, **kw)
    parts = [calibrate_shard(model, tok, examples, rank=r, world_size=world, **kw) for r in range(world)]
    assert sum(p.count == 0 for p in parts) == (world - len(examples) if world > len(examples) else 0)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    merged.score_candidates_()
    assert merged.count == whole.count > 0
    for name in ("mean", "median", "sequence", "trimmed_mean"):
        assert merged.estimate(name) == pytest.approx(whole.estimate(name), rel=1e-5), name
    torch.testing.assert_close(merged.validation.nll, whole.validation.nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.validation.cand_nll, whole.validation.cand_nll, rtol=1e-5, atol=1e-6)
    assert merged.validation.choose()["steer"] == whole.validation.choose()["steer"]


def test_randomize_adapter_is_seeded(tiny_adapter):
    from svd_ray.training.local import prepare_model

    cfg, model, *_ = tiny_adapter
    other, _, _ = prepare_model(cfg)
    randomize_adapter(other, seed=1)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n


def test_publish_twice_with_same_run_is_idempotent(tiny_adapter, tmp_path):
    from svd_ray.store import open_store
    from svd_ray.training.ray_worker import _publish

    cfg, model, tok, examples = tiny_adapter
    cfg = tiny_config(tmp_path / "store", "pub-twice")
    acc = calibrate_distributed(model, tok, examples, alpha=0.1, batch_size=4, max_length=64)
    from svd_ray.models import resolve_model

    ref = resolve_model("tiny-llama")
    first = _publish(cfg, ref, model, acc, {"seed": 0}, {"train": {}})
    second = _publish(cfg, ref, model, acc, {"seed": 0}, {"train": {}})
    assert not first["already_published"] and second["already_published"]
    assert first["version"] == second["version"] == "pub-twice"
    assert open_store(cfg.store).list_versions(cfg.task) == ["pub-twice"]
    changed = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": 0.5})})
    with pytest.raises(ValueError, match="different config"):
        _publish(changed, ref, model, acc, {"seed": 0}, {"train": {}})


# ------------------------------------------------------------------------------------ run identity


def test_config_fingerprint_ignores_cluster_size_but_not_training(tmp_path):
    cfg = tiny_config(tmp_path)
    same = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"max_failures": 5})})
    assert config_fingerprint(cfg) == config_fingerprint(same)
    other = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": 0.1})})
    assert config_fingerprint(cfg) != config_fingerprint(other)
    fs, path = train_storage(cfg)
    assert fs is None and path == str(tmp_path) + "/ray-train"


# ------------------------------------------------------------------------------------ CLI


def _main(argv, capsys):
    from svd_ray.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


def test_cli_train_missing_config(capsys, tmp_path):
    rc, out = _main(["train", str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2
    assert out.err.strip().count("\n") == 0 and "config file not found" in out.err


def test_cli_train_bad_field_names_it(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: x\ntraining:\n  lr: -1\n  epochz: 2\n")
    rc, out = _main(["train", str(bad)], capsys)
    assert rc == 2
    line = out.err.strip()
    assert "\n" not in line and "training.lr" in line and "training.epochz: unknown field" in line
    rc, out = _main(["train", str(bad), "--set", "training.lr=0.1", "--set", "training.epochz"], capsys)
    assert rc == 2 and "--set expects KEY=VALUE" in out.err


def test_cli_status_needs_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    rc, out = _main(["status", "some-run"], capsys)
    assert rc == 2 and "--address" in out.err


def test_cli_registers_commands():
    from svd_ray.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["submit", "train", "c.yaml", "--address", "http://h:8265", "--wait", "--set", "a=1"])
    assert args.kind == "train" and args.wait and args.set == ["a=1"] and callable(args.func)
    assert callable(parser.parse_args(["logs", "r", "--follow"]).func)
    assert callable(parser.parse_args(["train", "c.yaml"]).func)


# ------------------------------------------------------------------------------------ Ray Jobs client


class FakeJobs:
    """Just enough of JobSubmissionClient for the submit logic."""

    def __init__(self, existing=None):
        self.jobs = dict(existing or {})
        self.deleted, self.submitted = [], []
        self._address = "http://fake:8265"

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return SimpleNamespace(status=self.jobs[job_id], message="", start_time=None, end_time=None)

    def delete_job(self, job_id):
        self.deleted.append(job_id)
        del self.jobs[job_id]

    def submit_job(self, **kw):
        import os

        wd = kw["runtime_env"]["working_dir"]
        self.submitted.append({**kw, "files": sorted(os.listdir(wd)),
                               "config": open(os.path.join(wd, "config.yaml")).read()})
        self.jobs[kw["submission_id"]] = "PENDING"
        return kw["submission_id"]


def test_submit_uses_run_id_and_ships_resolved_config(monkeypatch, tmp_path):
    import yaml

    fake = FakeJobs()
    monkeypatch.setattr(jobs_client, "connect", lambda address: fake)
    cfg = tiny_config(tmp_path, "job-1")
    assert jobs_client.submit_train(cfg, "http://fake:8265", log=lambda *_: None) == "job-1"
    sub = fake.submitted[0]
    assert sub["submission_id"] == "job-1" and sub["entrypoint"] == "python warmstart.py config.yaml"
    assert sub["files"] == ["config.yaml", "warmstart.py"] and sub["entrypoint_num_cpus"] == 0
    assert RunConfig.model_validate(yaml.safe_load(sub["config"])) == cfg


def test_resubmit_replaces_ended_job_but_not_running_one(monkeypatch, tmp_path):
    cfg = tiny_config(tmp_path, "job-2")
    fake = FakeJobs({"job-2": "FAILED"})
    monkeypatch.setattr(jobs_client, "connect", lambda address: fake)
    jobs_client.submit_train(cfg, "http://fake:8265", log=lambda *_: None)
    assert fake.deleted == ["job-2"] and len(fake.submitted) == 1
    fake.jobs["job-2"] = "RUNNING"
    with pytest.raises(ValueError, match="already has a RUNNING job"):
        jobs_client.submit_train(cfg, "http://fake:8265", log=lambda *_: None)


def test_last_progress_and_address():
    logs = "x\n(RayTrainWorker pid=1) [r] step 2/10  loss 1.0  5 tok/s  elapsed 1s  eta 4s\n" \
           "(RayTrainWorker pid=1) [r] step 4/10  loss 0.9  5 tok/s  elapsed 2s  eta 3s\nother\n"
    assert jobs_client.last_progress(logs).startswith("[r] step 4/10")
    assert jobs_client.last_progress("nothing") is None
    colored = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m [run-1] step 3/9  loss 2.0  eta 1s\n"
    assert jobs_client.last_progress(colored) == "[run-1] step 3/9  loss 2.0  eta 1s"
    assert jobs_client.resolve_address("http://h:8265/") == "http://h:8265"
    with pytest.raises(ValueError):
        jobs_client.resolve_address("ray://h:10001")


# ------------------------------------------------------------------------------------ adapter hand-off


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "p_tuning_v2"])
def test_consolidated_adapter_state_survives_publish_and_reload(method, tmp_path):
    """The worker hands the trained adapter over as {name: fp32 tensor} → fresh model → bundle → reload."""
    from svd_ray.decoding import DualModel
    from svd_ray.models import load_base_model, resolve_model
    from svd_ray.models.peft_methods import load_peft_model
    from svd_ray.store import open_store
    from svd_ray.training.local import prepare_model
    from svd_ray.training.ray_worker import _publish, load_adapter_state

    cfg = tiny_config(tmp_path / "store", f"handoff-{method.replace('_', '-')}", peft={"method": method})
    trained, tok, ref = prepare_model(cfg)
    randomize_adapter(trained, seed=5)
    state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    fresh, _, _ = prepare_model(cfg)
    load_adapter_state(fresh, state)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(fresh, dict(list(state.items())[1:]))
    trained.eval()
    fresh.eval()
    ids = tok("Q: 2 + 2 = ?\nA: 4", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = DualModel(trained).teacher_forced_logits(ids, with_base=False)[0]
    from svd_ray.training.task_data import load_task_data

    acc = calibrate_distributed(fresh, tok, load_task_data(cfg.data).calibration[:4], alpha=0.1, batch_size=4,
                                max_length=64)
    pub = _publish(cfg, ref, fresh, acc, {"seed": 0}, {"train": {}})
    path, _ = open_store(cfg.store).fetch(cfg.task, pub["version"], dest_dir=tmp_path / "bundle")
    loaded = load_peft_model(load_base_model(resolve_model("tiny-llama")), str(path / "adapter"))
    with torch.no_grad():
        got = DualModel(loaded).teacher_forced_logits(ids, with_base=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
