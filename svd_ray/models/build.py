"""Builder process for registered models: ``python -m svd_ray.models.build NAME OUT_DIR``.

Run by :func:`svd_ray.models.registry.resolve_model` (under the entry's lock) in a fresh interpreter, so that
no caller state — an initialised ``torch.distributed`` group (where transformers' ``save_pretrained`` writes
nothing on ranks != 0), a seeded RNG, thread settings — can change what is written.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m svd_ray.models.build NAME OUT_DIR", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from svd_ray.models.registry import build_registered, model_folder_problems

    assert not dist.is_initialized()
    name, out = args[0], Path(args[1])
    build_registered(name, out)
    missing = model_folder_problems(out)
    if missing:
        print(f"build of {name} wrote an unusable folder: {'; '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
