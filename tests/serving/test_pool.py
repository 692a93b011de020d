"""ModelPool and the replica's model work, in-process (no Ray): the same code a model replica runs."""
from __future__ import annotations

import pytest
import torch

from serving_helpers import publish_task, reference_model

from svd_ray.decoding import GenerationConfig
from svd_ray.serving.errors import InputError, TaskNotFound, TaskUnavailable
from svd_ray.serving.handlers import run_generate, run_score, run_stream
from svd_ray.serving.pool import ModelPool
from svd_ray.serving.schemas import generation_payload

PROMPTS = ["Q: 2 + 3 = ?\nA:", "Hello there, my friend", "Q: 7 + 1 = ?\nA:"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # like a replica with < 2 CPUs: bit-identical reference results
    yield
    torch.set_num_threads(old)


def make_pool(store, bundles, **kw) -> ModelPool:
    kw.setdefault("allowed_bases", [bundles["base"]])
    kw.setdefault("device", "cpu")
    return ModelPool(store, **kw)


def gen_req(task, prompts=PROMPTS, n=6, mode="svdecode", mu=None, temperature=0.0, seed=None, stop=None, beams=1):
    return generation_payload(task, prompts, max_new_tokens=n, temperature=temperature, top_p=1.0, top_k=0,
                              num_beams=beams, seed=seed, stop=stop, steering={"mode": mode, "mu": mu, "alpha": None})


@pytest.fixture(scope="module")
def shared_pool(store, bundles):
    pool = make_pool(store, bundles)
    for task in bundles["tasks"]:
        pool.acquire(task)
    return pool


def test_tasks_share_one_base_copy(shared_pool, bundles):
    st = shared_pool.stats()
    assert set(st["tasks"]) == set(bundles["tasks"])
    assert list(st["bases"]) == [bundles["base"]]
    base = shared_pool._bases[bundles["base"]]
    for task in bundles["tasks"]:
        lt = shared_pool.get(task)
        core = lt.tm.dual.core
        core_params = {id(p) for p in core.parameters()}
        assert {id(p) for p in base.model.parameters()} <= core_params | {id(p) for p in lt.tm.peft_model.parameters()}
        # the per-task bytes are the adapter's, far below a base copy
        assert 0 < lt.nbytes < base.nbytes / 4, (task, lt.nbytes, base.nbytes)
    assert st["bytes"] < base.nbytes * 1.5


@pytest.mark.parametrize("task", ["t-lora", "t-prompt", "t-ia3", "t-ptv2"])
def test_served_equals_from_bundle(shared_pool, store, bundles, task):
    """LoRA, IA3 and both prompt methods loaded side by side in one pool == a fresh TaskModel.from_bundle."""
    ref, manifest = reference_model(store, task, bundles["base"])
    lt = shared_pool.acquire(task)
    assert lt.version == manifest.version
    for mode, mu in [("svdecode", None), ("off", None), ("static", None), ("svdecode", 40.0)]:
        got = run_generate(lt, gen_req(task, mode=mode, mu=mu))
        want = ref.generate(PROMPTS, GenerationConfig(max_new_tokens=6), ref.steering(mode, mu=mu))
        assert [r["token_ids"] for r in got["results"]] == [w.token_ids for w in want], (task, mode, mu)
        assert [r["text"] for r in got["results"]] == [w.text for w in want]
    for mode in ("svdecode", "off"):
        got = run_score(lt, {"task": task, "prompt": PROMPTS[0], "choices": [" 5", " 6", " 12"],
                             "steering": {"mode": mode}})
        want = ref.score(PROMPTS[0], [" 5", " 6", " 12"], ref.steering(mode))
        for c, s, a in zip(got["choices"], want.steered, want.adapter):
            assert c["loglik"]["steered"] == pytest.approx(s, abs=1e-5)
            assert c["loglik"]["adapter"] == pytest.approx(a, abs=1e-5)


def test_sampling_and_beams_equal_reference(shared_pool, store, bundles):
    ref, _ = reference_model(store, "t-lora", bundles["base"])
    lt = shared_pool.acquire("t-lora")
    got = run_generate(lt, gen_req("t-lora", temperature=0.9, seed=11))
    # prompt i of a request samples with its own generator seeded seed + i (so batching never changes it)
    want = [ref.generate([p], GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.9, seed=11 + i))[0]
            for i, p in enumerate(PROMPTS)]
    assert [r["token_ids"] for r in got["results"]] == [w.token_ids for w in want]
    got = run_generate(lt, gen_req("t-lora", beams=3))
    want = ref.generate(PROMPTS, GenerationConfig(max_new_tokens=6, num_beams=3))
    assert [r["token_ids"] for r in got["results"]] == [w.token_ids for w in want]


