"""The task bundle: what training produces and serving loads (a folder; the store moves it).

    adapter/                 PEFT ``save_pretrained`` output (adapter_config.json + weights)
    steering.safetensors     mean_delta (vocab,), μ* histogram (hist_count, hist_sum)
    steering.json            α, chosen estimator and μ̄, every estimator's value, μ* summary
    run.json                 run config, training metrics, data splits, provenance

The same fields (minus the tensors) go into the store manifest's ``meta`` so that a bundle can
be listed and checked without downloading it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from svd_ray.calibration import ESTIMATORS, MuAccumulator

BUNDLE_FORMAT = 1


@dataclass
class SteeringData:
    """The one steering record of a task, from calibration through the bundle to serving and evaluation.

    ``default_mode`` is how the task is served when a request does not say: ``svdecode``, or ``off``
    (the plain adapter) when the validated estimator found that no μ helps on held-out calibration data;
    ``validation`` holds that decision and its reason."""

    alpha: float
    estimator: str
    mu: float
    estimates: dict
    summary: dict
    mean_delta: torch.Tensor | None
    validation: dict | None = None
    default_mode: str = "svdecode"

    def to_json(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "alpha": self.alpha,
            "estimator": self.estimator,
            "mu": self.mu,
            "estimates": self.estimates,
            "mu_star_summary": self.summary,
            "validation": self.validation,
            "default_mode": self.default_mode,
        }

    def meta(self) -> dict:
        """The manifest's ``mu`` section: derived from this record only (one source of truth)."""
        out = {"value": self.mu, "estimator": self.estimator, "estimates": self.estimates, "mu_star": self.summary,
               "default_mode": self.default_mode}
        if self.validation is not None:
            out["validation"] = {k: self.validation[k] for k in ("steer", "reason", "cv_gain_per_token",
                                                                 "cv_gain_se", "grid_best_mu", "fallback")
                                 if k in self.validation}
            out["validation"]["candidates"] = self.validation.get("candidates", {})
        return out


def steering_from_accumulator(acc: MuAccumulator, alpha: float, estimator: str, trim: float = 0.1) -> SteeringData:
    """Every μ̄ estimator from the calibration statistics; ``estimator`` picks the default."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}")
    names = [n for n in ESTIMATORS if n != "validated" or acc.validation is not None]
    if estimator not in names:
        raise ValueError("the validated estimator needs calibration with validation (svd_ray.training.steps.calibrate)")
    if acc.validation is not None and not acc.validation.cand_names and acc.validation.candidate_note is None:
        acc.score_candidates_(trim=trim)  # a local accumulator whose candidates were not scored yet
    estimates = {name: acc.estimate(name, trim) for name in names}
    mean_delta = acc.mean_delta() if acc.sum_delta is not None else None
    validation = acc.validation.choose() if acc.validation is not None else None
    # validated and not steering: the plain adapter ("off"), or μ = 0 inside the mask ("svdecode" at μ 0)
    default_mode = ("off" if estimator == "validated" and not validation["steer"]
                    and validation.get("fallback", "off") == "off" else "svdecode")
    return SteeringData(alpha, estimator, estimates[estimator], estimates, acc.summary(), mean_delta, validation,
                        default_mode)


def write_bundle(out_dir: str | Path, peft_model, steering: SteeringData, run_info: dict, acc: MuAccumulator) -> Path:
    """Write a bundle folder (the caller publishes it through the store)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out / "adapter"))
    tensors = {"hist_count": acc.hist_count.contiguous(), "hist_sum": acc.hist_sum.contiguous()}
    if steering.mean_delta is not None:
        tensors["mean_delta"] = steering.mean_delta.contiguous()
    save_file(tensors, str(out / "steering.safetensors"))
    (out / "steering.json").write_text(json.dumps(steering.to_json(), indent=2, sort_keys=True))
    (out / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True, default=str))
    return out


def read_steering(bundle_dir: str | Path) -> SteeringData:
    from safetensors.torch import load_file

    root = Path(bundle_dir)
    meta = json.loads((root / "steering.json").read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{root}: unsupported bundle format {meta.get('format')!r} (expected {BUNDLE_FORMAT})")
    tensors = load_file(str(root / "steering.safetensors"))
    return SteeringData(
        alpha=float(meta["alpha"]),
        estimator=meta["estimator"],
        mu=float(meta["mu"]),
        estimates=meta["estimates"],
        summary=meta["mu_star_summary"],
        mean_delta=tensors.get("mean_delta"),
        validation=meta.get("validation"),
        default_mode=meta.get("default_mode", "svdecode"),
    )


def read_run_info(bundle_dir: str | Path) -> dict:
    return json.loads((Path(bundle_dir) / "run.json").read_text())
