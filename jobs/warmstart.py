"""Ray Jobs entrypoint: SVDecode warm-start + distributed μ̄ calibration + publish, as one Ray Train run.

    python jobs/warmstart.py CONFIG.yaml [--set training.max_steps=20 ...]

Inside a Ray job ``ray.init()`` connects to the job's cluster (``RAY_ADDRESS``); run directly, it starts a
local Ray. ``svd-ray submit train CONFIG.yaml --address http://HOST:8265`` ships this file and the resolved
config to the cluster and runs it with submission id = run id. The last line printed is
``RESULT {json}`` (run id, task, version, μ̄ and its estimates). Exit status: 0 done, 1 training failed,
2 bad config.
"""
import sys

from svd_ray.training.cli import warmstart_main as main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # training failed after retries: one line, not a traceback
        print(f"warmstart: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
