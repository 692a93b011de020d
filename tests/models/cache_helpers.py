"""Child processes for the model-cache tests: ``python cache_helpers.py MODEL GO_FILE [RANK WORLD PORT]``.

Waits for ``GO_FILE`` (so all children ask at the same moment), optionally joins a gloo process group as a
Ray Train worker would, resolves and loads the model, runs one forward, and prints ``OK <path> <logit sum>``.
"""
import os
import sys
import time
from pathlib import Path


def main() -> int:
    model, go = sys.argv[1], Path(sys.argv[2])
    dist_args = sys.argv[3:]
    import torch

    if dist_args:
        import torch.distributed as dist

        rank, world, port = map(int, dist_args)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        assert dist.is_initialized()
    deadline = time.time() + 120
    while not go.exists():
        if time.time() > deadline:
            return 3
        time.sleep(0.01)
    from svd_ray.models import load_base_model, load_tokenizer, resolve_model

    ref = resolve_model(model)
    tok = load_tokenizer(ref)
    base = load_base_model(ref)
    with torch.no_grad():
        logits = base(**tok("Q: 2 + 3 = ?\nA:", return_tensors="pt")).logits
    print(f"OK {ref.path} {float(logits.double().sum()):.6f}", flush=True)
    if dist_args:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
