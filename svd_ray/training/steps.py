"""Warm-start loss and calibration statistics for one batch: plain torch, no Ray/DeepSpeed.

The Ray Train worker loop and the single-process path both call these, so the distributed
run and the local run compute exactly the same thing.
"""
from __future__ import annotations

import torch

from svd_ray.calibration import MuAccumulator
from svd_ray.mu_validation import MuValidation, fold_of
from svd_ray.decoding.dual import DualModel
from svd_ray.steering import IGNORE_INDEX
from svd_ray.training.batches import batches, shifted_labels


def causal_lm_loss(dual: DualModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over labelled positions, through the same forward the decoder uses.

    Returns (loss, number of labelled tokens). Gradients flow to the adapter parameters.
    """
    z_phi, _ = dual.teacher_forced_logits(batch["input_ids"], batch["attention_mask"], with_base=False)
    targets = shifted_labels(batch["labels"])
    n_tokens = int((targets != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        z_phi.float().reshape(-1, z_phi.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return loss, n_tokens


@torch.no_grad()
def accumulate_calibration(
    dual: DualModel,
    batch: dict[str, torch.Tensor],
    acc: MuAccumulator,
    alpha: float,
) -> None:
    """Teacher-force a batch with the adapter on and off and add every labelled token's μ* to ``acc``."""
    z_phi, z_theta = dual.teacher_forced_logits(batch["input_ids"], batch["attention_mask"], with_base=True)
    folds = None
    if acc.validation is not None:  # an item's fold comes from its tokens: the same on every worker
        folds = torch.tensor([fold_of(ids[m.bool()]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])])
    acc.add_logits(z_phi, z_theta, shifted_labels(batch["labels"]), alpha, folds=folds)


def calibrate(dual: DualModel, tokenizer, examples, alpha: float, batch_size: int, max_length: int,
              progress: str | None = None, progress_write=None) -> MuAccumulator:
    """μ* statistics (and mean δ) over ``examples``' answer tokens. ``progress``: label of a progress line
    (with ETA), written by ``progress_write`` (default stderr); ``None`` for none."""
    from svd_ray.progress import Progress

    acc = MuAccumulator(vocab_size=dual.core.config.vocab_size, validation=MuValidation())
    was_training = dual.peft_model.training
    dual.peft_model.eval()  # no dropout while measuring
    meter = Progress(-(-len(examples) // batch_size), progress or "", unit="batch", enabled=progress is not None,
                     write=progress_write)
    try:
        for batch in batches(tokenizer, examples, batch_size, max_length, loss_on="answer"):
            batch = {k: v.to(dual.device) for k, v in batch.items()}
            accumulate_calibration(dual, batch, acc, alpha)
            meter.update()
    finally:
        meter.close()
        dual.peft_model.train(was_training)
    return acc
