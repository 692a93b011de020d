"""The OpenAI legacy-completions surface that evaluation clients use: ``logprobs``, ``echo``, token-id
prompts, ``n``; checked against the reference decoder / scorer, then over HTTP with the official ``openai``
client and with lm-evaluation-harness's ``local-completions`` model.

The first part runs the replica's own code in-process (a ``ModelPool``, no Ray); the second part one Serve
app on a private local Ray (module-scoped, ~25 s to start).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import requests
import torch

from serving_helpers import KEYS, auth, reference_model

from svd_ray.decoding.scoring import score_choice_ids
from svd_ray.serving.errors import PoolError
from svd_ray.serving.handlers import run_generate
from svd_ray.serving.pool import ModelPool
from svd_ray.serving.schemas import generation_payload

PROMPT = "Q: 2 + 3 = ?\nA:"
TIMEOUT = 90
LM_EVAL_TASK = Path(__file__).parent / "lm_eval_task"


def payload(task, prompts, *, max_new=5, temperature=0.0, seed=None, steering=None, **kw):
    return generation_payload(task, prompts, max_new_tokens=max_new, temperature=temperature, top_p=1.0, top_k=0,
                              seed=seed, steering=steering or {}, **kw)


# ------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def pool(store, bundles):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    p = ModelPool(store, allowed_bases=[bundles["base"]], device="cpu")
    yield p
    p.close()
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ref_models(store, bundles):
    return {t: reference_model(store, t, bundles["base"])[0] for t in ("t-lora", "t-prompt")}


def _steering(mode, mu):
    return {"mode": mode, "mu": mu}


@pytest.mark.parametrize("task", ["t-lora", "t-prompt"])
@pytest.mark.parametrize("mode,mu,outside", [("svdecode", 20.0, "unmasked"), ("svdecode", 20.0, "floor"),
                                             ("static", None, "unmasked"), ("off", None, "unmasked")])
def test_generated_logprobs_are_the_steered_distribution(pool, ref_models, task, mode, mu, outside):
    """Each generated token's log-prob (and its top alternatives) equal the reference scorer's teacher-forced
    log p̂ of that continuation — the same ẑ (form_steered_logits), the same mask policy."""
    lt = pool.acquire(task)
    out = run_generate(lt, payload(task, [PROMPT], max_new=6, steering=_steering(mode, mu), logprobs=3,
                                   outside_mask=outside))
    (res,) = out["results"]
    lp = res["logprobs"]
    ref = ref_models[task]
    prompt_ids = ref.tokenizer(PROMPT)["input_ids"]
    chosen = res["token_ids"] + ([] if res["finish_reason"] == "length" else [ref.tokenizer.eos_token_id])
    assert len(lp["tokens"]) == len(chosen) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    want = score_choice_ids(ref.dual, prompt_ids, [chosen], ref.steering(mode, mu=mu), outside_mask=outside)
    assert lp["token_logprobs"] == pytest.approx(want.token_logprobs[0], abs=1e-4)
    assert lp["tokens"] == [ref.tokenizer.decode([t]) for t in chosen]
    # offsets continue the prompt's text, token by token
    assert lp["text_offset"][0] == len(PROMPT)
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(top) <= 4 and top[tok] == pytest.approx(val, abs=1e-6)  # the top 3, plus the token itself
        assert all(v <= 0 and math.isfinite(v) for v in top.values())
        # greedy: the chosen token is the most likely one of the distribution it was chosen from
        if outside == "floor" or mode == "off":
            assert val == pytest.approx(max(top.values()), abs=1e-6)
    if mode == "off":  # no steering: log p_φ
        adapter = score_choice_ids(ref.dual, prompt_ids, [chosen], ref.steering("off"))
        assert lp["token_logprobs"] == pytest.approx(adapter.token_logprobs[0], abs=1e-4)


def test_steering_changes_the_logprobs(pool):
    lt = pool.acquire("t-lora")
    on = run_generate(lt, payload("t-lora", [PROMPT], max_new=1, steering=_steering("svdecode", 20.0), logprobs=0,
                                  echo=True))["results"][0]["logprobs"]
    off = run_generate(lt, payload("t-lora", [PROMPT], max_new=1, steering=_steering("off", None), logprobs=0,
                                   echo=True))["results"][0]["logprobs"]
    assert on["tokens"][:-1] == off["tokens"][:-1]
    assert max(abs(a - b) for a, b in zip(on["token_logprobs"][1:-1], off["token_logprobs"][1:-1])) > 1e-3


@pytest.mark.parametrize("task", ["t-lora", "t-prompt"])
def test_echo_scores_the_prompt_like_the_reference_scorer(pool, ref_models, task):
    """``echo`` + ``logprobs`` + ``max_tokens`` 0: the prompt's own tokens, the first without a log-prob, the
    rest equal to teacher forcing; summed over a continuation they are /score's log-likelihood."""
    lt = pool.acquire(task)
    ref = ref_models[task]
    context, choices = "Q: 4 + 4 = ?\nA:", [" 8", " 9", " 16"]
    for steering, policy in [(("svdecode", 20.0), "unmasked"), (("svdecode", 20.0), "floor"),
                             (("off", None), "unmasked")]:
        want = ref.score(context, choices, ref.steering(*steering), outside_mask=policy)
        for choice, ll in zip(choices, want.steered):
            out = run_generate(lt, payload(task, [context + choice], max_new=0, steering=_steering(*steering),
                                           logprobs=2, echo=True, outside_mask=policy))
            (res,) = out["results"]
            assert res["prompt_text"] + res["text"] == context + choice and res["finish_reason"] == "length"
            lp = res["logprobs"]
            ids = ref.tokenizer(context + choice)["input_ids"]
            n_ctx = len(ref.tokenizer(context)["input_ids"])
            assert lp["tokens"] == [ref.tokenizer.decode([i]) for i in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
            assert sum(lp["token_logprobs"][n_ctx:]) == pytest.approx(ll, abs=1e-4), (steering, policy, choice)
            full = score_choice_ids(ref.dual, ids[:1], [ids[1:]], ref.steering(*steering), outside_mask=policy)
            assert lp["token_logprobs"][1:] == pytest.approx(full.token_logprobs[0], abs=1e-4)
            assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0}


