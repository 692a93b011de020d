"""``svd-ray eval CONFIG.yaml``: train/calibrate (or reuse) and evaluate, write JSON + markdown + PNG."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate PEFT vs PEFT+SVDecode on benchmarks (see docs/RESULTS.md)")
    p.add_argument("config", help="evaluation YAML (e.g. jobs/configs/reproduction.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--render-only", action="store_true",
                   help="re-render markdown/PNG from output_dir/results.json (e.g. after editing notes_file)")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from svd_ray.config import parse_overrides
    from svd_ray.eval.config import EvalConfig
    from svd_ray.eval.runner import run_evaluation

    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file {args.config!r} does not exist")
    cfg = EvalConfig.from_yaml(args.config, parse_overrides(args.set))
    if args.render_only:
        from svd_ray.eval.runner import render_reports

        render_reports(cfg)
        return 0
    command = "svd-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None
    run_evaluation(cfg, command=command)
    return 0
