"""Tokenise (prompt, answer) examples into right-padded causal-LM batches.

labels = input_ids on the positions that carry loss, −100 elsewhere. With ``loss_on="answer"``
(the default) only the answer's tokens carry loss; with ``"all"`` every real token does.
Over-long examples lose tokens from the *left* of the prompt, so the answer always survives.
"""
from __future__ import annotations

import torch

from svd_ray.steering import IGNORE_INDEX


def encode_example(tokenizer, prompt: str, answer: str, max_length: int, loss_on: str = "answer"):
    """→ (input_ids, labels) lists for one example."""
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    joint = tokenizer(prompt + answer, add_special_tokens=True)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        answer_ids = joint[len(prompt_ids) :]
    else:  # the answer merged with the prompt's last token: keep the prompt's tokenisation
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    answer_ids = answer_ids[:max_length - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length) :]
    ids = prompt_ids + answer_ids
    if loss_on == "answer":
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    else:
        labels = [IGNORE_INDEX] + ids[1:]
    return ids, labels


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into a batch with an attention mask."""
    longest = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: position t predicts token t+1 (last position ignored)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def batches(tokenizer, examples, batch_size: int, max_length: int, loss_on: str = "answer"):
    """Yield collated batches in order."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate([encode_example(tokenizer, e.prompt, e.answer, max_length, loss_on) for e in chunk], pad)
