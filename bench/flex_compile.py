"""Compiled FlexAttention over a stream of packed rows of varying length (CUDA).

Packed rows change length every step. This prints, for `torch.compile(flex_attention)` with
dynamic=False and dynamic=True, the time of each call over a stream of distinct lengths (the
first calls include compilation) and the steady-state time per call, so the choice in
`reasonedit.models.attention` rests on a measurement.

    python bench/flex_compile.py [--lengths 12] [--heads 8 --head-dim 64]
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def stream(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(200, 1200) for _ in range(rng.randint(2, 6))] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, default=12, help="distinct packed rows in the stream")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/flex_compile.py needs a CUDA device")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from reasonedit.models.attention import FLEX_BLOCK, Span, TokenLayout

    rows = stream(args.lengths, 0)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {len(rows)} rows of "
          f"{min(sum(r) for r in rows)}-{max(sum(r) for r in rows)} tokens, H={args.heads}, D={args.head_dim}, bf16")
    for dynamic in (False, True):
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=dynamic)
        times = []
        for lengths in rows + rows:  # the second pass sees only lengths it has compiled
            layout = TokenLayout.from_spans([Span(i, n, True) for i, n in enumerate(lengths)], "cuda")
            layout = layout.padded(FLEX_BLOCK)
            L = len(layout)
            mask = create_block_mask(layout.mask_mod(), None, None, L, L, device="cuda")
            q, k, v = (torch.randn(1, args.heads, L, args.head_dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            torch.cuda.synchronize()
            started = time.perf_counter()
            fn(q, k, v, block_mask=mask).sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        first, second = times[:len(rows)], times[len(rows):]
        print(f"dynamic={dynamic!s:<5}  first pass: total {sum(first):7.2f}s (max call {max(first):6.2f}s)   "
              f"second pass: median {sorted(second)[len(second) // 2] * 1e3:7.2f} ms per fwd+bwd")


if __name__ == "__main__":
    main()
