"""Packed generator vs the same samples padded to the longest: forward+backward time and padding share.

    python bench/generator.py [--layers 4 --heads 4 --head-dim 32 --samples 8 --steps 3 --device cpu]

Packed: our generator over one row holding every sample (per sample [text | target | sources], one
document each), attention through PackedAttention (SDPA per sample on CPU, compiled flex on CUDA).
Padded: diffusers' QwenImageTransformer2DModel, same weights, on a batch of B with every sample's text
padded to the longest text (masked, as the pipelines do) and its image tokens padded to the longest
image sequence (the diffusers module cannot mask image tokens, so this run is timed, not checked).
Both run in one process, interleaved step by step, and the ratio is of their median step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import QwenImageTransformer2DModel

from reasonedit.models.attention import resolve_backend
from reasonedit.models.generator import GeneratorSample, PackedQwenImageTransformer, patchify


def make_samples(n: int, channels: int, text_dim: int, seed: int, side_scale: int = 1) -> list[GeneratorSample]:
    """A mix of edit samples: latent sides (8-24) x side_scale, 0-2 source images, 16-96 text tokens."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    sides = [side * side_scale for side in (8, 12, 16, 20, 24)]
    samples = []
    for _ in range(n):
        samples.append(GeneratorSample(
            text_states=torch.randn(pick([16, 32, 48, 64, 96]), text_dim, generator=g),
            target=torch.randn(channels, pick(sides), pick(sides), generator=g),
            sources=[torch.randn(channels, pick(sides), pick(sides), generator=g) for _ in range(pick([0, 1, 1, 2]))],
            timestep=float(torch.rand((), generator=g)),
        ))
    return samples


def padded_inputs(samples: list[GeneratorSample], device: torch.device) -> dict:
    """The diffusers module's inputs for a padded batch of B."""
    text_len = max(s.text_states.shape[0] for s in samples)
    images = [torch.cat([patchify(s.target)] + [patchify(x) for x in s.sources]) for s in samples]
    image_len = max(x.shape[0] for x in images)
    text = torch.zeros(len(samples), text_len, samples[0].text_states.shape[1])
    mask = torch.zeros(len(samples), text_len, dtype=torch.long)
    tokens = torch.zeros(len(samples), image_len, images[0].shape[1])
    for i, (s, x) in enumerate(zip(samples, images)):
        text[i, :s.text_states.shape[0]] = s.text_states
        mask[i, :s.text_states.shape[0]] = 1
        tokens[i, :x.shape[0]] = x
    return dict(hidden_states=tokens.to(device), encoder_hidden_states=text.to(device),
                encoder_hidden_states_mask=mask.to(device),
                timestep=torch.tensor([float(s.timestep) for s in samples], device=device),
                # one stand-in shape of the padded length: RoPE values do not change the cost
                img_shapes=[(1, 1, image_len)] * len(samples))


def flops(lengths: list[tuple[int, int]], dim: int, layers: int) -> float:
    """Forward matmul FLOPs of the blocks: q, k, v, out and a 4x MLP per token, plus QK^T and AV per pair."""
    per_token = 2 * (4 * dim * dim + 2 * 4 * dim * dim)
    return layers * sum(n * per_token + 4 * n * ctx * dim for n, ctx in lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="packed attention: auto (flex on CUDA, sdpa on CPU), sdpa, "
                    "flex, flash")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--latent-channels", type=int, default=16)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side-scale", type=int, default=1, help="multiply the latent sides (8-24): 4 gives 32-96, real-model sizes")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.head_dim % 8:
        raise SystemExit("--head-dim must be a multiple of 8 (three even RoPE axes)")
    axes = (args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8)
    config = dict(patch_size=2, in_channels=4 * args.latent_channels, out_channels=args.latent_channels,
                  num_layers=args.layers, attention_head_dim=args.head_dim, num_attention_heads=args.heads,
                  joint_attention_dim=args.text_dim, axes_dims_rope=axes)
    torch.manual_seed(args.seed)
    padded_model = QwenImageTransformer2DModel(**config).to(device)
    packed_model = PackedQwenImageTransformer(**config)
    packed_model.load_state_dict(padded_model.state_dict(), strict=True)
    packed_model.to(device)

    samples = make_samples(args.samples, args.latent_channels, args.text_dim, args.seed, args.side_scale)
    batch = packed_model.pack(samples).to(device)
    padded = padded_inputs(samples, device)
    lengths = [t + x for t, x in zip(batch.text_lengths, torch.bincount(batch.image_sample).tolist())]
    real, longest = sum(lengths), max(lengths)
    backend = resolve_backend(args.backend, device, batch.layout)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def packed_step() -> None:
        with autocast:
            out = packed_model(batch, attention_backend=backend)
        out.float().square().mean().backward()

    def padded_step() -> None:
        with autocast:
            out = padded_model(**padded).sample
        out.float().square().mean().backward()

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in (packed_step, padded_step):  # warm-up (and compilation on CUDA)
        step()
    times = {"packed": [], "padded": []}
    for _ in range(args.steps):
        times["packed"].append(timed(packed_step))
        times["padded"].append(timed(padded_step))
    packed_s, padded_s = (statistics.median(times[k]) for k in ("packed", "padded"))

    dim = args.heads * args.head_dim
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; attention: packed {backend}, padded diffusers SDPA; bf16 autocast: {args.bf16}")
    print(f"config: layers={args.layers} heads={args.heads} head_dim={args.head_dim} (width {dim}) "
          f"latent_channels={args.latent_channels} text_dim={args.text_dim}")
    print(f"samples: {len(samples)}, tokens per sample {min(lengths)}-{longest} "
          f"(text {min(batch.text_lengths)}-{max(batch.text_lengths)}), packed row {real}, padded {len(samples)} x {longest}")
    print(f"padding share of tokens:          {1 - real / (len(samples) * longest):6.1%}")
    print(f"padding share of attention FLOPs: {1 - sum(n * n for n in lengths) / (len(samples) * longest ** 2):6.1%}")
    need = flops([(n, n) for n in lengths], dim, args.layers)
    print(f"padding share of block FLOPs:     {1 - need / flops([(longest, longest)] * len(samples), dim, args.layers):6.1%}")
    if backend == "sdpa":
        from reasonedit.models.attention import PackedAttention
        per_doc = PackedAttention(batch.layout, "sdpa").blocks is not None
        print("packed SDPA runs " + ("one call per sample (no masked pairs computed)" if per_doc else
              f"one dense-mask call: {real ** 2 / sum(n * n for n in lengths):.1f}x the needed attention pairs"))
    print(f"forward+backward per step: packed {packed_s * 1e3:8.1f} ms   padded {padded_s * 1e3:8.1f} ms   "
          f"padded/packed = {padded_s / packed_s:.2f}x  (median of {args.steps})")


if __name__ == "__main__":
    main()
