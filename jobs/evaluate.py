"""Ray Jobs entrypoint for evaluation: ``python jobs/evaluate.py CONFIG.yaml [--set key=value ...]``.

Inside a Ray job ``ray.init()`` connects to the cluster through RAY_ADDRESS, and the scoring
shards run as Ray tasks on it.
"""
import sys

from svd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
