"""Decode-time cost of SVDecode vs plain adapter decoding, side by side in one run.

Measures generated tokens per second for the steering modes
    off       plain adapter decoding (one forward per token)          — the baseline
    static    z_φ + μ·δ̄ with the calibration-mean δ̄ (one forward)
    svdecode  two cached forwards per token (adapter on / off) + δ
    1-batch   svdecode with both passes as ONE mixed-adapter batch of 2B rows (LoRA only)
at several batch sizes, for LoRA (adapter-off = ``disable_adapter``) and prompt tuning
(adapter-off = no virtual tokens), and prints a table with ratios to "off".

    python bench/decode_overhead.py                       # SmolLM2-135M weights (CPU or GPU)
    python bench/decode_overhead.py --random-init         # SmolLM2's architecture, random weights
                                                          # (timing only: for machines without the package)
Weights do not change the cost of a forward pass, so --random-init timings are representative.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def smollm2_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(cfg)


def main() -> None:
    from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate
    from svd_ray.models import build_peft_model
    from svd_ray.models.peft_methods import PeftSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="lora,prompt_tuning")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.random_init:
        base_factory = smollm2_architecture
        source = "SmolLM2-135M architecture, random init"
    else:
        from svd_ray.models import load_base_model, resolve_model

        ref = resolve_model("smollm2-135m")
        base_factory = lambda: load_base_model(ref)  # noqa: E731
        source = "SmolLM2-135M weights"
    print(f"# decode overhead — {source}; device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
          f"dtype {args.dtype}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"{'method':<15}{'batch':>6}{'off tok/s':>12}{'static tok/s':>14}{'svdecode tok/s':>16}"
          f"{'1-batch tok/s':>15}{'static/off':>12}{'svdecode/off':>14}{'1-batch/off':>13}")
    for method in args.methods.split(","):
        model = build_peft_model(base_factory(), PeftSettings(method=method)).to(device=device, dtype=dtype).eval()
        dual = DualModel(model)
        paired = DualModel(model, batched=True) if method == "lora" else None
        vocab = model.get_base_model().config.vocab_size
        mean_delta = torch.randn(vocab, device=device) * 1e-3
        modes = {
            "off": SteeringConfig("off"),
            "static": SteeringConfig("static", mu=0.5, alpha=0.1, mean_delta=mean_delta),
            "svdecode": SteeringConfig("svdecode", mu=0.5, alpha=0.1),
        }
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            ids = torch.randint(0, vocab, (bs, args.prompt_len), device=device)
            gen = GenerationConfig(max_new_tokens=args.new_tokens)
            rates = {}
            with torch.inference_mode():  # warm-up: allocator, kernels, caches
                generate(dual, ids, None, modes["svdecode"], GenerationConfig(max_new_tokens=2))
            runs = [(name, dual, steering) for name, steering in modes.items()]
            if paired is not None:  # adapter on/off as one mixed-adapter batch of 2B rows
                runs.append(("paired", paired, modes["svdecode"]))
            for name, runner, steering in runs:
                best = 0.0
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        out = generate(runner, ids, None, steering, gen)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    best = max(best, sum(len(r.token_ids) for r in out) / dt)
                rates[name] = best
            pair = rates.get("paired")
            pair_rate = "–" if pair is None else f"{pair:.1f}"
            pair_ratio = "–" if pair is None else f"{pair / rates['off']:.2f}"
            print(f"{method:<15}{bs:>6}{rates['off']:>12.1f}{rates['static']:>14.1f}{rates['svdecode']:>16.1f}"
                  f"{pair_rate:>15}{rates['static'] / rates['off']:>12.2f}"
                  f"{rates['svdecode'] / rates['off']:>14.2f}{pair_ratio:>13}")
        del model, dual, paired
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
