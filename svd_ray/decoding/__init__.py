"""Decoding: dual forward passes, steered generation, multiple-choice scoring."""
from svd_ray.decoding.config import GenerationConfig, SteeringConfig
from svd_ray.decoding.dual import DualModel, DualState
from svd_ray.decoding.generate import GenerationResult, encode_prompts, generate, generate_text, iter_generate
from svd_ray.decoding.hf_processor import SVDecodeLogitsProcessor
from svd_ray.decoding.scoring import (
    ChoiceLogits,
    ChoiceScores,
    SharedPrefix,
    choice_logits,
    encode_choices,
    score_choice_ids,
    score_choices,
    scores_from_logits,
)

__all__ = [
    "GenerationConfig",
    "SteeringConfig",
    "DualModel",
    "DualState",
    "GenerationResult",
    "encode_prompts",
    "generate",
    "generate_text",
    "iter_generate",
    "SVDecodeLogitsProcessor",
    "ChoiceLogits",
    "ChoiceScores",
    "SharedPrefix",
    "choice_logits",
    "scores_from_logits",
    "encode_choices",
    "score_choice_ids",
    "score_choices",
]