def test_echo_with_generation_and_token_id_prompts(pool, ref_models):
    """lm-eval's request: token ids, echo, logprobs 1, max_tokens 1 → prompt tokens then the generated one."""
    lt = pool.acquire("t-lora")
    ref = ref_models["t-lora"]
    ids = ref.tokenizer(PROMPT)["input_ids"]
    out = run_generate(lt, payload("t-lora", [ids], max_new=1, logprobs=1, echo=True))
    (res,) = out["results"]
    lp = res["logprobs"]
    assert res["prompt_text"] == PROMPT and len(lp["tokens"]) == len(ids) + 1
    greedy = run_generate(lt, payload("t-lora", [PROMPT], max_new=1, logprobs=1))["results"][0]
    assert lp["token_logprobs"][-1] == pytest.approx(greedy["logprobs"]["token_logprobs"][0], abs=1e-6)
    assert lp["tokens"][-1] == greedy["logprobs"]["tokens"][0]
    # a token id outside the vocabulary is a 422 naming the prompt
    with pytest.raises(PoolError) as e:
        run_generate(lt, payload("t-lora", [[1, 2], [3, 10**6]], max_new=1))
    assert e.value.status == 422 and e.value.field == "body.prompt[1]"


def test_n_copies_use_seed_plus_index(pool):
    """``n`` choices per prompt: choice i of prompt p is sequence p·n + i and samples with seed + p·n + i, so it
    equals a one-choice request with that seed."""
    lt = pool.acquire("t-ia3")
    prompts = [PROMPT, "Hello there"]
    off = _steering("off", None)  # no plausibility mask: the sharp test model then has more than one candidate
    out = run_generate(lt, payload("t-ia3", prompts, max_new=5, temperature=2.0, seed=40, n=3, steering=off))
    assert len(out["results"]) == 6
    assert out["usage"]["prompt_tokens"] == sum(len(lt.tm.tokenizer(p)["input_ids"]) for p in prompts)
    for k, r in enumerate(out["results"]):
        one = run_generate(lt, payload("t-ia3", [prompts[k // 3]], max_new=5, temperature=2.0, seed=40 + k,
                                       steering=off))
        assert r["token_ids"] == one["results"][0]["token_ids"], k
    assert len({tuple(r["token_ids"]) for r in out["results"]}) > 2  # the copies really are different samples


def test_echo_too_large_for_the_engine_names_the_prompt(store, bundles):
    from svd_ray.batching import EngineConfig

    p = ModelPool(store, allowed_bases=[bundles["base"]], device="cpu", engine_config=EngineConfig(max_kv_tokens=40))
    try:
        lt = p.acquire("t-lora")
        with pytest.raises(PoolError) as e:
            run_generate(lt, payload("t-lora", [list(range(1, 31))], max_new=0, logprobs=1, echo=True))
        assert e.value.status == 413 and e.value.field == "body.prompt"
    finally:
        p.close()


# ------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def url(serve_app):
    return serve_app["url"]


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS["alpha"], max_retries=0, timeout=TIMEOUT)


def _score(url, prompt, choices, **kw):
    r = requests.post(url + "/v1/tasks/t-lora/score", json={"prompt": prompt, "choices": choices, **kw},
                      headers=auth("alpha"), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


@pytest.fixture(scope="module")
def tokenizer(bundles):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundles["base"])


@pytest.mark.integration
def test_openai_client_logprobs_and_echo(client, url, tokenizer):
    """The official client: logprobs on generated tokens, and lm-eval's scoring call (token ids, echo,
    max_tokens 0 and 1), whose continuation sum equals /score's steered log-likelihood."""
    c = client.completions.create(model="t-lora", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert all(isinstance(d, dict) and 2 <= len(d) <= 3 for d in lp.top_logprobs)
    assert "".join(lp.tokens).startswith(c.choices[0].text)  # the text, then any EOS / stop token
    assert lp.text_offset[0] == len(PROMPT)

    context, choices = "Q: 4 + 4 = ?\nA:", [" 8", " 9"]
    tok = tokenizer
    scores = _score(url, context, choices, mu=20.0)
    for choice, s in zip(choices, scores):
        ids = tok(context + choice)["input_ids"]
        n_ctx = len(tok(context)["input_ids"])
        for max_tokens in (0, 1):
            e = client.completions.create(model="t-lora", prompt=[ids], max_tokens=max_tokens, temperature=0,
                                          logprobs=1, echo=True, extra_body={"mu": 20.0})
            (ch,) = e.choices
            tl = ch.logprobs.token_logprobs
            assert tl[0] is None and len(tl) == len(ids) + max_tokens
            assert ch.text.startswith(context + choice)
            assert sum(tl[n_ctx:len(ids)]) == pytest.approx(s["loglik"]["steered"], abs=1e-4)
        assert abs(s["loglik"]["steered"] - s["loglik"]["adapter"]) > 1e-4  # steering acted on these numbers


OFF = {"steering": "off"}  # sampling without the plausibility mask (the sharp test model keeps one token in it)


@pytest.mark.integration
def test_openai_client_n_choices(client):
    import openai

    def sample(**kw):
        return client.completions.create(model="t-ia3", prompt=PROMPT, max_tokens=5, temperature=2.0, extra_body=OFF,
                                         **kw)

    many = sample(seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1  # different samples, not one answer repeated
    singles = [sample(seed=7 + i) for i in range(3)]  # choice i samples with seed + i
    assert [c.text for c in many.choices] == [one.choices[0].text for one in singles]
    assert many.usage.completion_tokens == sum(one.usage.completion_tokens for one in singles)
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once

    # streamed: chunks of the three choices interleave, each index's text equals the non-streamed one
    texts = {0: "", 1: "", 2: ""}
    for chunk in sample(seed=7, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(3)] == [c.text for c in many.choices]

    messages = [{"role": "user", "content": "2 + 3 = ?"}]
    chat = client.chat.completions.create(model="t-lora", messages=messages, max_tokens=4, temperature=2.0, seed=3, n=2,
                                          extra_body=OFF)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)
    first = client.chat.completions.create(model="t-lora", messages=messages, max_tokens=4, temperature=2.0, seed=4,
                                           extra_body=OFF)
    assert chat.choices[1].message.content == first.choices[0].message.content

    with pytest.raises(openai.UnprocessableEntityError) as e:  # greedy n > 1 would repeat one answer
        client.completions.create(model="t-ia3", prompt=PROMPT, max_tokens=2, temperature=0, n=2)
    assert e.value.response.json()["error"]["field"] == "body.n"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="t-ia3", prompt=PROMPT, max_tokens=2, temperature=0.5, n=50)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="t-ia3", prompt=PROMPT, max_tokens=2, logprobs=6)


