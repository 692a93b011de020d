"""The batching engine against the per-request reference decoder (DualModel over each task's PeftModel).

Exactness: a request decoded inside a busy mixed batch (other tasks, other methods, other lengths,
rows joining and leaving mid-way, chunked prefills) gives token for token what the reference gives
alone; scores match within float tolerance. Plus cancellation, deadlines, budgets, stop strings,
seeded sampling and tenant fairness.
"""
import random
import warnings

import pytest
import torch

from batching_helpers import VOCAB, task_adapter, tiny_base
from svd_ray.batching.adapters import AdapterBank
from svd_ray.batching.engine import Engine, EngineConfig
from svd_ray.batching.requests import Cancelled, DeadlineExceeded, GenerateRequest, RequestTooLarge, ScoreRequest
from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate, score_choice_ids
from svd_ray.models.peft_methods import PEFT_METHODS

warnings.filterwarnings("ignore")
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-+*/=<>()[]{}"


class CharTokenizer:
    """Token i is one character: enough to test stop strings and incremental text."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture(scope="module")
def world():
    base = tiny_base()
    tasks = {m: task_adapter(base, m, seed=i) for i, m in enumerate(PEFT_METHODS)}
    tasks["lora2"] = task_adapter(base, "lora", seed=7)  # a second LoRA task: two adapters of one method
    return base, tasks


def make_engine(world, **cfg):
    base, tasks = world
    eng = Engine(AdapterBank(base), CharTokenizer(), EngineConfig(**cfg))
    mean_delta = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 0.2
    adapters = {name: eng.add_adapter(name, pm, mean_delta=mean_delta) for name, pm in tasks.items()}
    return eng, adapters


def steering_for(mode, mu=2.0, alpha=0.1, mean_delta=None):
    return SteeringConfig(mode=mode, mu=mu, alpha=alpha, mean_delta=mean_delta)


def reference(world, task, prompt, steering, gen):
    pm = world[1][task]
    ids = torch.tensor([prompt])
    return generate(DualModel(pm), ids, None, steering, gen)[0].token_ids


def rand_prompt(rng, n):
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def gen_request(adapter, prompt, mode, n_new, mean_delta=None, tenant="t", **kw):
    steering = steering_for(mode, mean_delta=mean_delta if mode == "static" else None)
    return GenerateRequest(adapter, [prompt], GenerationConfig(max_new_tokens=n_new, eos_token_ids=(0,), **kw), steering,
                           tenant=tenant)


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("mode", ["svdecode", "static", "off"])
def test_alone_equals_reference(world, method, mode):
    eng, adapters = make_engine(world)
    a = adapters[method]
    prompt = rand_prompt(random.Random(1), 7)
    req = gen_request(a, prompt, mode, 10, mean_delta=a.mean_delta)
    h = eng.submit(req)
    eng.run_until_idle()
    got = h.result(0)["results"][0].token_ids
    ref = reference(world, method, prompt, req.steering, GenerationConfig(max_new_tokens=10, eos_token_ids=(0,)))
    assert got == ref and len(got) > 0


def test_busy_mixed_batch_is_token_for_token_exact(world):
    """20 requests over 5 tasks (4 methods), 3 modes, prompt lengths 1..40, joining over time; one cancelled."""
    eng, adapters = make_engine(world, max_rows=12, prefill_chunk=8, step_token_budget=24)
    rng = random.Random(5)
    names = list(adapters)
    plan = []
    for k in range(20):
        task = names[k % len(names)]
        mode = ["svdecode", "static", "off"][k % 3]
        plan.append((task, mode, rand_prompt(rng, rng.randrange(1, 41)), rng.randrange(1, 14)))
    handles, cancelled = [], None
    for k, (task, mode, prompt, n) in enumerate(plan):
        handles.append(eng.submit(gen_request(adapters[task], prompt, mode, n, mean_delta=adapters[task].mean_delta,
                                              tenant=f"tenant{k % 3}")))
        for _ in range(rng.randrange(0, 3)):  # requests join while others decode
            eng.run_once()
        if k == 6:
            cancelled = handles[3]
            cancelled.cancel()
    eng.run_until_idle()
    assert eng.snapshot()["running_rows"] == 0 and eng.snapshot()["decode_steps"] > 0
    for k, (h, (task, mode, prompt, n)) in enumerate(zip(handles, plan)):
        if h is cancelled:
            with pytest.raises(Cancelled):
                h.result(0)
            continue
        got = h.result(0)["results"][0].token_ids
        ref = reference(world, task, prompt, steering_for(mode, mean_delta=adapters[task].mean_delta if mode == "static" else None),
                        GenerationConfig(max_new_tokens=n, eos_token_ids=(0,)))
        assert got == ref, (k, task, mode)
    # rows of several tasks really were decoded together
    assert eng.stats["decode_rows"] / eng.stats["decode_steps"] > 3


def test_scores_in_a_busy_engine_match_reference(world):
    """Score requests of four methods, merged into shared forwards (prompts chunked, choice groups), with
    decoding alongside: each equals the per-request reference."""
    eng, adapters = make_engine(world, prefill_chunk=5, score_max_rows=8)
    rng = random.Random(2)
    steering = steering_for("svdecode", mu=1.5)
    items = []
    for k, task in enumerate(["lora", "ia3", "prompt_tuning", "p_tuning_v2"]):
        prompt = rand_prompt(rng, 6 + 5 * k)
        choices = [rand_prompt(rng, rng.randrange(1, 9)) for _ in range(3 + k)]
        items.append((task, prompt, choices, eng.submit(ScoreRequest(adapters[task], prompt, choices, steering, tenant=str(k)))))
        eng.submit(gen_request(adapters["lora2"], rand_prompt(rng, 9), "svdecode", 6))  # decoding alongside
    eng.run_until_idle()
    assert eng.stats["score_plans"] > eng.stats["score_forwards"]  # score requests shared forwards
    for task, prompt, choices, h in items:
        got = h.result(0)
        ref = score_choice_ids(DualModel(world[1][task]), prompt, choices, steering)
        assert got.steered == pytest.approx(ref.steered, abs=1e-4)
        assert got.adapter == pytest.approx(ref.adapter, abs=1e-4)
        assert got.base == pytest.approx(ref.base, abs=1e-4)


def test_beam_requests_match_reference(world):
    eng, adapters = make_engine(world)
    rng = random.Random(3)
    prompt = rand_prompt(rng, 5)
    steering = steering_for("svdecode")
    gen = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_ids=(0,))
    h = eng.submit(GenerateRequest(adapters["p_tuning_v2"], [prompt], gen, steering))
    other = eng.submit(gen_request(adapters["ia3"], rand_prompt(rng, 4), "svdecode", 8))
    eng.run_until_idle()
    ref = generate(DualModel(world[1]["p_tuning_v2"]), torch.tensor([prompt]), None, steering, gen)[0].token_ids
    assert h.result(0)["results"][0].token_ids == ref
    assert other.result(0)["results"][0].token_ids


def test_chunked_prefill_of_a_long_prompt_is_exact(world):
    prompt = rand_prompt(random.Random(4), 100)
    outs = []
    for chunk in (7, 512):
        eng, adapters = make_engine(world, prefill_chunk=chunk, step_token_budget=2 * chunk)
        h = eng.submit(gen_request(adapters["prompt_tuning"], prompt, "svdecode", 8))
        eng.run_until_idle()
        outs.append(h.result(0)["results"][0].token_ids)
        assert eng.stats["prefill_forwards"] == (15 if chunk == 7 else 1)
    assert outs[0] == outs[1] == reference(world, "prompt_tuning", prompt, steering_for("svdecode"),
                                          GenerationConfig(max_new_tokens=8, eos_token_ids=(0,)))


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(world):
    rng = random.Random(6)
    prompt = rand_prompt(rng, 6)
    outs = []
    for busy in (False, True):
        eng, adapters = make_engine(world)
        if busy:
            for _ in range(4):
                eng.submit(gen_request(adapters["ia3"], rand_prompt(rng, 5), "svdecode", 9, do_sample=True, seed=1))
        h = eng.submit(gen_request(adapters["lora"], prompt, "svdecode", 12, do_sample=True, temperature=1.5, seed=42))
        eng.run_until_idle()
        outs.append(h.result(0)["results"][0].token_ids)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("flush_denormal", [False, True])  # replicas flush denormals: 1e-40 becomes 0 there
def test_extreme_sampling_values_are_safe(world, flush_denormal):
    eng, adapters = make_engine(world)
    prompt = rand_prompt(random.Random(7), 5)
    old = torch.set_flush_denormal(flush_denormal)
    try:
        greedy = eng.submit(gen_request(adapters["lora"], prompt, "svdecode", 6))
        odd = [eng.submit(gen_request(adapters["lora"], prompt, "svdecode", 6, do_sample=True, seed=0, **kw))
               for kw in ({"temperature": 1e-40}, {"temperature": 1e-300}, {"top_p": 1e-38}, {"top_p": 1e-300},
                          {"temperature": 1e-30, "top_k": 1})]  # subnormal doubles are refused at the ingress
        eng.run_until_idle()
    finally:
        torch.set_flush_denormal(False)
    g = greedy.result(0)["results"][0].token_ids
    for h in odd:  # T → 0 is greedy; top_p → 0 keeps only the best token
        assert h.result(0)["results"][0].token_ids == g


def test_cancel_and_deadline_free_the_rows(world):
    eng, adapters = make_engine(world)
    long = eng.submit(gen_request(adapters["lora"], [5, 6, 7], "svdecode", 200))
    for _ in range(5):
        eng.run_once()
    assert eng.snapshot()["running_rows"] == 2
    long.cancel()
    eng.run_once()
    assert eng.snapshot()["running_rows"] == 0 and eng.snapshot()["active_requests"] == 0
    with pytest.raises(Cancelled):
        long.result(0)
    import time

    late = gen_request(adapters["ia3"], [5, 6, 7], "off", 200)
    late.deadline = time.monotonic() + 0.2
    h = eng.submit(late)
    eng.run_once()
    time.sleep(0.25)
    eng.run_once()
    with pytest.raises(DeadlineExceeded):
        h.result(0)
    assert eng.snapshot()["running_rows"] == 0


def test_requests_that_can_never_fit_are_refused_up_front(world):
    eng, adapters = make_engine(world, max_rows=4, max_kv_tokens=500, max_positions=512)
    with pytest.raises(RequestTooLarge) as e:
        eng.submit(GenerateRequest(adapters["lora"], [[1, 2]] * 3, GenerationConfig(max_new_tokens=4), steering_for("svdecode")))
    assert e.value.field == "prompt" and e.value.status == 413
    with pytest.raises(RequestTooLarge) as e:
        eng.submit(gen_request(adapters["lora"], [1, 2], "svdecode", 300))
    assert e.value.field == "max_new_tokens"
    with pytest.raises(RequestTooLarge) as e:
        eng.submit(ScoreRequest(adapters["lora"], [1] * 100, [[2] * 200], steering_for("svdecode")))
    assert e.value.field == "choices"
    assert eng.idle()


def test_stop_strings_end_the_work_and_trim_text(world):
    eng, adapters = make_engine(world)
    prompt = rand_prompt(random.Random(8), 6)
    free = eng.submit(gen_request(adapters["lora"], prompt, "off", 12))
    eng.run_until_idle()
    res = free.result(0)["results"][0]
    stop = res.text[3:5]
    assert len(stop) == 2
    h = eng.submit(gen_request(adapters["lora"], prompt, "off", 12, stop_strings=(stop,)))
    pieces = []
    eng.run_until_idle()
    for ev in h:
        if ev.kind == "token":
            pieces.append(ev.text)
        if ev.kind == "done":
            out = ev.result["results"][0]
    cut = res.text.find(stop)
    assert out.finish_reason == "stop" and out.text == res.text[:cut] == "".join(pieces)
    assert out.token_ids == res.token_ids[: len(out.token_ids)] and len(out.token_ids) < 12


def test_a_heavy_request_does_not_starve_another_tenant(world):
    """A long-prompt request (chunked) and a many-choice score request in flight: a small request of another
    tenant still finishes within a few iterations."""
    eng, adapters = make_engine(world, prefill_chunk=8, step_token_budget=16)
    heavy = eng.submit(gen_request(adapters["lora"], rand_prompt(random.Random(9), 400), "svdecode", 50, tenant="big"))
    heavy_score = eng.submit(ScoreRequest(adapters["ia3"], [3] * 200, [[4] * 100] * 8, steering_for("svdecode"), tenant="big"))
    eng.run_once()
    small = eng.submit(gen_request(adapters["ia3"], [1, 2, 3], "svdecode", 4, tenant="small"))
    n = 0
    while not small.finished.is_set():
        eng.run_once()
        n += 1
    assert n <= 6  # prefill + 4 tokens (+ slack), while the heavy request needs ~50 prefill chunks
    assert not heavy.finished.is_set() and not heavy_score.finished.is_set()
    eng.run_until_idle()
    assert heavy.result(0)["results"][0].token_ids and heavy_score.result(0).steered


def test_adapter_removal_waits_for_its_requests(world):
    eng, adapters = make_engine(world, retire_grace_s=0.0)
    h = eng.submit(gen_request(adapters["ia3"], [1, 2, 3], "svdecode", 20))
    eng.run_once()
    eng.remove_adapter(adapters["ia3"])
    eng.run_once()
    assert adapters["ia3"].slot in eng.bank.entries  # still decoding
    eng.run_until_idle()
    eng.run_once()
    assert h.result(0)["results"][0].token_ids and adapters["ia3"].slot not in eng.bank.entries


def test_threaded_engine_serves_concurrent_clients(world):
    import threading

    eng, adapters = make_engine(world)
    eng.start()
    try:
        results, rng = {}, random.Random(10)
        jobs = [(m, rand_prompt(rng, rng.randrange(2, 12))) for m in PEFT_METHODS * 2]

        def client(k, task, prompt):
            results[k] = eng.submit(gen_request(adapters[task], prompt, "svdecode", 6)).result(timeout=60)

        ts = [threading.Thread(target=client, args=(k, t, p)) for k, (t, p) in enumerate(jobs)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        for k, (task, prompt) in enumerate(jobs):
            assert results[k]["results"][0].token_ids == reference(
                world, task, prompt, steering_for("svdecode"), GenerationConfig(max_new_tokens=6, eos_token_ids=(0,)))
    finally:
        eng.stop()


def test_sliding_window_model_is_exact_within_its_window():
    """Gemma-3-style layers (sliding window + full): the engine caps the context at the window, where
    padding in the cache cannot change what a sliding-window layer sees; mixed batches stay exact."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    from batching_helpers import task_adapter

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=24,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    base = Gemma3ForCausalLM(cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    tasks = {m: task_adapter(base, m, seed=i) for i, m in enumerate(["lora", "prompt_tuning", "p_tuning_v2"])}
    eng = Engine(AdapterBank(base), CharTokenizer(), EngineConfig(prefill_chunk=5))
    assert eng.config.max_positions == 24
    adapters = {m: eng.add_adapter(m, pm) for m, pm in tasks.items()}
    rng = random.Random(11)
    plan = [(m, rand_prompt(rng, rng.randrange(2, 12)), rng.randrange(3, 9)) for m in tasks for _ in range(2)]
    handles = []
    for task, prompt, n in plan:
        handles.append(eng.submit(gen_request(adapters[task], prompt, "svdecode", n)))
        eng.run_once()
    eng.run_until_idle()
    for h, (task, prompt, n) in zip(handles, plan):
        ref = generate(DualModel(tasks[task]), torch.tensor([prompt]), None, steering_for("svdecode"),
                       GenerationConfig(max_new_tokens=n, eos_token_ids=(0,)))[0].token_ids
        assert h.result(0)["results"][0].token_ids == ref, task
    with pytest.raises(RequestTooLarge):
        eng.submit(gen_request(adapters["lora"], [1] * 20, "svdecode", 10))


def test_min_new_tokens_defers_eos_in_engine_and_reference(world):
    eng, adapters = make_engine(world)
    prompt = rand_prompt(random.Random(12), 5)
    base_req = gen_request(adapters["lora"], prompt, "svdecode", 12)
    h0 = eng.submit(base_req)
    eng.run_until_idle()
    natural = h0.result(0)["results"][0]
    first = natural.token_ids[0]
    # make the first natural token an "EOS": without min_new_tokens it ends at once, with it it must not
    req = gen_request(adapters["lora"], prompt, "svdecode", 12)
    req.gen.eos_token_ids = (first,)
    stopped = eng.submit(req)
    req2 = gen_request(adapters["lora"], prompt, "svdecode", 12, min_new_tokens=12)
    req2.gen.eos_token_ids = (first,)
    forced = eng.submit(req2)
    eng.run_until_idle()
    early = stopped.result(0)["results"][0]
    assert early.token_ids == [] and early.finish_reason == "eos"
    out = forced.result(0)["results"][0]
    assert len(out.token_ids) == 12 and first not in out.token_ids and out.finish_reason == "length"
    ref = generate(DualModel(world[1]["lora"]), torch.tensor([prompt]), None, steering_for("svdecode"),
                   GenerationConfig(max_new_tokens=12, min_new_tokens=12, eos_token_ids=(first,)))[0].token_ids
    assert out.token_ids == ref


def test_sampling_follows_the_steered_distribution(world):
    """A sampler that were secretly greedy (or ignored T, the mask or steering) fails this: the first tokens
    of 1500 seeded requests must be distributed as softmax(ẑ / T) computed by the reference path."""
    from svd_ray.decoding.generate import sampling_logits

    eng, adapters = make_engine(world)
    prompt = rand_prompt(random.Random(14), 6)
    steering = steering_for("svdecode", mu=1.5)
    n, temperature = 1500, 0.1  # the tiny model is nearly uniform: a low T makes the shape testable
    handles = [eng.submit(GenerateRequest(adapters["ia3"], [prompt], GenerationConfig(
        max_new_tokens=1, do_sample=True, temperature=temperature, seed=s, eos_token_ids=(-1,)), steering))
        for s in range(n)]
    eng.run_until_idle()
    counts = torch.zeros(VOCAB)
    for h in handles:
        counts[h.result(0)["results"][0].token_ids[0]] += 1
    z_phi, z_theta, _ = DualModel(world[1]["ia3"]).prefill(torch.tensor([prompt]), last_only=True)
    p = torch.softmax(sampling_logits(steering.steer(z_phi[:, -1], z_theta[:, -1]), temperature), -1)[0].double()
    assert (counts > 0).sum() >= 3  # not greedy
    assert float(counts[p == 0].sum()) == 0  # nothing outside the plausibility mask is ever sampled
    freq = counts.double() / n
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 4 * se + 1e-9).all()), (freq[p > 0.01], p[p > 0.01])


