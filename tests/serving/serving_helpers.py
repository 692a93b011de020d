"""Real task bundles for the serving tests, made fast on a tiny model.

The registry's ``tiny-llama`` is random-init with small weights, so its next-token distribution is
almost uniform and steering barely moves anything. The fixture base ("sharp tiny") is the same model
with its (tied) embeddings scaled ×8, which gives peaked distributions, and each adapter gets a
seeded nudge after its 2 training steps so that adapter-on and adapter-off clearly differ. Bundles are
published through the normal training path (``publish_bundle``) into a ``file://`` store.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import torch

KEYS = {  # tenant → raw key (tests only)
    "alpha": "test-key-alpha-0000000001",
    "beta": "test-key-beta-00000000002",
    "bulk": "test-key-bulk-00000000003",
    "slow": "test-key-slow-00000000004",
}
TASKS = {"t-lora": "lora", "t-ia3": "ia3", "t-prompt": "prompt_tuning", "t-ptv2": "p_tuning_v2"}
TENANT_TASKS = {"alpha": ["t-lora", "t-ia3", "t-prompt"], "beta": ["t-ptv2"], "bulk": "*", "slow": ["t-lora"]}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_sharp_base(out: Path, scale: float = 8.0, context: int = 4096) -> str:
    """``tiny-llama`` with embeddings × ``scale`` and a ``context`` of 4096 positions (RoPE, no learned
    positions: only the limit changes), so that requests can be long enough to test the server's budgets."""
    from svd_ray.models import load_base_model, load_tokenizer, resolve_model

    if (out / "config.json").exists():
        return str(out)
    ref = resolve_model("tiny-llama")
    model = load_base_model(ref)
    tok = load_tokenizer(ref)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    model.config.max_position_embeddings = context
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def publish_task(store_uri: str, task: str, method: str, base: str, seed: int = 0, noise: float = 0.3):
    """Warm-start 2 steps + calibrate on builtin addition, nudge the adapter, publish. Returns the manifest."""
    from svd_ray.config import RunConfig
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.publish import publish_bundle
    from svd_ray.training.task_data import load_task_data

    cfg = RunConfig.model_validate({
        "run_id": task, "model": base,
        "peft": {"method": method, "num_virtual_tokens": 4, "encoder_hidden_size": 16},
        "data": {"task": "builtin:addition", "train_size": 4, "calibration_size": 4},
        "training": {"max_steps": 2, "lr": 1e-2, "log_every": 100, "seed": seed},
        # the paper's μ̄: these tests are about serving steering, which the validated estimator may switch off
        # for a task (that decision is tested in tests/test_mu_validation.py and tests/test_demo_local.py)
        "calibration": {"estimator": "mean"},
        "store": store_uri,
    })
    data = load_task_data(cfg.data)
    peft_model, tok, ref = prepare_model(cfg)
    metrics = train_local(peft_model, tok, data.train, cfg, log=lambda *a: None)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn(p.shape, generator=g))
    acc = calibrate_local(peft_model, tok, data.calibration, cfg)
    return publish_bundle(cfg, ref, peft_model, acc, data.split, {"train": metrics.to_dict()})


def write_tenants(path: Path, rates: dict | None = None) -> Path:
    import yaml

    rates = rates or {}
    tenants = {}
    for name, key in KEYS.items():
        tenants[name] = {
            "keys_sha256": [hashlib.sha256(key.encode()).hexdigest()],
            "tasks": TENANT_TASKS[name],
            "rate_limit": rates.get(name, {"requests_per_second": 1000, "burst": 1000}),
            "admin": name == "bulk",
        }
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def auth(tenant: str | None) -> dict:
    return {} if tenant is None else {"Authorization": f"Bearer {KEYS[tenant]}"}


def reference_model(store, task: str, base: str, version: str | None = None):
    """``TaskModel.from_bundle`` on a fresh copy of the base: what a served request must match."""
    from svd_ray.engine import TaskModel

    path, manifest = store.fetch(task, version or "latest")
    return TaskModel.from_bundle(path, model=base), manifest
