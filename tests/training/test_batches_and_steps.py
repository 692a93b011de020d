"""Tokenisation with answer-only labels, the warm-start loss, and calibration over batches."""
import math
import warnings

import pytest
import torch

from svd_ray.calibration import MuAccumulator
from svd_ray.data import TrainExample
from svd_ray.decoding import DualModel
from svd_ray.models import load_tokenizer, resolve_model
from svd_ray.steering import IGNORE_INDEX, token_mu
from svd_ray.training.batches import batches, collate, encode_example, shifted_labels
from svd_ray.training.steps import calibrate, causal_lm_loss

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("tiny-llama"))


def test_answer_only_labels(tok):
    ids, labels = encode_example(tok, "Q: 2 + 3 = ?\nA:", " 5", max_length=64)
    prompt_len = len(tok("Q: 2 + 3 = ?\nA:")["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[prompt_len:-1]) == " 5"


def test_all_token_labels_and_truncation_keeps_answer(tok):
    ids, labels = encode_example(tok, "word " * 50, " final answer", max_length=12, loss_on="all")
    assert len(ids) == 12 and labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]
    assert tok.decode(ids).endswith(" final answer" + tok.eos_token)
    with pytest.raises(ValueError, match="loss_on"):
        encode_example(tok, "a", "b", 10, loss_on="prompt")


def test_collate_right_pads():
    batch = collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert shifted_labels(batch["labels"]).tolist() == [[2, 3, IGNORE_INDEX], [IGNORE_INDEX] * 3]


def _tiny_lora():
    from svd_ray.models import build_peft_model, load_base_model
    from svd_ray.models.peft_methods import PeftSettings

    torch.manual_seed(0)
    model = build_peft_model(load_base_model(resolve_model("tiny-llama")), PeftSettings(method="lora"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_loss_matches_peft_labels_loss(tok):
    model = _tiny_lora()
    examples = [TrainExample("Q: 1 + 1 = ?\nA:", " 2"), TrainExample("Q: 4 + 4 = ?\nA:", " 8")]
    batch = next(batches(tok, examples, 2, 64))
    loss, n_tok = causal_lm_loss(DualModel(model), batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert math.isclose(float(loss), float(ref), rel_tol=1e-5)
    assert n_tok == int((batch["labels"] != IGNORE_INDEX).sum())


def test_calibration_over_batches_equals_direct_token_mu(tok):
    model = _tiny_lora()
    dual = DualModel(model)
    examples = [TrainExample(f"Q: {a} + 2 = ?\nA:", f" {a + 2}") for a in range(5)]
    acc = calibrate(dual, tok, examples, alpha=0.1, batch_size=2, max_length=64)
    mus = []
    for ex in examples:  # one unpadded example at a time: no batching, no padding
        ids, labels = encode_example(tok, ex.prompt, ex.answer, 64)
        z_phi, z_theta = dual.teacher_forced_logits(torch.tensor([ids]))
        targets = shifted_labels(torch.tensor([labels]))
        mu = token_mu(z_phi, z_theta, targets, 0.1)
        mus.append(mu[targets != IGNORE_INDEX])
    mus = torch.cat(mus).double()
    assert acc.count == mus.numel()
    assert math.isclose(acc.mean(), float(mus.mean()), rel_tol=1e-4, abs_tol=1e-6)
    assert isinstance(acc, MuAccumulator) and acc.sum_delta.shape == (len(tok),)
