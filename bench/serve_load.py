"""Serving load benchmark: the real Serve app over HTTP on loopback, bounded in requests and time.

    python bench/serve_load.py                    # SmolLM2-135M, 3 tasks (LoRA, IA3, prompt tuning)
    python bench/serve_load.py --requests 16      # fewer requests per scenario

What it does (every number below comes from one run, printed side by side):
  1. publishes three small tasks (LoRA, IA3, prompt tuning; 8 training steps each) to a store under
     --workdir (reused by later runs), on the embedded default (local files);
  2. measures the model time of one steered request in this process (the engine alone, no HTTP);
  3. starts a private local Ray and the svd-ray Serve app (1 model replica with 1.8 CPUs → 2 torch
     threads, 1 ingress, auth off) on 127.0.0.1 and runs, each with a fixed number of requests:
       - one task, steered, at concurrency 1 / 4 / 8          → requests/s, tokens/s, p50 / p99
       - three tasks of three methods mixed, concurrency 1 / 8
       - small requests while a heavy one (a 1000-token prompt scored against 8 long choices, looped)
         is in flight, vs the same small requests idle         → p99 ratio
     and compares concurrency-1 latency over HTTP with the in-process model time (HTTP + Serve overhead).
Every loop is bounded by a request count and a deadline; only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore")
TASKS = {"bench-lora": "lora", "bench-ia3": "ia3", "bench-prompt": "prompt_tuning"}
PROMPTS = [f"Q: {a} + {b} = ?\nA:" for a, b in [(2, 3), (7, 5), (11, 4), (9, 9), (12, 30), (6, 1), (40, 2), (8, 13)]]


def publish_tasks(store_uri: str, model: str) -> None:
    from svd_ray.config import RunConfig
    from svd_ray.store import open_store
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.publish import publish_bundle
    from svd_ray.training.task_data import load_task_data

    store = open_store(store_uri)
    for task, method in TASKS.items():
        try:
            store.resolve(task, "latest")
            continue  # published by an earlier run
        except Exception:
            pass
        cfg = RunConfig.model_validate({
            "run_id": f"{task}-bench", "task_name": task, "model": model, "peft": {"method": method},
            "data": {"task": "builtin:addition", "train_size": 8, "calibration_size": 4},
            "training": {"epochs": 1, "lr": 1e-3, "batch_size": 1, "max_length": 48, "log_every": 100},
            "store": store_uri,
        })
        t0 = time.perf_counter()
        data = load_task_data(cfg.data)
        peft_model, tok, ref = prepare_model(cfg)
        metrics = train_local(peft_model, tok, data.train, cfg, log=lambda *a: None)
        acc = calibrate_local(peft_model, tok, data.calibration, cfg, progress=None)
        publish_bundle(cfg, ref, peft_model, acc, data.split, {"train": metrics.to_dict()})
        print(f"# published {task} ({method}) in {time.perf_counter() - t0:.0f} s", flush=True)


def model_time(store_uri: str, model: str, new_tokens: int, n: int) -> float:
    """Median seconds for one steered request through the engine in this process (no HTTP, no Serve)."""
    import torch

    from svd_ray.serving.handlers import run_generate
    from svd_ray.serving.pool import ModelPool
    from svd_ray.serving.schemas import generation_payload
    from svd_ray.store import open_store

    torch.set_num_threads(2)
    pool = ModelPool(open_store(store_uri), allowed_bases=[model], device="cpu")
    lt = pool.acquire("bench-lora")
    times = []
    for i in range(-1, n):
        req = generation_payload("bench-lora", [PROMPTS[i % len(PROMPTS)]], max_new_tokens=new_tokens, temperature=0,
                                 top_p=1.0, top_k=0, steering={"mode": "svdecode", "mu": None, "alpha": None},
                                 min_new_tokens=new_tokens)
        t0 = time.perf_counter()
        run_generate(lt, req)
        if i >= 0:  # the first one warms up; then the same 8 prompts as the HTTP runs
            times.append(time.perf_counter() - t0)
    pool.close()
    return statistics.median(times)


def post(url: str, body: dict, timeout: float = 300) -> tuple[float, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, out


def run_load(base: str, tasks: list[str], concurrency: int, requests: int, new_tokens: int, deadline_s: float) -> dict:
    lat, tokens = [], 0
    stop_at = time.monotonic() + deadline_s
    lock = threading.Lock()

    def one(i: int):
        nonlocal tokens
        if time.monotonic() > stop_at:
            return
        task = tasks[i % len(tasks)]
        dt, out = post(f"{base}/v1/tasks/{task}/generate",
                       {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                        "steering": "svdecode"})  # explicit: a task's default may be off (validated μ̄)
        with lock:
            lat.append(dt)
            tokens += out["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"n": len(lat), "rps": len(lat) / wall, "tps": tokens / wall, "p50": lat[len(lat) // 2],
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def heavy_body() -> dict:
    """Within the default limits: a ~1000-token prompt and 8 choices of ~400 tokens (one token per word)."""
    return {"prompt": "the" + " the" * 999, "choices": [" the" * 400 + f" {k}" for k in range(8)],
            "steering": "svdecode"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "svd-ray-bench"))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds per scenario at most")
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store_uri = (work / "store").as_uri()
    publish_tasks(store_uri, args.model)
    t_model = model_time(store_uri, args.model, args.new_tokens, 8)
    print(f"# in-process model time, one steered request of {args.new_tokens} tokens: {t_model:.3f} s", flush=True)

    import ray
    from ray import serve

    from svd_ray.serving.deployments import make_app

    temp_dir = tempfile.mkdtemp(prefix="svdbench-", dir="/tmp")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             _temp_dir=temp_dir, namespace="bench")
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {"store": store_uri, "base_models": [args.model], "auth": "disabled",
                    "pool": {"max_tasks": 4, "pin": list(TASKS), "device": "cpu"}}
        app = make_app(app_args, model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1.8},
                                                "max_ongoing_requests": 16},
                       ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}})
        serve.run(app, name="svd-ray", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        for task in TASKS:  # warm-up: every task loaded, kernels warm
            post(f"{base}/v1/tasks/{task}/generate", {"prompt": PROMPTS[0], "max_new_tokens": 4})
        one = ["bench-lora"]
        mixed = list(TASKS)
        results = {}
        for name, tasks, conc in [("1 task", one, 1), ("1 task", one, 4), ("1 task", one, 8),
                                  ("3 tasks mixed", mixed, 1), ("3 tasks mixed", mixed, 8)]:
            n = max(conc * 3, min(args.requests, conc * 6)) if conc > 1 else max(6, args.requests // 3)
            r = run_load(base, tasks, conc, n, args.new_tokens, args.deadline)
            results[(name, conc)] = r
            rows.append((name, conc, r))
            print(f"# {name:<14} c={conc}: {r['n']} req, {r['rps']:.2f} req/s, {r['tps']:.1f} tok/s, "
                  f"p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s", flush=True)
        # heavy request in flight (looped from another thread) vs idle
        idle = run_load(base, ["bench-ia3"], 1, 8, 4, args.deadline)
        stop = threading.Event()
        heavy_times = []

        def heavy_loop():
            while not stop.is_set():
                try:
                    heavy_times.append(post(f"{base}/v1/tasks/bench-prompt/score", heavy_body())[0])
                except urllib.error.HTTPError as exc:
                    heavy_times.append(float("nan"))
                    print(f"# heavy request answered {exc.code}: {exc.read()[:200]!r}", flush=True)
                    return

        th = threading.Thread(target=heavy_loop, daemon=True)
        th.start()
        time.sleep(1.0)
        busy = run_load(base, ["bench-ia3"], 1, 8, 4, args.deadline)
        stop.set()
        th.join(timeout=args.deadline)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    print()
    print(f"## serving load — {args.model}, 2-core CPU, 1 model replica (2 torch threads), greedy, svdecode, "
          f"{args.new_tokens} new tokens")
    print()
    print("| scenario | concurrency | requests | req/s | tok/s | p50 s | p99 s | req/s vs c=1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, conc, r in rows:
        ref = results[(name, 1)]["rps"]
        print(f"| {name} | {conc} | {r['n']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['rps'] / ref:.2f}× |")
    print()
    print(f"| small requests (4 tokens, ia3) | p50 s | p99 s |\n|---|---|---|\n| idle | {idle['p50']:.2f} | {idle['p99']:.2f} |\n"
          f"| heavy score request in flight ({len(heavy_times)} heavy done, "
          f"{statistics.median(heavy_times) if heavy_times else float('nan'):.1f} s each) | {busy['p50']:.2f} | "
          f"{busy['p99']:.2f} |\n| ratio | {busy['p50'] / idle['p50']:.2f}× | {busy['p99'] / idle['p99']:.2f}× |")
    http = results[("1 task", 1)]["p50"]
    print()
    print(f"HTTP + Serve overhead at concurrency 1: p50 over HTTP {http:.3f} s vs in-process model time "
          f"{t_model:.3f} s → {100 * (http - t_model) / t_model:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
