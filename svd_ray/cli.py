"""``svd-ray`` command line. Each area registers its own subcommands:

  demo                      quickstart: warm-start → calibrate → publish → steer, before/after (svd_ray.demo)
  train / submit / status / logs   Ray Train runs and Ray Jobs               (svd_ray.training.cli)
  tasks list|show|verify|promote|delete|publish   the bundle store          (svd_ray.store.cli)
  serve / apikey            the Ray Serve application; API-key helper       (svd_ray.serving.cli)
  eval                      benchmark evaluation                             (svd_ray.eval.cli)

Errors in user input exit with status 2 and one clear line on stderr (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# (module, function adding its subparsers, runner): the function sets ``func`` (args → exit code)
# on its parsers, or returns its parser and names a runner to set as ``func``.
_AREAS = [
    ("svd_ray.training.cli", "register", None),
    ("svd_ray.store.cli", "add_tasks_parser", "run_tasks"),
    ("svd_ray.serving.cli", "register", None),
    ("svd_ray.eval.cli", "register", None),
]


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the quickstart end to end on the embedded default")
    p.add_argument("--config", help="YAML run config (default: the built-in demo config)")
    p.add_argument("--local", action="store_true", help="train in this process instead of a Ray Train job")
    p.add_argument("--store", help="store URI (default: $SVD_RAY_STORE or ~/.local/share/svd-ray/store)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from pathlib import Path

    from svd_ray import demo
    from svd_ray.config import load_run_config, parse_overrides

    overrides = parse_overrides(args.set)
    if args.store:
        overrides["store"] = args.store
    default = Path(__file__).with_name("demo.yaml")
    if args.config is None and "run_id" not in overrides:
        # Ray Train resumes a run id it has seen: each demo gets a fresh run (published as task demo-addition)
        overrides["run_id"] = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    cfg = load_run_config(args.config, overrides, str(default))
    if args.local:
        demo.run_local(cfg)
    else:
        demo.run_ray(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    for module, fn, runner in _AREAS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):  # area not present
                continue
            raise
        area_parser = getattr(mod, fn)(sub)
        if runner is not None:
            area_parser.set_defaults(func=getattr(mod, runner))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # pydantic's ValidationError is a ValueError: report which field is wrong, no traceback
        print(f"svd-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