def test_steering_changes_outputs_where_expected(shared_pool):
    lt = shared_pool.acquire("t-lora")
    off = run_generate(lt, gen_req("t-lora", mode="off"))
    strong = run_generate(lt, gen_req("t-lora", mu=100.0))
    assert [r["token_ids"] for r in off["results"]] != [r["token_ids"] for r in strong["results"]]
    for task in ("t-lora", "t-prompt"):
        lt = shared_pool.acquire(task)
        on = run_score(lt, {"task": task, "prompt": PROMPTS[0], "choices": [" 5", " 6"],
                            "steering": {"mode": "svdecode", "mu": 20.0}})
        off = run_score(lt, {"task": task, "prompt": PROMPTS[0], "choices": [" 5", " 6"], "steering": {"mode": "off"}})
        assert any(abs(c["loglik"]["steered"] - c["loglik"]["adapter"]) > 1e-4 for c in on["choices"])
        assert all(c["loglik"]["steered"] == pytest.approx(c["loglik"]["adapter"], abs=1e-6) for c in off["choices"])
        for c in on["choices"]:
            assert c["loglik"]["base"] != pytest.approx(c["loglik"]["adapter"], abs=1e-4)  # adapter does something
        assert sum(c["prob"]["steered"] for c in on["choices"]) == pytest.approx(1.0)


@pytest.mark.parametrize("stop", [None, ["e"], ["Q", " f"]])
def test_stream_equals_non_stream(shared_pool, stop):
    lt = shared_pool.acquire("t-prompt")
    req = gen_req("t-prompt", n=8, stop=stop)
    whole = run_generate(lt, req)
    events = []
    run_stream(lt, req, events.append, lambda: False)
    assert events[0]["event"] == "meta" and events[-1]["event"] == "usage"
    for i, r in enumerate(whole["results"]):
        text = "".join(e["text"] for e in events if e["event"] == "token" and e["index"] == i)
        ends = [e for e in events if e["event"] == "end" and e["index"] == i]
        assert text == r["text"]
        assert len(ends) == 1 and ends[0]["finish_reason"] == r["finish_reason"]


def test_stream_cancel_stops_early(shared_pool):
    lt = shared_pool.acquire("t-lora")
    events = []
    run_stream(lt, gen_req("t-lora", n=40), events.append, lambda: len(events) > 3)
    assert len(events) <= 5 and events[-1]["event"] != "usage"


def test_input_errors_name_the_field(shared_pool):
    lt = shared_pool.acquire("t-ptv2")
    with pytest.raises(InputError) as e:
        run_generate(lt, gen_req("t-ptv2", prompts=["word " * 1100], n=4))  # > max_prompt_tokens (1024)
    assert e.value.field == "body.prompt" and e.value.status == 422
    with pytest.raises(InputError) as e:
        run_generate(lt, gen_req("t-ptv2", prompts=["ok", "word " * 600], n=4), max_prompt_tokens=100)
    assert e.value.field == "body.prompt[1]"


def test_lru_by_count_and_pins(store, bundles):
    evicted = []
    pool = make_pool(store, bundles, max_tasks=2, pin=["t-ptv2"], on_evict=evicted.append)
    for task in ["t-ptv2", "t-lora", "t-ia3", "t-prompt"]:
        pool.acquire(task)
    assert set(pool.loaded()) == {"t-ptv2", "t-prompt"}  # the pin stays, the LRU goes
    assert evicted == ["t-lora", "t-ia3"]
    pool.get("t-ptv2")
    pool.acquire("t-lora")
    assert set(pool.loaded()) == {"t-ptv2", "t-lora"}