# ------------------------------------------------------------------------------------------ OpenAI options
@pytest.mark.parametrize("method,mode,outside", [(m, "svdecode", "unmasked") for m in PEFT_METHODS] + [
    ("lora", "svdecode", "floor"), ("prompt_tuning", "static", "unmasked"), ("ia3", "off", "unmasked")])
def test_logprobs_of_chosen_tokens_equal_teacher_forcing(world, method, mode, outside):
    """Every chosen token (EOS included) carries log p̂ of the distribution it was chosen from, equal to the
    reference scorer's teacher-forced log-prob of the same continuation, plus the top-k of that distribution."""
    from svd_ray.decoding.scoring import choice_logits, steered_logprobs

    eng, adapters = make_engine(world)
    a = adapters[method]
    rng = random.Random(21)
    busy = [eng.submit(gen_request(adapters["lora2"], rand_prompt(rng, 7), "svdecode", 9)) for _ in range(2)]
    prompts = [rand_prompt(rng, 5), rand_prompt(rng, 9)]
    steering = steering_for(mode, mean_delta=a.mean_delta if mode == "static" else None)
    gen = GenerationConfig(max_new_tokens=12, eos_token_ids=(0,))
    h = eng.submit(GenerateRequest(a, prompts, gen, steering, logprobs=3, outside_mask=outside))
    eng.run_until_idle()
    out = h.result(0)
    assert all(b.result(0)["results"] for b in busy)
    dual = DualModel(world[1][method])
    for prompt, res, recs in zip(prompts, out["results"], out["logprobs"]):
        chosen = res.token_ids + ([0] if res.finish_reason == "eos" else [])
        assert [r[0] for r in recs] == chosen and len(chosen) > 0
        want = score_choice_ids(dual, prompt, [chosen], steering, outside_mask=outside)
        assert [r[1] for r in recs] == pytest.approx(want.token_logprobs[0], abs=1e-4)
        cl = choice_logits(dual, prompt, [chosen])
        logp, _ = steered_logprobs(cl.z_phi[0], cl.z_theta[0], steering, outside)
        vals, ids = logp.topk(3, -1)
        for r, v, i in zip(recs, vals.tolist(), ids.tolist()):
            assert [t for t, _ in r[2]] == i and [x for _, x in r[2]] == pytest.approx(v, abs=1e-4)
            if outside == "floor" or mode == "off":  # greedy = the best token of the decoding distribution
                assert r[0] == i[0]


