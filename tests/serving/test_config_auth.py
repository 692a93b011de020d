"""Settings, configs, API keys, token buckets, request schemas and the CLI wiring (no Ray cluster)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from svd_ray.serving.auth import (
    ANONYMOUS,
    Authenticator,
    RateLimiter,
    Tenant,
    TokenBucket,
    hash_key,
    load_auth,
    parse_env_keys,
)
from svd_ray.serving.schemas import (
    ApiError,
    AuthSettings,
    CompletionRequest,
    GenerateRequest,
    Limits,
    RateLimit,
    ServeSettings,
    check_generate_limits,
    field_path,
    parse_bytes,
    parse_json_body,
    parse_model,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_serve_configs_validate(name):
    from svd_ray.serving.cli import load_serve_config

    cfg = load_serve_config(REPO / "serve_configs" / name)
    (app,) = cfg["applications"]
    assert app["import_path"] == "svd_ray.serving.deployments:build_app"
    settings = ServeSettings.model_validate(app["args"])
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"TaskModels", "Ingress"}
    if name == "local.yaml":
        assert settings.auth.mode == "disabled" and cfg["http_options"]["host"] == "127.0.0.1"
    else:
        assert settings.auth.mode == "keys"
        auto = deps["TaskModels"]["autoscaling_config"]
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
        assert auto["target_ongoing_requests"] > 0
        assert "num_gpus" in deps["TaskModels"]["ray_actor_options"]
        # autoscaling aims below what a replica accepts, which its engine can decode at once
        assert auto["target_ongoing_requests"] < deps["TaskModels"]["max_ongoing_requests"]
    # every request a replica accepts fits its engine's batch (a steered request takes 2 rows)
    assert deps["TaskModels"]["max_ongoing_requests"] * 2 <= settings.engine.max_rows


def test_cluster_config_refuses_to_start_without_keys(monkeypatch):
    from svd_ray.serving.deployments import build_app

    monkeypatch.delenv("SVD_RAY_API_KEYS", raising=False)
    monkeypatch.delenv("SVD_RAY_TENANTS_FILE", raising=False)
    args = yaml.safe_load((REPO / "serve_configs" / "cluster.yaml").read_text())["applications"][0]["args"]
    with pytest.raises(ValueError, match="tenants_file"):
        build_app(args)
    args["auth"]["tenants_file"] = None
    with pytest.raises(ValueError, match="no API keys"):
        build_app(args)
    monkeypatch.setenv("SVD_RAY_API_KEYS", "ops:a-long-enough-key-123:*")
    assert build_app(args) is not None


def test_config_overrides_and_errors(tmp_path):
    from svd_ray.serving.cli import load_serve_config

    cfg = load_serve_config(REPO / "serve_configs" / "local.yaml", port=9123, store="file:///tmp/x",
                            tenants=str(REPO / "serve_configs" / "tenants.example.yaml"))
    assert cfg["http_options"]["port"] == 9123
    args = cfg["applications"][0]["args"]
    assert args["store"] == "file:///tmp/x" and args["auth"]["mode"] == "keys"
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    raw["applications"][0]["args"]["pool"]["max_bytes"] = "lots"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="pool.max_bytes"):
        load_serve_config(bad)
    raw["applications"][0]["args"]["pool"]["max_bytes"] = "1GiB"
    raw["applications"][0]["args"]["colour"] = "blue"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="colour"):
        load_serve_config(bad)
    with pytest.raises(FileNotFoundError):
        load_serve_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("where,typo", [
    (("applications", 0, "deployments", 0), "max_ongoing_request"),
    (("applications", 0, "deployments", 0, "autoscaling_config"), "min_replica"),
    (("applications", 0, "deployments", 0, "ray_actor_options"), "num_cpu"),
    (("http_options",), "prt"),
    ((), "proxy_locaton"),
])
def test_serve_config_typos_are_named_not_ignored(tmp_path, where, typo):
    """Ray's own schema ignores unknown keys (a misspelled setting would deploy its default); `svd-ray serve`
    refuses the config and names the key and where it is."""
    from ray.serve.schema import ServeDeploySchema

    from svd_ray.serving.cli import load_serve_config

    raw = yaml.safe_load((REPO / "serve_configs" / "cluster.yaml").read_text())
    node = raw
    for k in where:
        node = node[k]
    node[typo] = 1
    ServeDeploySchema.model_validate(raw)  # what Serve itself accepts
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=f"'{typo}' was unexpected"):
        load_serve_config(bad)


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(1000) == 1000
    for bad in ("lots", "-1GiB", 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_cli_parsers_registered(capsys):
    from svd_ray.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--config" in capsys.readouterr().out
    assert main(["apikey", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:")[1].split()[0]
    digest = out.split("sha256:")[1].split()[0]
    assert hashlib.sha256(key.encode()).hexdigest() == digest and "acme:" in out
    assert main(["serve", "--config", "/nonexistent/serve.yaml"]) == 2


# ------------------------------------------------------------------------------------------ auth
def test_tenants_file_and_env(tmp_path):
    f = tmp_path / "tenants.yaml"
    f.write_text(yaml.safe_dump({
        "defaults": {"rate_limit": {"requests_per_second": 3, "burst": 4}},
        "tenants": {"acme": {"keys_sha256": [hash_key("acme-key-0123456789")], "tasks": ["a", "b"]},
                    "all": {"keys_sha256": [hash_key("all-key-00123456789")], "tasks": "*",
                            "rate_limit": {"requests_per_second": 100, "burst": 100}}},
    }))
    env = {"SVD_RAY_API_KEYS": "acme:second-acme-key-000, ops:ops-key-0000000000:x|y"}
    st = load_auth(AuthSettings(tenants_file=str(f)), env)
    a = Authenticator(st)
    acme = a.authenticate("Bearer acme-key-0123456789")
    assert acme.name == "acme" and acme.rate.burst == 4 and acme.may_use("a") and not acme.may_use("c")
    assert a.authenticate("Bearer second-acme-key-000").name == "acme"
    ops = a.authenticate("Bearer ops-key-0000000000")
    assert ops.tasks == frozenset({"x", "y"})
    assert a.authenticate("Bearer all-key-00123456789").tasks is None
    assert "acme-key-0123456789" not in repr(st.to_dict())  # only hashes travel
    for header in (None, "", "Bearer", "Basic acme-key-0123456789", "Bearer wrong-key-000000000"):
        with pytest.raises(ApiError) as e:
            a.authenticate(header)
        assert e.value.status == 401 and "WWW-Authenticate" in e.value.headers


@pytest.mark.parametrize("value,match", [
    ("acme", "tenant:key"),
    ("acme:short", "16-256"),
    ("bad!:a-long-enough-key-123", "invalid tenant"),
    ("new:a-long-enough-key-123", "name its tasks"),
])
def test_env_key_errors(value, match):
    with pytest.raises(ValueError, match=match):
        load_auth(AuthSettings(), {"SVD_RAY_API_KEYS": value})


def test_file_errors(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({"tenants": {"acme": {"keys_sha256": ["nothex"], "tasks": "*"}}}))
    with pytest.raises(ValueError, match="keys_sha256"):
        load_auth(AuthSettings(tenants_file=str(f)), {})
    f.write_text(yaml.safe_dump({"tenants": {"acme": {"keys_sha256": [hash_key("k" * 20)], "tasks": "*",
                                                      "colour": "red"}}}))
    with pytest.raises(ValueError, match="colour"):
        load_auth(AuthSettings(tenants_file=str(f)), {})
    f.write_text(yaml.safe_dump({"tenants": {"acme": {"keys_sha256": [hash_key("k" * 20)], "tasks": "*"}}}))
    with pytest.raises(ValueError, match="do not name its tasks"):
        load_auth(AuthSettings(tenants_file=str(f)), {"SVD_RAY_API_KEYS": "acme:another-key-0000000:*"})
    assert parse_env_keys("a:0123456789abcdef:*")[0][2] is None


def test_disabled_auth_is_anonymous():
    a = Authenticator(load_auth(AuthSettings(mode="disabled"), {}))
    assert a.authenticate(None).name == ANONYMOUS and a.authenticate("Bearer whatever").tasks is None


def test_token_bucket_and_limiter():
    now = [0.0]
    b = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert b.take() == 0.0
    lim = RateLimiter(clock=lambda: now[0])
    t = Tenant("x", None, RateLimit(requests_per_second=0.1, burst=1))
    lim.check(t)
    with pytest.raises(ApiError) as e:
        lim.check(t)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "10"
    assert "API key" in e.value.message
    lim.check(Tenant("y", None, RateLimit(requests_per_second=0.1, burst=1)))  # separate bucket
    anon = Tenant(ANONYMOUS, None, RateLimit(requests_per_second=0.1, burst=1))
    lim.check(anon)
    with pytest.raises(ApiError) as e:
        lim.check(anon)
    assert "API key" not in e.value.message and "auth disabled" in e.value.message  # no key to blame


# ------------------------------------------------------------------------------------------ schemas
def test_error_fields_are_named():
    with pytest.raises(ApiError) as e:
        parse_model(GenerateRequest, {"prompt": ["ok", 3]})
    assert e.value.field == "body.prompt[1]" and e.value.status == 422
    with pytest.raises(ApiError) as e:
        parse_model(GenerateRequest, {"prompt": "x", "max_new_tokens": "7"})
    assert e.value.field == "body.max_new_tokens"
    with pytest.raises(ApiError) as e:
        parse_model(CompletionRequest, {"model": "t", "prompt": "x", "n": 0})
    assert e.value.field == "body.n"
    assert field_path(("prompt", "list[str]", 2)) == "body.prompt[2]"
    with pytest.raises(ApiError) as e:
        check_generate_limits(["a"], 10, 2, [], Limits(), temperature=0.5)
    assert e.value.field == "body.num_beams"
    with pytest.raises(ApiError) as e:
        check_generate_limits(["a"] * 9, 10, 1, [], Limits())
    assert e.value.field == "body.prompt"


@pytest.mark.parametrize("raw,status", [(b"", 400), (b"[1]", 422), (b'{"a": Infinity}', 400), (b"\xff", 400),
                                        (b"{" * 100000, 400)])
def test_json_body_errors(raw, status):
    with pytest.raises(ApiError) as e:
        parse_json_body(raw)
    assert e.value.status == status and e.value.field == "body"


def test_generate_defaults():
    r = parse_model(GenerateRequest, {"prompt": "hello"})
    # steering None = the task's default (svdecode, or off when its calibration found steering does not help)
    assert r.prompt == ["hello"] and r.temperature == 0 and r.steering is None and r.max_new_tokens == 32


def test_public_metrics_with_keys_drop_tenant_and_task_series():
    from svd_ray.serving.app import _without_tenant_labels

    body = (b'# HELP x\nsvd_ray_http_in_flight{replica="r"} 1.0\n'
            b'svd_ray_tenant_requests_total{tenant="beta",outcome="accepted",replica="r"} 3.0\n'
            b'svd_ray_generated_tokens_total{task="secret-task",steering="svdecode"} 9.0\n')
    out = _without_tenant_labels(body)
    assert b"svd_ray_http_in_flight" in out and b"beta" not in out and b"secret-task" not in out


def test_admin_flag_round_trips(tmp_path):
    import yaml

    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({"tenants": {"ops": {"keys_sha256": ["a" * 64], "tasks": "*", "admin": True},
                                             "user": {"keys_sha256": ["b" * 64], "tasks": ["x"]}}}))
    state = load_auth(AuthSettings(mode="keys", tenants_file=str(f)), {})
    again = type(state).from_dict(state.to_dict())
    assert again.tenants["ops"].admin and not again.tenants["user"].admin