BAD = [
    ({"n": 2, "temperature": 0}, "body.n"),
    ({"n": 5, "temperature": 0.5}, "body.n"),  # > max_n (4 by default)
    ({"prompt": ["a", "b", "c"], "n": 3, "temperature": 0.5}, "body.n"),  # prompts × n > max_prompts (4 in tests)
    ({"logprobs": 6}, "body.logprobs"),
    ({"logprobs": -1}, "body.logprobs"),
    ({"logprobs": 1, "stream": True}, "body.logprobs"),
    ({"echo": True, "stream": True}, "body.echo"),
    ({"max_tokens": 0}, "body.max_tokens"),
    ({"echo": "yes"}, "body.echo"),
    ({"prompt": [[1, 2], ["a"]]}, "body.prompt"),
    ({"prompt": [[]]}, "body.prompt"),
    ({"prompt": [-1, 2]}, "body.prompt"),
    ({"prompt": [1, True]}, "body.prompt"),
    ({"prompt": [[5] * 3000]}, "body.prompt"),
    ({"prompt": [[1, 49152]]}, "body.prompt"),  # outside the vocabulary
    ({"best_of": 2}, "body.best_of"),
    ({"outside_mask": "drop"}, "body.outside_mask"),
]


@pytest.mark.integration
@pytest.mark.parametrize("extra,field", BAD, ids=[json.dumps(b[0])[:40] for b in BAD])
def test_bad_openai_options_are_422_naming_the_field(url, extra, field):
    body = {"model": "t-lora", "prompt": PROMPT, "max_tokens": 2, **extra}
    r = requests.post(url + "/v1/completions", json=body, headers=auth("alpha"), timeout=TIMEOUT)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["status"] == 422, err


