"""Serving: a Ray Serve application for steered generation and scoring, multiplexed by task.

    svd_ray.serving.deployments:build_app   the application builder (serve run / serve deploy / svd-ray serve)
    svd_ray.serving.app                     FastAPI routes, auth + rate limits, errors (no Ray / torch imports)
    svd_ray.serving.pool                    per-replica LRU of loaded tasks; one batching engine per base model
    svd_ray.serving.handlers                request → engine request → response (tokenised once)
    svd_ray.serving.errors                  the replica's errors (HTTP status, type, field)
    svd_ray.serving.schemas                 request models, settings, the JSON error format
    svd_ray.serving.auth                    tenants, hashed API keys, token buckets
    svd_ray.serving.metrics                 Prometheus metrics of the ingress
    svd_ray.serving.cli                     ``svd-ray serve`` and ``svd-ray apikey``

See docs/SERVING.md. Importing this package imports nothing heavy.
"""
