"""The Serve application over real HTTP on a private local Ray: shapes, steering, streaming, auth,
malformed input, concurrency, version refresh and a model replica killed under load.

The replica-kill test runs last in this module (it disturbs the shared app, which recovers).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from serving_helpers import KEYS, auth, publish_task, reference_model

from svd_ray.decoding import GenerationConfig

pytestmark = pytest.mark.integration

PROMPTS = ["Q: 2 + 3 = ?\nA:", "Hello there, my friend"]
TIMEOUT = 90


@pytest.fixture(scope="module")
def url(serve_app):
    return serve_app["url"]


def post(url, path, body, tenant="alpha", **kw):
    return requests.post(url + path, json=body, headers=auth(tenant), timeout=TIMEOUT, **kw)


def sse_events(resp) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of a text/event-stream response."""
    out, event, data = [], None, []
    for line in resp.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                out.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        out.append((event, "\n".join(data)))
    return out


@pytest.fixture(scope="module")
def refs(serve_app, store):
    torch.set_num_threads(1)  # model replicas run single-threaded: compare bit for bit
    base = serve_app["bundles"]["base"]
    return {t: reference_model(store, t, base)[0] for t in ("t-lora", "t-prompt")}


# ------------------------------------------------------------------------------------------ basics
def test_healthz_and_metrics(url):
    r = requests.get(url + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    post(url, "/v1/tasks/t-ptv2/generate", {"prompt": "a", "max_new_tokens": 1}, tenant="beta")  # a labelled series
    # keys are configured: metrics are private by default and only an admin key reads them
    anon = requests.get(url + "/metrics", timeout=10)
    assert anon.status_code == 401 and _err(anon)["field"] == "header.authorization"
    tenant = requests.get(url + "/metrics", headers=auth("alpha"), timeout=10)
    assert tenant.status_code == 403 and _err(tenant)["type"] == "forbidden" and "t-ptv2" not in tenant.text
    m = requests.get(url + "/metrics", headers=auth("bulk"), timeout=10)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "svd_ray_http_requests_total" in m.text and 'tenant="beta"' in m.text


def test_task_listing_is_per_tenant(url, serve_app):
    seen = {}
    for tenant in ("alpha", "beta", "bulk"):
        r = requests.get(url + "/v1/tasks", headers=auth(tenant), timeout=TIMEOUT)
        assert r.status_code == 200
        seen[tenant] = {t["id"]: t for t in r.json()["data"]}
    assert set(seen["alpha"]) == {"t-lora", "t-ia3", "t-prompt"}
    assert set(seen["beta"]) == {"t-ptv2"}
    assert set(seen["bulk"]) == set(serve_app["bundles"]["tasks"])
    lora = seen["alpha"]["t-lora"]
    assert lora["method"] == "lora" and lora["version"] and isinstance(lora["mu"], float)
    assert lora["steering_default"] == "svdecode" and lora["mu_estimator"] == "mean"
    models = requests.get(url + "/v1/models", headers=auth("beta"), timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["t-ptv2"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["created"] > 1.7e9  # unix seconds
    one = requests.get(url + "/v1/models/t-ptv2", headers=auth("beta"), timeout=TIMEOUT)
    assert one.status_code == 200 and one.json() == models["data"][0]
    other = requests.get(url + "/v1/models/t-lora", headers=auth("beta"), timeout=TIMEOUT)
    assert other.status_code == 404 and _err(other)["type"] == "not_found"  # another tenant's task looks unknown
    assert requests.get(url + "/v1/tasks/t-ptv2", headers=auth("beta"), timeout=TIMEOUT).json()["method"] == "p_tuning_v2"


@pytest.mark.parametrize("task", ["t-lora", "t-prompt"])
def test_generate_matches_engine(url, refs, task):
    ref = refs[task]
    for mode, mu in [("svdecode", None), ("off", None), ("static", None), ("svdecode", 100.0)]:
        body = {"prompt": PROMPTS, "max_new_tokens": 6, "steering": mode}
        if mu is not None:
            body["mu"] = mu
        r = post(url, f"/v1/tasks/{task}/generate", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["task"] == task and out["version"] and out["steering"]["mode"] == mode
        if mode == "off":  # μ and α do not act without steering: not reported as if they did
            assert out["steering"]["mu"] is None and out["steering"]["alpha"] is None, out["steering"]
        assert [c["index"] for c in out["choices"]] == [0, 1]
        assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])
        want = ref.generate(PROMPTS, GenerationConfig(max_new_tokens=6), ref.steering(mode, mu=mu))
        assert [c["token_ids"] for c in out["choices"]] == [w.token_ids for w in want], (task, mode, mu)
        assert [c["text"] for c in out["choices"]] == [w.text for w in want]
    # a single prompt string, sampling with a seed is reproducible
    body = {"prompt": PROMPTS[1], "max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    a, b = post(url, f"/v1/tasks/{task}/generate", body).json(), post(url, f"/v1/tasks/{task}/generate", body).json()
    assert len(a["choices"]) == 1 and a["choices"] == b["choices"]


def test_steering_on_vs_off_differs(url):
    on = post(url, "/v1/tasks/t-lora/generate", {"prompt": PROMPTS, "max_new_tokens": 6, "mu": 100.0}).json()
    off = post(url, "/v1/tasks/t-lora/generate", {"prompt": PROMPTS, "max_new_tokens": 6, "steering": "off"}).json()
    assert [c["token_ids"] for c in on["choices"]] != [c["token_ids"] for c in off["choices"]]


@pytest.mark.parametrize("task", ["t-lora", "t-prompt"])
def test_score_shapes_and_steering(url, refs, task):
    ref = refs[task]
    choices = [" 5", " 6", " 12"]
    r = post(url, f"/v1/tasks/{task}/score", {"prompt": PROMPTS[0], "choices": choices, "mu": 20.0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["text"] for c in out["choices"]] == choices
    want = ref.score(PROMPTS[0], choices, ref.steering("svdecode", mu=20.0))
    for c, s, a, b in zip(out["choices"], want.steered, want.adapter, want.base):
        assert set(c["loglik"]) == {"steered", "adapter", "base"} and set(c["prob"]) == {"steered", "adapter", "base"}
        assert c["loglik"]["steered"] == pytest.approx(s, abs=1e-4)
        assert c["loglik"]["adapter"] == pytest.approx(a, abs=1e-4)
        assert c["loglik"]["base"] == pytest.approx(b, abs=1e-4)
        assert c["num_tokens"] >= 1
    for which in ("steered", "adapter", "base"):
        assert sum(c["prob"][which] for c in out["choices"]) == pytest.approx(1.0, abs=1e-9)
    assert any(abs(c["loglik"]["steered"] - c["loglik"]["adapter"]) > 1e-4 for c in out["choices"])
    off = post(url, f"/v1/tasks/{task}/score", {"prompt": PROMPTS[0], "choices": choices, "steering": "off"}).json()
    assert all(c["loglik"]["steered"] == pytest.approx(c["loglik"]["adapter"], abs=1e-6) for c in off["choices"])


def test_completions_openai_shape_and_stream(url):
    body = {"model": "t-ia3", "prompt": "Q: 4 + 4 = ?\nA:", "max_tokens": 6, "temperature": 0}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "t-ia3" and out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"} and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]

    with post(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
              stream=True) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "t-ia3" for c in chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == choice["text"]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == [choice["finish_reason"]]
    assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_generate_stream_native(url, refs):
    body = {"prompt": PROMPTS, "max_new_tokens": 8, "stop": ["e"]}
    whole = post(url, "/v1/tasks/t-prompt/generate", body).json()
    tok = refs["t-prompt"].tokenizer
    for c in whole["choices"]:  # token_ids end before the token that completed the stop string
        if c["finish_reason"] == "stop":
            assert "e" not in tok.decode(c["token_ids"]), c
    assert any(c["finish_reason"] == "stop" for c in whole["choices"])  # the check above is not vacuous
    with post(url, "/v1/tasks/t-prompt/generate", {**body, "stream": True}, stream=True) as s:
        assert s.status_code == 200
        events = sse_events(s)
    names = [e for e, _ in events]
    assert names[0] == "meta" and names[-2:] == ["usage", "done"] and names.count("end") == 2
    data = [(e, json.loads(d)) for e, d in events]
    for i, c in enumerate(whole["choices"]):
        assert "".join(d["text"] for e, d in data if e == "token" and d["index"] == i) == c["text"]
        (end,) = [d for e, d in data if e == "end" and d["index"] == i]
        assert end["finish_reason"] == c["finish_reason"]


# ------------------------------------------------------------------------------------------ auth
def _err(r):
    body = r.json()
    assert set(body) == {"error"} and {"type", "message", "field", "status"} <= set(body["error"])
    assert body["error"]["status"] == r.status_code
    return body["error"]


GEN = {"prompt": "hi", "max_new_tokens": 2}


@pytest.mark.parametrize("headers,expect", [
    ({}, 401),
    ({"Authorization": ""}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": f"Basic {KEYS['alpha']}"}, 401),
    ({"Authorization": "Bearer not-a-real-key-000000000"}, 401),
    ({"Authorization": f"Bearer {KEYS['alpha']}x"}, 401),
    ({"Authorization": f"bearer {KEYS['alpha']}"}, 200),
    ({"Authorization": f"Bearer {KEYS['alpha']}"}, 200),
])
def test_auth_keys(url, headers, expect):
    r = requests.post(url + "/v1/tasks/t-lora/generate", json=GEN, headers=headers, timeout=TIMEOUT)
    assert r.status_code == expect, r.text
    if expect == 401:
        assert _err(r)["type"] == "unauthorized" and r.headers.get("www-authenticate", "").startswith("Bearer")
        assert requests.get(url + "/v1/tasks", headers=headers, timeout=TIMEOUT).status_code == 401


@pytest.mark.parametrize("tenant,task,expect", [
    ("alpha", "t-lora", 200), ("alpha", "t-prompt", 200), ("alpha", "t-ptv2", 404),
    ("beta", "t-ptv2", 200), ("beta", "t-lora", 404), ("beta", "t-prompt", 404),
    ("bulk", "t-ptv2", 200), ("bulk", "t-ia3", 200),
    ("alpha", "no-such-task", 404), ("bulk", "no-such-task", 404),
])
def test_tenant_task_matrix(url, tenant, task, expect):
    gen = post(url, f"/v1/tasks/{task}/generate", GEN, tenant=tenant)
    score = post(url, f"/v1/tasks/{task}/score", {"prompt": "hi", "choices": [" a"]}, tenant=tenant)
    comp = post(url, "/v1/completions", {"model": task, "prompt": "hi", "max_tokens": 2}, tenant=tenant)
    info = requests.get(url + f"/v1/tasks/{task}", headers=auth(tenant), timeout=TIMEOUT)
    assert [gen.status_code, score.status_code, comp.status_code, info.status_code] == [expect] * 4, gen.text
    if expect == 404:
        assert comp.json()["error"]["field"] == "body.model"


def test_other_tenants_task_looks_unknown(url):
    """Same status, same body (but the name) and same headers for 'not yours' and 'does not exist'."""
    for path, body in [("/v1/tasks/{}/generate", GEN), ("/v1/tasks/{}/score", {"prompt": "hi", "choices": [" a"]})]:
        theirs = post(url, path.format("t-ptv2"), body, tenant="alpha")
        ghost = post(url, path.format("t-ghost"), body, tenant="alpha")
        assert theirs.status_code == ghost.status_code == 404
        assert json.dumps(theirs.json()).replace("t-ptv2", "X") == json.dumps(ghost.json()).replace("t-ghost", "X")
        assert set(theirs.headers) - {"date", "x-request-id"} == set(ghost.headers) - {"date", "x-request-id"}
    a = post(url, "/v1/completions", {"model": "t-ptv2", "prompt": "x"}, tenant="alpha").json()
    b = post(url, "/v1/completions", {"model": "t-ghost", "prompt": "x"}, tenant="alpha").json()
    assert json.dumps(a).replace("t-ptv2", "X") == json.dumps(b).replace("t-ghost", "X")


def test_rate_limit_429_with_retry_after(url):
    codes = [post(url, "/v1/tasks/t-lora/score", {"prompt": "hi", "choices": [" a"]}, tenant="slow") for _ in range(4)]
    assert [c.status_code for c in codes[:2]] == [200, 200]
    limited = [c for c in codes if c.status_code == 429]
    assert limited, [c.status_code for c in codes]
    err = _err(limited[0])
    assert err["type"] == "rate_limited"
    assert int(limited[0].headers["Retry-After"]) >= 1
    # other tenants are not affected
    assert post(url, "/v1/tasks/t-lora/score", {"prompt": "hi", "choices": [" a"]}, tenant="alpha").status_code == 200


# ------------------------------------------------------------------------------------------ malformed
LONG = "word " * 900  # 4500 characters: over the test limit of 4000
MALFORMED = [
    # (id, method, path, body (dict | bytes | None), expected status, expected field (None = don't care))
    ("not-json", "POST", "/v1/tasks/t-lora/generate", b"{not json", 400, "body"),
    ("empty-body", "POST", "/v1/tasks/t-lora/generate", b"", 400, "body"),
    ("nan-literal", "POST", "/v1/tasks/t-lora/generate", b'{"prompt": "x", "mu": NaN}', 400, "body"),
    ("bad-utf8", "POST", "/v1/tasks/t-lora/generate", b'{"prompt": "\xff\xfe"}', 400, "body"),
    ("json-array", "POST", "/v1/tasks/t-lora/generate", [1, 2], 422, "body"),
    ("json-string", "POST", "/v1/tasks/t-lora/generate", "hello", 422, "body"),
    ("prompt-missing", "POST", "/v1/tasks/t-lora/generate", {"max_new_tokens": 3}, 422, "body.prompt"),
    ("prompt-int", "POST", "/v1/tasks/t-lora/generate", {"prompt": 5}, 422, "body.prompt"),
    ("prompt-null", "POST", "/v1/tasks/t-lora/generate", {"prompt": None}, 422, "body.prompt"),
    ("prompt-list-item", "POST", "/v1/tasks/t-lora/generate", {"prompt": ["a", 3]}, 422, "body.prompt[1]"),
    ("prompt-empty", "POST", "/v1/tasks/t-lora/generate", {"prompt": ""}, 422, "body.prompt[0]"),
    ("prompt-empty-list", "POST", "/v1/tasks/t-lora/generate", {"prompt": []}, 422, "body.prompt"),
    ("too-many-prompts", "POST", "/v1/tasks/t-lora/generate", {"prompt": ["a"] * 5}, 422, "body.prompt"),
    ("prompt-too-long", "POST", "/v1/tasks/t-lora/generate", {"prompt": LONG}, 422, "body.prompt"),
    ("prompt-too-many-tokens", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a b " * 450}, 422, "body.prompt"),
    ("max-new-tokens-0", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": 0}, 422, "body.max_new_tokens"),
    ("max-new-tokens-str", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": "5"}, 422, "body.max_new_tokens"),
    ("max-new-tokens-float", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": 2.5}, 422, "body.max_new_tokens"),
    ("max-new-tokens-cap", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": 100000}, 422, "body.max_new_tokens"),
    ("max-new-tokens-bool", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": True}, 422, "body.max_new_tokens"),
    ("temperature-neg", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "temperature": -1}, 422, "body.temperature"),
    ("top-p-zero", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "top_p": 0}, 422, "body.top_p"),
    ("top-p-big", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "top_p": 1.5}, 422, "body.top_p"),
    ("top-k-neg", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "top_k": -1}, 422, "body.top_k"),
    ("beams-0", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "num_beams": 0}, 422, "body.num_beams"),
    ("beams-cap", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "num_beams": 50}, 422, "body.num_beams"),
    ("beams-sampling", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "num_beams": 2, "temperature": 0.7}, 422, "body.num_beams"),
    ("beams-stream", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "num_beams": 2, "stream": True}, 422, "body.num_beams"),
    ("steering-bogus", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "steering": "max"}, 422, "body.steering"),
    ("mu-string", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "mu": "NaN"}, 422, "body.mu"),
    ("mu-huge", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "mu": 1e300}, 422, "body.mu"),
    ("alpha-big", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "alpha": 2}, 422, "body.alpha"),
    ("seed-neg", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "seed": -1}, 422, "body.seed"),
    ("stream-str", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "stream": "yes"}, 422, "body.stream"),
    ("stop-too-many", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "stop": list("abcdef")}, 422, "body.stop"),
    ("stop-int", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "stop": 7}, 422, "body.stop"),
    ("unknown-field", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "prompts": ["b"]}, 422, "body.prompts"),
    ("body-too-large", "POST", "/v1/tasks/t-lora/generate", {"prompt": "x" * 20000}, 413, "body"),
    ("score-no-choices", "POST", "/v1/tasks/t-lora/score", {"prompt": "a"}, 422, "body.choices"),
    ("score-empty-choices", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": []}, 422, "body.choices"),
    ("score-choice-int", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [" b", 2]}, 422, "body.choices[1]"),
    ("score-choice-empty", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [""]}, 422, "body.choices[0]"),
    ("score-too-many", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [" x"] * 7}, 422, "body.choices"),
    ("score-prompt-list", "POST", "/v1/tasks/t-lora/score", {"prompt": ["a"], "choices": [" b"]}, 422, "body.prompt"),
    ("score-policy", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [" b"], "outside_mask": "drop"}, 422, "body.outside_mask"),
    ("score-alpha-neg", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [" b"], "alpha": -0.1}, 422, "body.alpha"),
    ("cmpl-no-model", "POST", "/v1/completions", {"prompt": "a"}, 422, "body.model"),
    ("cmpl-model-int", "POST", "/v1/completions", {"model": 3, "prompt": "a"}, 422, "body.model"),
    ("cmpl-n-0", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "n": 0}, 422, "body.n"),
    ("cmpl-logprobs-neg", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "logprobs": -1}, 422, "body.logprobs"),
    ("cmpl-echo-str", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "echo": "yes"}, 422, "body.echo"),
    ("cmpl-token-ids-neg", "POST", "/v1/completions", {"model": "t-lora", "prompt": [1, -2, 3]}, 422, "body.prompt"),
    ("cmpl-n-greedy", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "n": 2, "temperature": 0}, 422, "body.n"),
    ("cmpl-logprobs-big", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "logprobs": 6}, 422, "body.logprobs"),
    ("cmpl-echo-stream", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "echo": True, "stream": True}, 422, "body.echo"),
    ("cmpl-token-id-big", "POST", "/v1/completions", {"model": "t-lora", "prompt": [1, 2, 1000000]}, 422, "body.prompt"),
    ("cmpl-max-tokens-0", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "max_tokens": 0}, 422, "body.max_tokens"),
    ("cmpl-max-tokens-cap", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "max_tokens": 999}, 422, "body.max_tokens"),
    ("cmpl-penalty", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "presence_penalty": 1}, 422, "body.presence_penalty"),
    ("cmpl-temperature", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "temperature": 3}, 422, "body.temperature"),
    ("cmpl-stream-options", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "stream_options": {"x": True}}, 422, "body.stream_options"),
    ("cmpl-bad-task-name", "POST", "/v1/completions", {"model": "../../etc/passwd", "prompt": "a"}, 404, "body.model"),
    ("wrong-method", "GET", "/v1/tasks/t-lora/generate", None, 405, None),
    ("unknown-route", "POST", "/v1/tasks/t-lora/explode", {"prompt": "a"}, 404, None),
    ("path-traversal", "POST", "/v1/tasks/..%2F..%2Fetc/generate", {"prompt": "a"}, 404, None),
    ("trailing-slash", "GET", "/v1/tasks/", None, 404, None),
    ("temperature-subnormal", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "temperature": 5e-324}, 422, "body.temperature"),
    ("top-p-subnormal", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "top_p": 1e-310}, 422, "body.top_p"),
    ("mu-subnormal", "POST", "/v1/tasks/t-lora/score", {"prompt": "a", "choices": [" b"], "mu": -1e-320}, 422, "body.mu"),
    ("cmpl-temperature-subnormal", "POST", "/v1/completions", {"model": "t-lora", "prompt": "a", "temperature": 4e-320}, 422, "body.temperature"),
    ("chat-role", "POST", "/v1/chat/completions", {"model": "t-lora", "messages": [{"role": "robot", "content": "x"}]}, 422, "body.messages[0].role"),
    ("chat-no-messages", "POST", "/v1/chat/completions", {"model": "t-lora", "messages": []}, 422, "body.messages"),
    ("chat-max-tokens-cap", "POST", "/v1/chat/completions", {"model": "t-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999}, 422, "body.max_tokens"),
    ("text-plain-post", "POST", "/v1/tasks/t-lora/generate", ("text/plain", b'{"prompt": "x"}'), 415, "header.content-type"),
    ("form-post", "POST", "/v1/tasks/t-lora/score", ("application/x-www-form-urlencoded", b"prompt=x"), 415, "header.content-type"),
    ("min-new-tokens-over-max", "POST", "/v1/tasks/t-lora/generate", {"prompt": "a", "max_new_tokens": 2, "min_new_tokens": 3}, 422, "body.min_new_tokens"),
]


def test_malformed_table_is_big_enough():
    assert len(MALFORMED) >= 20


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_are_4xx(url, case):
    _id, method, path, body, status, field = case
    headers = {**auth("bulk")}
    if isinstance(body, tuple):  # (content type, raw body)
        r = requests.request(method, url + path, data=body[1], headers={**headers, "Content-Type": body[0]},
                             timeout=TIMEOUT, allow_redirects=False)
    elif isinstance(body, bytes):
        r = requests.request(method, url + path, data=body, headers={**headers, "Content-Type": "application/json"},
                             timeout=TIMEOUT)
    elif body is None:
        r = requests.request(method, url + path, headers={**headers, "Host": "evil.example:666"}, timeout=TIMEOUT,
                             allow_redirects=False)
        assert "evil.example" not in r.headers.get("location", "")
    else:
        r = requests.request(method, url + path, json=body, headers=headers, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = _err(r)
    if field is not None:
        assert err["field"] == field, err
    assert "Traceback" not in r.text and "File \"" not in r.text


@pytest.mark.parametrize("extra", [{"temperature": 1e-40}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-38},
                                   {"temperature": 100.0, "top_k": 1}])
def test_extreme_sampling_values_never_5xx(url, extra):
    """Tiny temperatures / top_p made the old sampler produce NaN probabilities (500); now they are
    answered, and T → 0 / top_p → 0 / top_k = 1 are the greedy answer."""
    body = {"prompt": PROMPTS[0], "max_new_tokens": 4, "seed": 3}
    greedy = post(url, "/v1/tasks/t-lora/generate", {**body, "temperature": 0})
    r = post(url, "/v1/tasks/t-lora/generate", {**body, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == greedy.json()["choices"][0]["token_ids"]


# ------------------------------------------------------------------------------------------ openai client
def test_official_openai_client_completions_chat_and_models(url, refs):
    """The official ``openai`` package as the client: completions, chat (plain and streaming), models."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["alpha"], max_retries=0, timeout=TIMEOUT)
    cmpl = client.completions.create(model="t-lora", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    want = refs["t-lora"].generate([PROMPTS[0]], GenerationConfig(max_new_tokens=4))[0]
    assert cmpl.choices[0].text == want.text and cmpl.usage.completion_tokens == len(want.token_ids)

    messages = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "2 + 3 = ?"}]
    chat = client.chat.completions.create(model="t-lora", messages=messages, max_tokens=6, temperature=0)
    # the same text as the chat template rendered by the tokenizer, decoded by the reference decoder
    prompt = refs["t-lora"].tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = refs["t-lora"].generate([prompt], GenerationConfig(max_new_tokens=6))[0]
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want.text
    assert chat.usage.prompt_tokens == len(refs["t-lora"].tokenizer(prompt)["input_ids"])

    stream = client.chat.completions.create(model="t-lora", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == want.text and finish in ("stop", "length") and usage.completion_tokens > 0

    ids = [m.id for m in client.models.list().data]
    assert set(ids) == {"t-lora", "t-ia3", "t-prompt"}
    m = client.models.retrieve("t-ia3")
    assert m.id == "t-ia3" and m.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("t-ptv2")  # beta's task: unknown to alpha
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="t-lora", messages=[{"role": "robot", "content": "hi"}])


# ------------------------------------------------------------------------------------------ replica probes
def _model_replicas() -> list[tuple[str, str]]:
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "TaskModels" in a["name"] and a["name"].startswith("SERVE_REPLICA")]


def replica_stats(timeout: float = 30) -> dict[str, dict]:
    """Each model replica's engine load and counters, read from that replica (``TaskModels.record_routing_stats``)."""
    import ray

    names = _model_replicas()
    refs_ = [ray.get_actor(n, namespace=ns).record_routing_stats.remote() for n, ns in names]
    out = {}
    for (n, _), ref in zip(names, refs_):
        try:
            out[n] = ray.get(ref, timeout=timeout)
        except Exception:  # a replica being replaced
            pass
    return out


def total(stats: dict[str, dict], key: str) -> int:
    return sum(int(s.get(key, 0)) for s in stats.values())


def wait_idle(timeout: float = 60) -> dict[str, dict]:
    """Replica stats once no model replica has a request admitted or queued."""
    deadline = time.monotonic() + timeout
    while True:
        st = replica_stats()
        if len(st) == 2 and total(st, "active_requests") == 0 and total(st, "queued") == 0:
            return st
        assert time.monotonic() < deadline, f"model replicas still busy: {st}"
        time.sleep(0.2)


def metric(url, name: str) -> float:
    """Sum of the samples of one series family in the ingress's /metrics (admin key)."""
    text = requests.get(url + "/metrics", headers=auth("bulk"), timeout=TIMEOUT).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _settings(serve_app):
    from svd_ray.serving.schemas import ServeSettings

    return ServeSettings.model_validate(serve_app["args"])


# ------------------------------------------------------------------------------------------ load
def test_200_concurrent_requests_over_3_tasks(url, refs, serve_app):
    """200 requests sent at the same moment (one asyncio client, 200 connections): the ingress holds them all
    at once (its in-flight gauge, sampled during the run, goes far above the 2 × 16 the model replicas
    accept), each model replica never holds more than its ``max_ongoing_requests`` (the rest queue in
    the ingress, as documented), and every answer is the one the reference model gives alone."""
    import asyncio

    import httpx
    import ray

    tasks = ["t-lora", "t-ia3", "t-prompt"]
    n = 200
    per_replica = 16  # TaskModels' max_ongoing_requests (deployment default; the fixture does not change it)

    def request(i: int) -> tuple[str, dict]:
        task, kind = tasks[i % 3], (i // 3) % 3
        if kind == 0:
            return f"/v1/tasks/{task}/generate", {"prompt": f"Q: {i % 10} + 1 = ?\nA:", "max_new_tokens": 3}
        if kind == 1:
            return f"/v1/tasks/{task}/score", {"prompt": f"Q: {i % 10} + 1 = ?\nA:", "choices": [" 1", " 2"]}
        return "/v1/completions", {"model": task, "prompt": f"n{i}", "max_tokens": 3, "temperature": 0}

    actors = [ray.get_actor(name, namespace=ns) for name, ns in _model_replicas()]
    assert len(actors) == 2
    peak = {"ingress": 0.0, "replica": 0}

    async def run():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=url, headers=auth("bulk"), limits=limits, timeout=TIMEOUT * 2) as client, \
                httpx.AsyncClient(base_url=url, headers=auth("bulk"), timeout=TIMEOUT) as probe:
            go, done = asyncio.Event(), asyncio.Event()

            async def one(i: int):
                path, body = request(i)
                await go.wait()
                try:
                    r = await client.post(path, json=body)
                    return i, r.status_code, r.json()
                except Exception as exc:  # a lost request
                    return i, repr(exc), None

            async def sample_ingress():
                while not done.is_set():
                    text = (await probe.get("/metrics")).text
                    now = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith("svd_ray_http_in_flight{"))
                    peak["ingress"] = max(peak["ingress"], now - 1)  # minus this scrape
                    await asyncio.sleep(0.05)

            async def sample_replicas():
                while not done.is_set():
                    for st in await asyncio.gather(*[a.record_routing_stats.remote() for a in actors]):
                        peak["replica"] = max(peak["replica"], st.get("active_requests", 0) + st.get("queued", 0))
                    await asyncio.sleep(0.05)

            calls = [asyncio.create_task(one(i)) for i in range(n)]
            probes = [asyncio.create_task(sample_ingress()), asyncio.create_task(sample_replicas())]
            await asyncio.sleep(0.5)  # every request is parked on the event: release them together
            t0 = time.perf_counter()
            go.set()
            results = await asyncio.gather(*calls)
            took = time.perf_counter() - t0
            done.set()
            await asyncio.gather(*probes)
            return results, took

    results, took = asyncio.run(run())
    assert sorted(i for i, _, _ in results) == list(range(n))
    bad = [(i, s, b) for i, s, b in results if s != 200]
    assert not bad, bad[:10]  # queued, not refused: TaskModels has no max_queued_requests
    # in flight together: ≤ 40 client threads (the old test) could never show more than 40 here
    assert peak["ingress"] >= 120, peak
    assert peak["replica"] <= per_replica, peak  # a replica never holds more than max_ongoing_requests

    # every answer is right: equal to the reference model decoding/scoring that request alone
    mismatches = []
    for i, _, out in results:
        path, body = request(i)
        task = tasks[i % 3]
        if path.endswith("/generate"):
            assert out["task"] == task and len(out["choices"]) == 1
        elif path.endswith("/score"):
            assert out["task"] == task and [c["text"] for c in out["choices"]] == [" 1", " 2"]
        else:
            assert out["model"] == task and out["object"] == "text_completion"
        if task not in refs:
            continue
        ref = refs[task]
        if path.endswith("/score"):
            want = ref.score(body["prompt"], body["choices"], ref.steering("svdecode"))
            got = [c["loglik"]["steered"] for c in out["choices"]]
            if any(abs(g - w) > 1e-4 for g, w in zip(got, want.steered)):
                mismatches.append((i, got, want.steered))
        else:
            prompt = body["prompt"]
            want = ref.generate([prompt], GenerationConfig(max_new_tokens=3), ref.steering("svdecode"))[0]
            got = out["choices"][0]["text"]
            if got != want.text:
                mismatches.append((i, got, want.text))
    assert not mismatches, mismatches[:5]
    # identical requests (t-ia3 has no local reference) got the same answers (scores: up to batching noise)
    seen: dict = {}
    for i, _, out in results:
        key = json.dumps(request(i), sort_keys=True)
        first = seen.setdefault(key, out["choices"])
        if request(i)[0].endswith("/score"):
            for a, b in zip(first, out["choices"]):
                assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4), (i, key)
        else:
            assert [c["text"] for c in first] == [c["text"] for c in out["choices"]], (i, key)
    print(f"\n{n} concurrent requests over 3 tasks: {took:.1f}s, peak {peak['ingress']:.0f} in the ingress at "
          f"once, ≤ {peak['replica']} per model replica")


def test_promoted_version_is_picked_up_without_errors(url, serve_app):
    from svd_ray.store import open_store

    b = serve_app["bundles"]
    st = open_store(b["store"], cache_dir=b["root"] / "promote-cache")
    before = post(url, "/v1/tasks/t-ia3/generate", GEN, tenant="bulk").json()["version"]
    new = publish_task(b["store"], "t-ia3", "ia3", b["base"], seed=42)
    st.promote("t-ia3", new.version)
    stop = threading.Event()
    seen, failures = [], []

    def hammer():
        while not stop.is_set():
            r = post(url, "/v1/tasks/t-ia3/generate", GEN, tenant="bulk")
            (seen.append(r.json()["version"]) if r.status_code == 200 else failures.append(r.text))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            # both model replicas must have swapped: several consecutive answers from the new version
            if len(seen) >= 6 and all(v == new.version for v in seen[-6:]):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    assert not failures, failures[:3]
    assert before != new.version
    assert seen[-1] == new.version, seen[-10:]
    time.sleep(1.1)  # listing cache TTL
    listed = {t["id"]: t for t in requests.get(url + "/v1/tasks", headers=auth("bulk"), timeout=TIMEOUT).json()["data"]}
    assert listed["t-ia3"]["version"] == new.version and listed["t-ia3"]["promoted"] is True


# ------------------------------------------------------------------------------------------ /score budget
SCORE_PROMPT = "Q: 1 + 1 = ?\nA:"


def _kv_reservation(n_prompt: int, choice_tokens: list[int], score_max_rows: int) -> int:
    """The engine's KV reservation of a score request (docs/SERVING.md §4: the /score budget)."""
    rows = 2 * min(score_max_rows // 2, len(choice_tokens))
    return rows * (n_prompt + max(choice_tokens))


def test_score_far_above_budget_is_refused_before_model_work(url, serve_app):
    s = _settings(serve_app)
    tok = serve_app_tokenizer(serve_app)
    choices = [f" {d}" * 1000 for d in range(1, 7)]  # 2,000 tokens each: within every per-field limit
    kv = _kv_reservation(len(tok(SCORE_PROMPT)["input_ids"]), [len(tok(c)["input_ids"]) for c in choices],
                         s.engine.score_max_rows)
    assert kv >= 3 * s.engine.max_kv_tokens, kv  # far above the budget
    before = wait_idle()
    r = post(url, "/v1/tasks/t-lora/score", {"prompt": SCORE_PROMPT, "choices": choices}, tenant="bulk")
    assert r.status_code == 413, r.text
    err = _err(r)
    assert err["type"] == "request_too_large" and err["field"] == "body.choices", err
    assert str(s.engine.max_kv_tokens) in err["message"]
    after = replica_stats()
    for key in ("prefill_forwards", "score_forwards", "decode_steps", "requests_done", "tokens_out"):
        assert total(after, key) == total(before, key), (key, before, after)  # no model work at all


def serve_app_tokenizer(serve_app):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(serve_app["bundles"]["base"])


def test_score_just_below_budget_stays_within_memory_bound(url, serve_app, refs):
    """A /score request just under the KV budget, with long choices (materialising their full-vocabulary
    logits would take > 1 GiB here), completes, equals the reference scores, and the model replica's RSS
    (sampled every few ms during the request) grows by less than the documented bound: the request's KV
    bytes + 8 × P × |V| × 4 bytes (P = min(score_max_rows × prefill_chunk, 8 × step_token_budget)
    positions per scoring forward) + 128 MiB of allocator slack."""
    import psutil

    s = _settings(serve_app)
    e = s.engine
    tok = serve_app_tokenizer(serve_app)
    choices = [f" {d}" * 240 for d in range(1, 7)]  # 480 tokens each
    n_prompt, lens = len(tok(SCORE_PROMPT)["input_ids"]), [len(tok(c)["input_ids"]) for c in choices]
    kv = _kv_reservation(n_prompt, lens, e.score_max_rows)
    assert 0.9 * e.max_kv_tokens <= kv <= e.max_kv_tokens, kv  # just below the budget

    cfg = refs["t-lora"].peft_model.get_base_model().config
    vocab = cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = kv * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    positions = min(e.score_max_rows * e.prefill_chunk, 8 * e.step_token_budget)
    bound = kv_bytes + 8 * positions * vocab * 4 + 128 * 2**20
    unchunked = 2 * sum(lens) * vocab * 4  # one fp32 copy of every choice position's logits, both branches
    assert unchunked > 2 * bound, (unchunked, bound)  # the measurement can tell the two apart

    procs = [psutil.Process(st["pid"]) for st in wait_idle().values()]
    base = {p.pid: p.memory_info().rss for p in procs}
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for p in procs:
                try:
                    peak[p.pid] = max(peak[p.pid], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.003)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        r = post(url, "/v1/tasks/t-lora/score", {"prompt": SCORE_PROMPT, "choices": choices, "mu": 20.0},
                 tenant="bulk")
    finally:
        stop.set()
        sampler.join(5)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["num_tokens"] for c in out["choices"]] == lens
    ref = refs["t-lora"]
    want = ref.score(SCORE_PROMPT, choices, ref.steering("svdecode", mu=20.0))
    for c, w in zip(out["choices"], want.steered):
        assert c["loglik"]["steered"] == pytest.approx(w, abs=1e-3, rel=1e-5)
    growth = max(peak[pid] - base[pid] for pid in base)
    assert growth <= bound, f"replica RSS grew {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"
    print(f"\n/score at {kv}/{e.max_kv_tokens} KV tokens ({sum(lens)} choice tokens): {took:.1f}s, replica RSS "
          f"+{growth / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB; unchunked logits alone {unchunked / 2**30:.2f} GiB)")


def test_stream_client_disconnect_stops_decoding(url, serve_app):
    """Hanging up a stream cancels its decoding. The generations are long (``max_new_tokens`` at the
    configured limit, EOS forbidden by ``min_new_tokens``, no stop strings): uncancelled, the three of
    them would generate 3 × limit tokens; the replicas' own counters must show they stopped far earlier,
    were counted as cancelled, and left no request admitted."""
    limit = _settings(serve_app).limits.max_new_tokens
    body = {"prompt": "Once", "max_new_tokens": limit, "min_new_tokens": limit, "stream": True}
    before = wait_idle()
    for _ in range(3):
        with post(url, "/v1/tasks/t-lora/generate", body, tenant="bulk", stream=True) as s:
            assert s.status_code == 200
            lines = s.iter_lines(decode_unicode=True)
            while "event: token" not in next(lines):  # decoding has started; hang up
                pass
    after = wait_idle(timeout=60)  # ends only if the three generations stopped
    generated = total(after, "tokens_out") - total(before, "tokens_out")
    cancelled = total(after, "cancelled") - total(before, "cancelled")
    assert 3 <= generated <= 3 * limit // 2, (generated, 3 * limit)  # uncancelled: exactly 3 × limit
    assert cancelled == 3, (before, after)
    print(f"\nclient disconnect: {generated} tokens generated of {3 * limit} requested, 3 cancelled")
    assert post(url, "/v1/tasks/t-lora/generate", GEN, tenant="bulk").status_code == 200


# ------------------------------------------------------------------------------------------ failure
def test_replica_killed_during_load(url):
    """Kill the busier model replica while it holds requests. Non-streaming requests in flight on it are
    retried once by the ingress (``svd_ray_model_retries_total`` grows) and answered by the other replica:
    all 200. The only allowed failure is a stream that had already sent events when its replica died
    (it cannot be replayed): it ends with a JSON ``event: error`` (503 unavailable), never a hang."""
    import ray

    replicas = _model_replicas()
    assert len(replicas) == 2, replicas
    tasks = ["t-lora", "t-ia3", "t-prompt"]
    wait_idle()

    def one(i: int):
        r = post(url, f"/v1/tasks/{tasks[i % 3]}/generate", {"prompt": f"item {i}", "max_new_tokens": 24},
                 tenant="bulk")
        return r.status_code, r.json()  # always JSON, never a hang or an HTML page

    def stream(i: int):
        body = {"prompt": f"story {i}", "max_new_tokens": 96, "min_new_tokens": 96, "stream": True}
        with post(url, f"/v1/tasks/{tasks[i % 3]}/generate", body, tenant="bulk", stream=True) as s:
            return s.status_code, sse_events(s) if s.status_code == 200 else s.json()

    retried_before = metric(url, "svd_ray_model_retries_total")
    n, n_streams = 120, 6
    with ThreadPoolExecutor(max_workers=16 + n_streams) as pool:
        streams = [pool.submit(stream, i) for i in range(n_streams)]
        futures = [pool.submit(one, i) for i in range(n)]
        deadline = time.monotonic() + TIMEOUT
        victim, held = None, 0
        while time.monotonic() < deadline:  # the busier replica, once it holds several requests
            st = replica_stats()
            name, load = max(((k, v.get("active_requests", 0) + v.get("queued", 0)) for k, v in st.items()),
                             key=lambda kv: kv[1], default=(None, 0))
            if load >= 6:
                victim, held = name, load
                break
            time.sleep(0.05)
        assert victim is not None, "no replica ever held 6 requests"
        pending = n - sum(f.done() for f in futures)
        ray.kill(ray.get_actor(victim, namespace=dict(replicas)[victim]), no_restart=True)
        results = [f.result(timeout=TIMEOUT + 30) for f in futures]
        stream_results = [f.result(timeout=TIMEOUT + 30) for f in streams]
    retried = metric(url, "svd_ray_model_retries_total") - retried_before

    assert pending > 30, pending  # the kill really happened under load
    failed = [(s, b) for s, b in results if s != 200]
    assert not failed, failed[:5]  # in flight on the dead replica, retried, answered by the other one
    assert all(len(b["choices"]) == 1 and b["choices"][0]["token_ids"] for _, b in results)
    assert retried >= 1, retried  # ...and the ingress did retry
    broken = 0
    for status, events in stream_results:
        assert status == 200, events
        names = [e for e, _ in events]
        assert names[0] == "meta", names[:3]
        if names[-1] == "done":  # complete: every token there
            (usage,) = [json.loads(d) for e, d in events if e == "usage"]
            assert usage["completion_tokens"] == 96
        else:  # its replica died mid-stream: a final JSON error event, nothing after it
            broken += 1
            assert names[-1] == "error", names[-5:]
            err = json.loads(events[-1][1])["error"]
            assert err["status"] == 503 and err["type"] == "unavailable" and {"message", "field"} <= set(err), err
    print(f"\nreplica kill with {held} requests on it and {pending} pending: all {n} requests 200, "
          f"retried by the ingress {retried:g}, {broken}/{n_streams} streams cut with an error event")

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if len(_model_replicas()) == 2 and post(url, "/v1/tasks/t-lora/generate", GEN, tenant="bulk").status_code == 200:
            break
        time.sleep(1)
    assert len(_model_replicas()) == 2
    for task in tasks:
        assert post(url, f"/v1/tasks/{task}/generate", GEN, tenant="bulk").status_code == 200