# ------------------------------------------------------------------------------------------ lm-eval
@pytest.mark.integration
def test_lm_eval_local_completions_matches_own_scorer(url, bundles, tmp_path, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model runs a multiple-choice task from a local YAML and
    JSON Lines file against a steered task over HTTP; its accuracy and per-choice log-likelihoods equal the
    project's own scorer (/score, steered) on the same items."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extras: pip install -e '.[test]'")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", KEYS["alpha"])  # local-completions sends it as the bearer key
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "addition_mc.jsonl"
    shutil.copy(LM_EVAL_TASK / "addition_mc.jsonl", data)
    yaml_text = (LM_EVAL_TASK / "svd_addition_mc.yaml").read_text().replace(
        "tests/serving/lm_eval_task/addition_mc.jsonl", str(data))
    (task_dir / "svd_addition_mc.yaml").write_text(yaml_text)

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "t-lora", "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": bundles["base"], "num_concurrent": 1, "max_retries": 1},
        tasks=["svd_addition_mc"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        bootstrap_iters=0,
    )
    acc = out["results"]["svd_addition_mc"]["acc,none"]
    samples = sorted(out["samples"]["svd_addition_mc"], key=lambda s: s["doc_id"])
    items = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(samples) == len(items) == 20

    own_correct, steered_moved = [], False
    for sample, item in zip(samples, items):
        scores = _score(url, item["prompt"], [" " + c for c in item["choices"]])
        steered = [c["loglik"]["steered"] for c in scores]
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(steered, abs=1e-3), item
        steered_moved |= any(abs(c["loglik"]["steered"] - c["loglik"]["adapter"]) > 1e-4 for c in scores)
        own_correct.append(max(range(len(steered)), key=steered.__getitem__) == item["label"])
    assert acc == pytest.approx(sum(own_correct) / len(own_correct), abs=1e-12)
    assert steered_moved  # the numbers lm-eval used were the steered ones, not the plain adapter's
    print(f"\n[lm-eval] local-completions acc {acc:.3f} == own scorer {sum(own_correct) / len(own_correct):.3f}")