def test_copies_sample_with_seed_plus_index_and_count_as_rows(world):
    eng, adapters = make_engine(world, max_rows=8)
    rng = random.Random(22)
    prompts = [rand_prompt(rng, 4), rand_prompt(rng, 6)]
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, seed=100, eos_token_ids=(0,))
    h = eng.submit(GenerateRequest(adapters["ia3"], prompts, gen, steering_for("off"), copies=3))
    singles = [eng.submit(GenerateRequest(adapters["ia3"], [prompts[k // 3]],
                                          GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0,
                                                           seed=100 + k, eos_token_ids=(0,)), steering_for("off")))
               for k in range(6)]
    eng.run_until_idle()
    out = h.result(0)
    got = [r.token_ids for r in out["results"]]
    assert got == [s.result(0)["results"][0].token_ids for s in singles]
    assert len({tuple(g) for g in got}) > 2
    assert out["usage"]["prompt_tokens"] == 10  # each prompt once
    with pytest.raises(RequestTooLarge) as e:  # 2 prompts × 3 copies × 2 branches = 12 rows > 8
        eng.submit(GenerateRequest(adapters["ia3"], prompts, gen, steering_for("svdecode"), copies=3))
    assert e.value.field == "n"


def test_score_top_logprobs_equal_the_reference_distribution(world):
    from svd_ray.decoding.scoring import choice_logits, steered_logprobs

    eng, adapters = make_engine(world, prefill_chunk=4, score_max_rows=4)
    rng = random.Random(23)
    prompt, choices = rand_prompt(rng, 7), [rand_prompt(rng, 9), rand_prompt(rng, 3), rand_prompt(rng, 6)]
    steering = steering_for("svdecode", mu=1.5)
    h = eng.submit(ScoreRequest(adapters["p_tuning_v2"], prompt, choices, steering, top_logprobs=4))
    eng.run_until_idle()
    got = h.result(0)
    cl = choice_logits(DualModel(world[1]["p_tuning_v2"]), prompt, choices)
    logp, _ = steered_logprobs(cl.z_phi, cl.z_theta, steering)
    vals, ids = logp.topk(4, -1)
    for c, choice in enumerate(choices):
        assert len(got.top_logprobs[c]) == len(choice)
        for j, top in enumerate(got.top_logprobs[c]):
            assert [t for t, _ in top] == ids[c, j].tolist()
            assert [v for _, v in top] == pytest.approx(vals[c, j].tolist(), abs=1e-4)


def test_a_stopped_engine_refuses_adapter_calls_at_once(world):
    """Registering or retiring an adapter on a stopped engine fails fast with EngineStopped (it used to
    wait 120 s for an engine thread that would never run the call)."""
    import time

    from svd_ray.batching.requests import EngineStopped

    eng, adapters = make_engine(world)
    eng.start()
    eng.stop()
    t = time.monotonic()
    with pytest.raises(EngineStopped):
        eng.add_adapter("late", world[1]["lora"])
    with pytest.raises(EngineStopped):
        eng.remove_adapter(adapters["lora"])
    assert time.monotonic() - t < 5
