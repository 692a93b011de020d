"""Single-process warm-start → calibration → bundle, plus a before/after evaluation.

The embedded path (no Ray) used by ``svd-ray demo --local`` and by tests; the Ray Train path
(``svd_ray.training.ray_train``) runs the same per-batch functions on N workers.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from svd_ray.calibration import MuAccumulator
from svd_ray.config import RunConfig
from svd_ray.decoding import DualModel
from svd_ray.models import build_peft_model, load_base_model, load_tokenizer, resolve_model
from svd_ray.training.batches import batches
from svd_ray.training.steps import calibrate, causal_lm_loss


@dataclass
class TrainMetrics:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        }


def prepare_model(cfg: RunConfig):
    """Base model + fresh adapter + tokenizer. Seeded right before the adapter is built, so the
    adapter's initialisation never depends on what resolving/loading the base model consumed."""
    ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(ref)
    base = load_base_model(ref)
    torch.manual_seed(cfg.training.seed)
    peft_model = build_peft_model(base, cfg.peft.settings())
    return peft_model, tokenizer, ref


def planned_steps(n_examples: int, cfg: RunConfig, world_size: int = 1) -> int:
    per_step = cfg.training.batch_size * world_size
    steps = math.ceil(cfg.training.epochs * n_examples / per_step)
    return min(steps, cfg.training.max_steps) if cfg.training.max_steps else max(steps, 1)


def epoch_order(examples, seed: int, epoch: int):
    order = list(examples)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def train_local(peft_model, tokenizer, examples, cfg: RunConfig, log=print) -> TrainMetrics:
    """Plain AdamW warm-start in this process (the paper: 1 epoch, lr 5e-5, batch 1)."""
    tc = cfg.training
    dual = DualModel(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr)
    total = planned_steps(len(examples), cfg)
    metrics = TrainMetrics()
    peft_model.train()
    start = time.perf_counter()
    epoch, logged_at = 0, 0
    while metrics.steps < total:
        for batch in batches(tokenizer, epoch_order(examples, tc.seed, epoch), tc.batch_size, tc.max_length, tc.loss_on):
            loss, n_tok = causal_lm_loss(dual, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics.steps += 1
            metrics.tokens += int(batch["attention_mask"].sum())
            value = float(loss.detach())
            metrics.losses.append(value)
            metrics.first_loss = value if metrics.first_loss is None else metrics.first_loss
            if metrics.steps == 1 or metrics.steps % tc.log_every == 0 or metrics.steps == total:
                # the printed loss is the mean since the last line (as on Ray Train); last_loss is that number
                elapsed = time.perf_counter() - start
                rate = metrics.tokens / elapsed if elapsed else 0.0
                eta = elapsed / metrics.steps * (total - metrics.steps)
                recent = metrics.losses[logged_at:]
                logged_at = len(metrics.losses)
                metrics.last_loss = sum(recent) / len(recent)
                log(
                    f"step {metrics.steps}/{total}  loss {metrics.last_loss:.4f}  "
                    f"{rate:.0f} tok/s  eta {eta:.0f}s"
                )
            if metrics.steps >= total:
                break
        epoch += 1
    metrics.seconds = time.perf_counter() - start
    peft_model.eval()
    return metrics


def calibrate_local(peft_model, tokenizer, examples, cfg: RunConfig, progress: str | None = "calibrating μ̄") -> MuAccumulator:
    acc = calibrate(
        DualModel(peft_model),
        tokenizer,
        examples,
        alpha=cfg.calibration.alpha,
        batch_size=cfg.calibration.batch_size,
        max_length=cfg.training.max_length,
        progress=progress,
    )
    return acc.score_candidates_(trim=cfg.calibration.trim)
