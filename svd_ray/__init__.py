"""svd-ray: Steering Vector Decoding (SVDecode) as a distributed training-and-steering service on Ray.

Layers (each imports only from the ones above it):
    steering, calibration   pure torch math (δ, mask, μ*, mergeable μ̄ statistics)
    models                  base-model registry, PEFT method builders
    decoding                dual (adapter on/off) forward passes, steered generation, MC scoring
    training                Ray Train + DeepSpeed warm-start and distributed calibration
    store                   task bundles on file:// or s3://
    serving                 Ray Serve multi-tenant REST service
    eval                    benchmarks and metrics
"""
__version__ = "0.1.0"
