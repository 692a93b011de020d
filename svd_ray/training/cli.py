"""``svd-ray`` subcommands for distributed training runs.

  svd-ray train CONFIG.yaml [--set k=v ...] [--address ray://…|auto]
      warm-start + calibrate + publish with Ray Train on a local Ray (or the cluster at --address / $RAY_ADDRESS);
      progress lines (loss, tok/s, ETA) are printed as the workers report them.
  svd-ray submit train CONFIG.yaml --address http://HOST:8265 [--wait] [--set k=v] [--env K=V] [--python PY]
      the same run as a Ray job (submission id = run id); resubmitting a run id resumes it.
  svd-ray status RUN_ID --address http://HOST:8265
  svd-ray logs RUN_ID --address http://HOST:8265 [--follow]

Bad input (missing file, unknown or invalid config field, bad --set) exits 2 with one line naming it.
"""
from __future__ import annotations

import sys

from svd_ray.config import load_config


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


# ------------------------------------------------------------------------------------------ commands


def _cmd_train(args) -> int:
    from svd_ray.training.ray_train import run_ray

    cfg = load_config(args.config, args.set)
    try:
        run_ray(cfg, address=args.address)
    except RuntimeError as exc:
        print(f"svd-ray train: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _cmd_submit_train(args) -> int:
    from svd_ray.training import jobs_client

    cfg = load_config(args.config, args.set)
    run_id = jobs_client.submit_train(cfg, args.address, python=args.python, env=_env_pairs(args.env))
    if not args.wait:
        print(f"follow it with: svd-ray logs {run_id} --address {jobs_client.resolve_address(args.address)} --follow")
        return 0
    status = jobs_client.wait(jobs_client.connect(args.address), run_id, follow=True)
    print(f"run {run_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_status(args) -> int:
    from svd_ray.training import jobs_client

    for line in jobs_client.describe(jobs_client.connect(args.address), args.run_id):
        print(line)
    return 0


def _cmd_logs(args) -> int:
    from svd_ray.training import jobs_client

    client = jobs_client.connect(args.address)
    if jobs_client.job_info(client, args.run_id) is None:
        raise ValueError(f"no job with submission id {args.run_id!r} at {jobs_client.resolve_address(args.address)}")
    if args.follow:
        jobs_client.follow_logs(client, args.run_id)
    else:
        sys.stdout.write(client.get_job_logs(args.run_id))
    return 0


# ------------------------------------------------------------------------------------------ parsers


def _config_args(p) -> None:
    p.add_argument("config", help="YAML run config (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.max_steps=20 (repeatable)")


def _address_arg(p, required_help: str) -> None:
    p.add_argument("--address", default=None, help=required_help)


def register(subparsers) -> None:
    """Add ``train``, ``submit``, ``status`` and ``logs`` to the ``svd-ray`` parser."""
    jobs_address = "Ray Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)"

    p = subparsers.add_parser("train", help="warm-start + calibrate + publish with Ray Train (this machine's Ray)")
    _config_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster (ray.init address); default: $RAY_ADDRESS, else a `ray start` cluster on this "
                        "machine, else a new local Ray")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("submit", help="submit a run to a Ray cluster through the Jobs API")
    kinds = p.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("train", help="submit a training run (submission id = run id)")
    _config_args(t)
    _address_arg(t, jobs_address)
    t.add_argument("--wait", action="store_true", help="stream the job's logs and wait; exit 0 iff it succeeds")
    t.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (e.g. AWS_* for an s3:// store); repeatable")
    t.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    t.set_defaults(func=_cmd_submit_train)

    p = subparsers.add_parser("status", help="status and progress of a submitted run")
    p.add_argument("run_id")
    _address_arg(p, jobs_address)
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("logs", help="logs of a submitted run")
    p.add_argument("run_id")
    _address_arg(p, jobs_address)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func=_cmd_logs)


# ------------------------------------------------------------------------------------------ Ray Jobs entrypoint


def warmstart_main(argv: list[str] | None = None) -> int:
    """``python jobs/warmstart.py CONFIG.yaml [--set k=v]``: the training run inside a Ray job (or locally).
    Prints ``RESULT {json}`` last; exit 0 done, 2 bad config (training failures raise RuntimeError)."""
    import argparse
    import json

    from svd_ray.training.ray_train import run_ray

    parser = argparse.ArgumentParser(prog="warmstart", description="SVDecode warm-start + calibration on Ray Train")
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as exc:
        print(f"warmstart: error: {exc}", file=sys.stderr)
        return 2
    result = run_ray(cfg)
    summary = {k: result[k] for k in ("run_id", "task", "version", "mu", "estimator", "estimates", "seconds")}
    print("RESULT " + json.dumps(summary, default=str), flush=True)
    return 0