def test_lru_by_bytes(store, bundles):
    probe = make_pool(store, bundles)
    probe.acquire("t-lora")
    base_bytes = probe.stats()["bases"][bundles["base"]]["bytes"]
    one = probe.get("t-lora").nbytes
    pool = make_pool(store, bundles, max_tasks=10, max_bytes=base_bytes + one + one // 2)
    pool.acquire("t-lora")
    pool.acquire("t-ia3")  # IA3 is much smaller than LoRA: both fit
    pool.acquire("t-lora")
    assert pool.total_bytes() <= pool.max_bytes
    pool.acquire("t-prompt")
    assert pool.total_bytes() <= pool.max_bytes
    assert "t-prompt" in pool.loaded()
    tight = make_pool(store, bundles, max_bytes=base_bytes // 2)
    with pytest.raises(TaskUnavailable):
        tight.acquire("t-lora")
    assert tight.loaded() == [] and tight.total_bytes() == 0


def test_unknown_and_disallowed(store, bundles):
    pool = make_pool(store, bundles)
    with pytest.raises(TaskNotFound):
        pool.acquire("no-such-task")
    with pytest.raises(TaskNotFound):
        pool.acquire("../../etc")
    other = make_pool(store, bundles, allowed_bases=["smollm2-135m"])
    with pytest.raises(TaskUnavailable) as e:
        other.acquire("t-lora")
    assert "base model" in e.value.message and bundles["base"] not in e.value.message


def test_refresh_picks_up_promotion(tmp_path, bundles):
    from svd_ray.store import open_store

    uri = (tmp_path / "store").as_uri()
    first = publish_task(uri, "t-swap", "lora", bundles["base"], seed=5)
    st = open_store(uri, cache_dir=tmp_path / "cache")
    pool = make_pool(st, bundles, refresh_s=0.01)
    lt = pool.acquire("t-swap")
    assert lt.version == first.version
    second = publish_task(uri, "t-swap", "lora", bundles["base"], seed=6)
    assert pool.refresh("t-swap") == second.version  # nothing promoted: latest wins
    st.promote("t-swap", first.version)
    assert pool.refresh("t-swap") == first.version  # promoted wins over a newer latest
    assert pool.refresh("t-swap") is None
    held = pool.get("t-swap")
    st.promote("t-swap", second.version)
    pool.refresh("t-swap")
    assert pool.get("t-swap").version == second.version
    # a request still holding the old entry keeps working on it
    out = run_generate(held, gen_req("t-swap", n=2))
    assert out["version"] == first.version and len(out["results"]) == 3


def test_shared_base_weights_are_never_written(store, bundles):
    pool = make_pool(store, bundles)
    pool.acquire("t-lora")
    master = pool._bases[bundles["base"]].model
    before = {n: p.detach().clone() for n, p in master.named_parameters()}
    for task in bundles["tasks"]:
        lt = pool.acquire(task)
        run_generate(lt, gen_req(task, n=3))
        run_score(lt, {"task": task, "prompt": "a", "choices": [" b"], "steering": {"mode": "svdecode"}})
    assert all(torch.equal(before[n], p) for n, p in master.named_parameters())


@pytest.mark.parametrize("cfg,bad", [({"peft_type": "LORA"}, False), ({"init_lora_weights": True}, False),
                                     ({"init_lora_weights": "gaussian"}, False), ({"init_lora_weights": "pissa"}, True),
                                     ({"init_lora_weights": "olora"}, True), ({"layer_replication": [[0, 2]]}, True)])
def test_adapters_that_would_write_the_shared_base_are_refused(tmp_path, cfg, bad):
    import json

    from svd_ray.serving.pool import _shared_base_hazard

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert bool(_shared_base_hazard(tmp_path)) is bad


class _Outage:
    """Wraps a real store; while ``down`` every call raises StoreUnavailable (what an S3 outage raises)."""

    def __init__(self, store):
        self.store, self.down, self.calls_while_down = store, False, 0

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            from svd_ray.store import StoreUnavailable

            if self.down:
                self.calls_while_down += 1
                raise StoreUnavailable("storage unreachable (test outage)", retry_after_s=7)
            return attr(*a, **kw)

        return call


def test_store_outage_loaded_tasks_keep_serving_others_get_503_refresh_backs_off(tmp_path, bundles):
    from svd_ray.store import open_store

    uri = (tmp_path / "store").as_uri()
    first = publish_task(uri, "t-up", "lora", bundles["base"], seed=5)
    publish_task(uri, "t-cold", "lora", bundles["base"], seed=6)
    outage = _Outage(open_store(uri, cache_dir=tmp_path / "cache"))
    pool = make_pool(outage, bundles, refresh_s=10.0)
    clock = [1000.0]
    pool.clock = lambda: clock[0]
    pool.acquire("t-up")
    outage.down = True
    # a loaded task keeps serving
    lt = pool.acquire("t-up")
    assert run_generate(lt, gen_req("t-up", n=2))["version"] == first.version
    # a task not loaded yet: 503 with the store's Retry-After
    with pytest.raises(TaskUnavailable) as err:
        pool.acquire("t-cold")
    assert err.value.status == 503 and err.value.to_dict()["retry_after_s"] == 7
    assert "unreachable" in err.value.message
    # refresh backs off: 10 s, 20 s, 40 s … between tries (capped), and keeps the loaded version
    waits = []
    for _ in range(4):
        clock[0] += 1e4  # far past any delay: due now
        assert pool.due_for_refresh() == ["t-up"]
        pool.refresh("t-up")
        due_at = pool.get("t-up").checked_at + pool.refresh_s
        waits.append(round(due_at - clock[0]))
    assert waits == [10, 20, 40, 80] and pool.get("t-up").version == first.version
    clock[0] += 5
    assert pool.due_for_refresh() == []  # backing off: not due 5 s later
    # storage returns: the next refresh succeeds by itself and picks up a newer version
    outage.down = False
    second = publish_task(uri, "t-up", "lora", bundles["base"], seed=7)
    clock[0] += 1e4
    assert pool.refresh("t-up") == second.version and pool.acquire("t-cold").task == "t-cold"
    assert pool._refresh_delay == {}


def test_unavailable_errors_carry_retry_after_to_the_http_response():
    """The replica's error dict → the ingress's ApiError → a 503 with ``Retry-After`` (seconds, ≥ 1)."""
    from svd_ray.serving.schemas import ApiError

    err = ApiError.from_dict(TaskUnavailable("store down", retry_after_s=7).to_dict())
    assert err.status == 503 and err.headers["Retry-After"] == "7" and "retry_after_s" not in err.body()["error"]
    assert not ApiError.from_dict(TaskUnavailable("busy").to_dict()).headers
