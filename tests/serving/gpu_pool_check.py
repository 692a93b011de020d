"""GPU check of the serving ModelPool (pool.device auto → cuda): 4 PEFT methods on one shared base, vs CPU.

Not collected by pytest (no GPU in CI). Runs on the lent GPU machine, whose image has torch/transformers/peft
but neither Ray nor pydantic, so it uses only ``svd_ray.serving.pool`` / ``handlers`` and the store. How it was run:

    # here: build the fixture (sharp tiny base + 4 bundles) and put it in an ignored folder that travels
    python -c "import sys; sys.path.insert(0, 'tests/serving'); from pathlib import Path; \
        from serving_helpers import *; b = make_sharp_base(Path('/tmp/svdgpu/sharp-tiny')); \
        [publish_task('file:///tmp/svdgpu/store', t, m, b, seed=i) for i, (t, m) in enumerate(TASKS.items())]"
    mkdir -p .svdgpu && cp -r /tmp/svdgpu/sharp-tiny /tmp/svdgpu/store .svdgpu/ && cp tests/serving/gpu_pool_check.py .svdgpu/
    # there (carry .svdgpu):  mkdir -p /tmp/svdgpu && python3 .svdgpu/gpu_pool_check.py

Result on an H100 (torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0), 2026-11-26: every task's parameters on
cuda, greedy tokens == CPU 12/12 for each of LoRA / IA3 / prompt tuning / P-Tuning v2 (svdecode, off, static,
μ override), scores within 4e-6 of CPU, streaming == non-streaming — ALL OK.
"""
import os, shutil, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.getcwd())
for name in ("sharp-tiny", "store"):
    shutil.rmtree(f"/tmp/svdgpu/{name}", ignore_errors=True)
    shutil.copytree(f".svdgpu/{name}", f"/tmp/svdgpu/{name}")
import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from svd_ray.store import open_store
from svd_ray.serving.handlers import run_generate, run_score, run_stream
from svd_ray.serving.pool import ModelPool
def generation_payload(task, prompts, max_new_tokens, temperature, top_p, top_k, stop, steering):
    return {"task": task, "prompts": prompts, "gen": {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": 1.0,
            "top_k": 0, "top_p": 1.0, "num_beams": 1, "length_penalty": 1.0, "seed": None, "stop_strings": list(stop or [])},
            "steering": steering}
store = open_store("file:///tmp/svdgpu/store", cache_dir="/tmp/svdgpu/cache")
base = "/tmp/svdgpu/sharp-tiny"
gpu = ModelPool(store, allowed_bases=[base], device="auto")
cpu = ModelPool(store, allowed_bases=[base], device="cpu")
print("pool device", gpu.device)
prompts = ["Q: 2 + 3 = ?\nA:", "Hello there, my friend", "Q: 7 + 1 = ?\nA:"]
def req(task, mode="svdecode", mu=None, stop=None, n=8):
    return generation_payload(task, prompts, max_new_tokens=n, temperature=0.0, top_p=1.0, top_k=0, stop=stop,
                              steering={"mode": mode, "mu": mu, "alpha": None})
ok = True
for task in ["t-lora", "t-ia3", "t-prompt", "t-ptv2"]:
    t0 = time.perf_counter(); g = gpu.acquire(task); load = time.perf_counter() - t0
    c = cpu.acquire(task)
    devs = {p.device.type for p in g.tm.peft_model.parameters()}
    same = agree = 0
    for mode, mu in [("svdecode", None), ("off", None), ("static", None), ("svdecode", 40.0)]:
        a = run_generate(g, req(task, mode, mu)); b = run_generate(c, req(task, mode, mu))
        for x, y in zip(a["results"], b["results"]):
            same += 1; agree += x["token_ids"] == y["token_ids"]
    sa = run_score(g, {"task": task, "prompt": prompts[0], "choices": [" 5", " 6", " 12"], "steering": {"mode": "svdecode", "mu": 20.0}})
    sb = run_score(c, {"task": task, "prompt": prompts[0], "choices": [" 5", " 6", " 12"], "steering": {"mode": "svdecode", "mu": 20.0}})
    dl = max(abs(x["loglik"][w] - y["loglik"][w]) for x, y in zip(sa["choices"], sb["choices"]) for w in ("steered", "adapter", "base"))
    ev = []; run_stream(g, req(task, stop=["e"]), ev.append, lambda: False)
    whole = run_generate(g, req(task, stop=["e"]))
    stream_ok = all("".join(e["text"] for e in ev if e["event"] == "token" and e["index"] == i) == r["text"]
                    for i, r in enumerate(whole["results"]))
    good = devs == {"cuda"} and dl < 1e-3 and stream_ok and agree >= same - 1
    ok &= good
    print(f"{task:9s} {g.method:14s} params on {sorted(devs)} load {load:.2f}s own {g.nbytes/1e6:.2f} MB "
          f"greedy tokens == CPU {agree}/{same}  score max|Δ| {dl:.1e}  stream==non-stream {stream_ok}  {'OK' if good else 'FAIL'}")
st = gpu.stats()
print("gpu pool bytes", st["bytes"], "bases", st["bases"], "cuda allocated", torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
t0 = time.perf_counter()
for _ in range(20): run_generate(gpu.acquire("t-lora"), req("t-lora", n=16))
torch.cuda.synchronize() if torch.cuda.is_available() else None; print(f"20 × generate(3 prompts, 16 tokens) on GPU: {time.perf_counter()-t0:.2f}s")
print("ALL OK" if ok else "SOME FAILED")
