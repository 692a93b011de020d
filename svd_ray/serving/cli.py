"""``svd-ray serve`` (run the Serve application from a Serve config file) and ``svd-ray apikey``.

``svd-ray serve --config serve_configs/local.yaml`` does what ``serve run serve_configs/local.yaml``
does (same file, same builder, same ``deploy_apps`` call), but starts a private local Ray with the
settings this project needs (Ray token auth off for the 127.0.0.1-only cluster, no usage stats),
waits until the application is RUNNING, prints its URL and blocks until Ctrl-C or SIGTERM. Then it
shuts down Serve and the Ray it started — every process below it, including the raylet's agents that
``ray.shutdown`` alone leaves running for about a minute — removes the temp dir it created (with
``--temp-dir DIR`` of an existing DIR: only its Ray session inside it; after a failure the logs are
kept) and exits 0. ``--address`` deploys to a running cluster instead (and leaves it up).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = "serve_configs/local.yaml"
APP_IMPORT_PATH = "svd_ray.serving.deployments:build_app"


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Ray Serve application (blocking; Ctrl-C to stop)",
                       description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None,
                   help=f"Serve config YAML (default: {DEFAULT_CONFIG} in the repository, else the packaged copy)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy to (e.g. auto or ray://host:10001); default: start a private local Ray")
    p.add_argument("--host", default=None, help="override http_options.host")
    p.add_argument("--port", type=int, default=None, help="override http_options.port")
    p.add_argument("--store", default=None, help="override the application's store URI")
    p.add_argument("--tenants", default=None, help="tenants file (sets auth.mode keys and auth.tenants_file)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the private local Ray (default: all)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265) with the local Ray")
    p.add_argument("--temp-dir", default=None,
                   help="Ray temp dir of the private local Ray (default: a fresh /tmp/svd-ray-serve-* directory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the application to be RUNNING")
    p.add_argument("--no-block", action="store_true", help="return once the application is RUNNING (with --address)")
    p.set_defaults(func=run_serve)

    k = sub.add_parser("apikey", help="make a new API key and print its sha256 for a tenants file")
    k.add_argument("--tenant", default="my-tenant", help="tenant name for the printed snippet")
    k.set_defaults(func=run_apikey)


def run_apikey(args) -> int:
    from svd_ray.serving.auth import _TENANT, hash_key, new_key

    if not _TENANT.match(args.tenant):
        raise ValueError(f"invalid tenant name {args.tenant!r}")
    key = new_key()
    print(f"key:    {key}")
    print(f"sha256: {hash_key(key)}")
    print("\n# tenants file snippet (keep the key itself secret; only the hash goes here)")
    print(f"tenants:\n  {args.tenant}:\n    keys_sha256: [\"{hash_key(key)}\"]\n    tasks: \"*\"")
    return 0


def default_config_path() -> Path:
    here = Path.cwd() / DEFAULT_CONFIG
    if here.is_file():
        return here
    repo = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    return repo


def load_serve_config(path: str | Path, *, host=None, port=None, store=None, tenants=None) -> dict:
    """Read + validate a Serve config (Serve's schema, then ``ServeSettings`` for our app's args)."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from svd_ray.serving.schemas import ServeSettings

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"serve config {str(p)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    http = raw.setdefault("http_options", {}) or {}
    raw["http_options"] = http
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    for app in raw.get("applications") or []:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        args = app.setdefault("args", {}) or {}
        app["args"] = args
        if store is not None:
            args["store"] = store
        if tenants is not None:
            args["auth"] = {**(args.get("auth") if isinstance(args.get("auth"), dict) else {}),
                            "mode": "keys", "tenants_file": str(Path(tenants).resolve())}
        try:
            ServeSettings.model_validate(args)
        except ValidationError as exc:
            e = exc.errors()[0]
            raise ValueError(f"{p}: applications[{app.get('name')}].args.{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ValueError(f"{p}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    from svd_ray.serving.config_check import serve_config_problems

    problems = serve_config_problems(raw)  # Serve ignores unknown keys: a typo would deploy the default
    if problems:
        raise ValueError(f"{p}: {problems[0]}")
    return raw


def _wait_running(names: list[str], timeout: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        states = {n: apps.get(n) for n in names}
        failed = [n for n, a in states.items() if a is not None and str(a.status).endswith("DEPLOY_FAILED")]
        if failed:
            msg = (states[failed[0]].message or "").strip().splitlines()
            tail = msg[-1] if msg else "see the Ray logs"
            raise ValueError(f"application {failed[0]!r} failed to deploy: {tail}")
        if all(a is not None and str(a.status).endswith("RUNNING") for a in states.values()):
            return
        if time.monotonic() > deadline:
            raise ValueError(f"application(s) {names} not RUNNING after {timeout:g} s (see the Ray logs)")
        time.sleep(1.0)


class _StopSignals:
    """SIGINT and SIGTERM stop the command: the first one raises ``KeyboardInterrupt`` in the main thread;
    later ones (while stopping) are only acknowledged, so the cleanup always runs to its end."""

    def __init__(self):
        self.stopping = False

    def __call__(self, signum, frame):
        if self.stopping:
            print("svd-ray serve: still stopping (Serve, then Ray)...", file=sys.stderr, flush=True)
            return
        self.stopping = True
        raise KeyboardInterrupt

    def install(self) -> None:
        # also after ``ray.init``: Ray's core worker installs a C++ failure-signal handler for SIGTERM in the
        # driver (it prints a stack dump and exits with status 15); ours must be the one that runs
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def _descendants() -> list:
    """Every process below this one now (``psutil.Process`` objects; empty if psutil is missing)."""
    try:
        import psutil

        return psutil.Process().children(recursive=True)
    except Exception:
        return []


def _reap(procs: list, grace_s: float = 5.0) -> list:
    """Wait for ``procs`` to exit; SIGTERM, then SIGKILL whatever is left. Returns the pids that survived.

    ``ray.shutdown`` stops the processes it started (gcs, raylet, dashboard, monitors) but kills the raylet
    with SIGKILL after 1 s, which orphans its agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and
    workers: they would linger until they notice (about a minute) and keep files open in the temp dir.
    """
    if not procs:
        return []
    import psutil

    def alive(ps):
        out = []
        for q in ps:
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    out.append(q)
            except psutil.NoSuchProcess:
                pass
        return out

    _, left = psutil.wait_procs(alive(procs), timeout=grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = alive(left)
        if not left:
            return []
        for q in left:
            try:
                q.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(left, timeout=grace_s)
    return [q.pid for q in alive(left)]


def _session_dir() -> str | None:
    try:
        from ray._private import worker

        node = worker._global_node
        return node.get_session_dir_path() if node is not None else None
    except Exception:
        return None


def _remove_owned(temp_dir: str | None, created: bool, session_dir: str | None) -> None:
    """Remove what this command created: the whole temp dir if it made it, else only its Ray session(s)
    (``session_<time>_<pid of this process>``, also when a signal came before ``ray.init`` returned)."""
    if not temp_dir:
        return
    if created:
        shutil.rmtree(temp_dir, ignore_errors=True)
        return
    root = Path(temp_dir)
    ours = set(root.glob(f"session_*_{os.getpid()}"))
    if session_dir and Path(session_dir).parent.resolve() == root.resolve():
        ours.add(Path(session_dir))
    latest = root / "session_latest"
    try:
        if latest.is_symlink() and Path(os.readlink(latest)).resolve() in {d.resolve() for d in ours}:
            latest.unlink()
    except OSError:
        pass
    for d in ours:
        shutil.rmtree(d, ignore_errors=True)


def run_serve(args) -> int:
    path = Path(args.config) if args.config else default_config_path()
    config = load_serve_config(path, host=args.host, port=args.port, store=args.store, tenants=args.tenants)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = args.address is None
    if args.no_block and local:
        raise ValueError("--no-block needs --address (a private local Ray stops when this command exits)")
    if local:
        from svd_ray.serving import proxy_hook

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private 127.0.0.1 cluster; the API has its own keys
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # the 400s the proxy's uvicorn answers itself (unparsable requests) in the service's JSON error shape
        os.environ.setdefault(proxy_hook.ENV_VAR, proxy_hook.IMPORT_PATH)

    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    init_kwargs = {"namespace": "serve", "log_to_driver": True}
    temp_dir, created_temp = None, False
    if local:
        temp_dir = args.temp_dir
        if temp_dir is None:  # short path: Ray's socket paths have a length limit
            temp_dir, created_temp = tempfile.mkdtemp(prefix="svd-ray-serve-", dir="/tmp"), True
        else:
            temp_dir = os.path.abspath(temp_dir)
            created_temp = not os.path.exists(temp_dir)
        init_kwargs.update(include_dashboard=args.dashboard, num_cpus=args.num_cpus, _temp_dir=temp_dir)
        if args.dashboard:
            init_kwargs["dashboard_host"] = "127.0.0.1"
    # Ctrl-C (even when started from a script that ignores SIGINT) and SIGTERM both stop cleanly
    stop = _StopSignals()
    stop.install()
    clean, started, session_dir = False, [], None
    try:
        ray.init(address=args.address, **init_kwargs)
        stop.install()
        session_dir = _session_dir() if local else None
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        )
        client.deploy_apps(schema, _blocking=False)
        names = [a.name for a in schema.applications]
        _wait_running(names, args.timeout)
        host = schema.http_options.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        prefixes = [a.route_prefix or "/" for a in schema.applications]
        print(f"svd-ray serving {', '.join(names)} on http://{shown}:{schema.http_options.port}{prefixes[0].rstrip('/')}"
              f"  (try /healthz and /v1/tasks; Ctrl-C to stop)", flush=True)
        if args.no_block:
            return 0
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("svd-ray serve: stopping...", file=sys.stderr, flush=True)
        clean = True
        return 0
    finally:
        stop.stopping = True  # from here on a signal does not interrupt the cleanup
        if local:
            started = _descendants()
        if ray.is_initialized() and (local or not args.no_block):
            try:
                serve.shutdown()
            except Exception:
                pass
        if local:
            seen = {q.pid for q in started}
            started += [q for q in _descendants() if q.pid not in seen]
        ray.shutdown()
        left = _reap(started) if local else []
        if left:
            print(f"svd-ray serve: processes {left} did not exit", file=sys.stderr)
        if clean:
            _remove_owned(temp_dir, created_temp, session_dir)
        elif temp_dir:  # keep Ray's logs after a failure
            print(f"svd-ray serve: Ray's logs are in {session_dir or temp_dir}", file=sys.stderr)
