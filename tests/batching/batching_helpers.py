"""Tiny random-init models for the batching engine tests: one base, several tasks' adapters on it."""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svd_ray.models.peft_methods import PeftSettings, build_peft_model

VOCAB = 61


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def task_adapter(base, method: str, seed: int, num_virtual: int = 4):
    """A PEFT model of ``method`` on a module tree sharing ``base``'s weights (the base stays pristine)."""
    tree = copy.deepcopy(base, {id(p): p for p in base.parameters()})
    torch.manual_seed(1000 + seed)
    pm = build_peft_model(tree, PeftSettings(method=method, num_virtual_tokens=num_virtual, encoder_hidden_size=16))
    with torch.no_grad():  # move the adapter away from its identity initialisation
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    return pm.eval()
