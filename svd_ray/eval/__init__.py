"""Benchmarks and metrics. ``metrics`` (MC and CI, pure numpy) and ``truthfulqa_gen``
(BLEU/ROUGE, needs sacrebleu + rouge-score) are imported as submodules."""
