"""Where the tiny generator's copy fails, and what training on high-noise timesteps does to it.

    OMP_NUM_THREADS=1 python bench/generator_timesteps.py --run DIR [--config configs/experiment/shapes_demo.yaml]
                     [--logit-means 0,2] [--steps 600] [--edits 200]

DIR is a run that holds `data/` and `vae/model/` (`reasonedit run CONFIG output_dir=DIR 'steps=[data,models,vae]'`).
For each `flow_matching.logit_mean` (the centre of the logit-normal timestep draw; larger trains more on
high noise) the bench trains stage 2 from DIR/vae/model with the real trainer (the config's stage-2 recipe,
`--steps`, warm-up min(steps / 20, 30)), then reads with the exact oracle, on the first `--edits` held-out test edits:

- the 12-step sampler's output (`generator_figures`, guidance 1): unchanged cells kept, concrete edits right;
- the generator's one-step prediction of the clean target, x0 = x_t - t * v, decoded, at t = 0.5, 0.9 and 1.0
  (fixed noise): at t = 1 the noisy target holds nothing, so what it reads is what the model takes from the
  source and the instruction alone.

Last it prints the ratio of unchanged cells kept by the sampler, last logit_mean over first. About 4 minutes per
value on one thread at 600 steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def train(config: str, run: Path, out: Path, steps: int, logit_mean: float) -> float:
    from generator_copy import train as train_stage2  # bench/ is this script's folder on sys.path

    return train_stage2(config, run, run / "vae" / "model", out, steps, "",
                        (f"stage2.warmup_steps={min(steps // 20, 30)}", f"flow_matching.logit_mean={logit_mean}"))


def figures(model_dir: Path, run: Path, config: str, edits: int) -> dict[str, float]:
    from reasonedit.config import load_config
    from reasonedit.eval.heldout import HeldOut, copy_figures, generator_figures
    from reasonedit.inference.builtin import GeneratorEditor
    from reasonedit.models.generator import GeneratorSample
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.models.vae import to_uint8
    from reasonedit.shapes.oracle import Oracle
    from reasonedit.shapes.world import Scene, ShapesWorld

    world = ShapesWorld(load_config(config, [f"output_dir={run}"])[1].world)
    oracle = Oracle(world)
    pairs = HeldOut.load(run / "data", split="test", n=edits).edits[:edits]
    model = ReasonEditModel.from_pretrained(model_dir).eval()

    def cells_kept(images) -> float:
        right = kept = 0
        for pair, image in zip(pairs, images):
            source, target = Scene.from_dict(pair.meta["source_scene"]), Scene.from_dict(pair.meta["target_scene"])
            r, k, _ = copy_figures(oracle.read(image).scene, source, target)
            right, kept = right + r, kept + k
        return right / max(1, kept)

    out = {}
    with torch.no_grad():
        sampled = generator_figures(GeneratorEditor(model), pairs, world, steps=12, guidance=1.0, seed=0)
        out.update(copy_cells=sampled["copy_cells"], concrete=sampled["concrete"], score=sampled["score"])
        sources = model.encode_images([p.source for p in pairs])
        targets = model.encode_images([p.target for p in pairs])
        states = model.encode_condition([[p.source] for p in pairs], [p.instruction for p in pairs])
        for t in (0.5, 0.9, 1.0):
            noise = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(i)) for i, x0 in enumerate(targets)]
            noisy = [(1 - t) * x0 + t * n for x0, n in zip(targets, noise)]
            velocity = model.predict([GeneratorSample(text_states=s, target=x, sources=[z], timestep=t)
                                      for s, x, z in zip(states, noisy, sources)], sources_at_t0=True)
            x0 = torch.stack([x - t * v for x, v in zip(noisy, velocity)])
            out[f"x0_cells_t{t}"] = cells_kept(to_uint8(model.vae.decode(x0)).numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder holding data/ and vae/model/")
    parser.add_argument("--config", default="configs/experiment/shapes_demo.yaml")
    parser.add_argument("--logit-means", default="0,2", help="flow_matching.logit_mean values, comma-separated")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--edits", type=int, default=200)
    args = parser.parse_args()
    if not (args.run / "vae" / "model" / "reasonedit.json").is_file() or not (args.run / "data" / "manifest.json").is_file():
        sys.exit(f"--run {args.run}: needs data/ and vae/model/; make them with `reasonedit run {args.config} "
                 f"output_dir={args.run} 'steps=[data,models,vae]'`")
    means = [float(v) for v in args.logit_means.split(",")]
    kept = []
    for mean in means:
        out = args.run / "bench_generator_timesteps" / f"logit_mean_{mean}"
        seconds = train(args.config, args.run, out, args.steps, mean)
        f = figures(out / "model", args.run, args.config, args.edits)
        kept.append(f["copy_cells"])
        print(f"logit_mean {mean}: stage 2 {args.steps} steps in {seconds:.0f}s | sampler: unchanged cells kept "
              f"{f['copy_cells']:.1%}, concrete {f['concrete']:.1%}, score {f['score']:.2f} | one-step x0, unchanged "
              f"cells kept at t=0.5 {f['x0_cells_t0.5']:.1%}, t=0.9 {f['x0_cells_t0.9']:.1%}, "
              f"t=1 {f['x0_cells_t1.0']:.1%}", flush=True)
    if len(kept) > 1:
        print(f"unchanged cells kept by the sampler, logit_mean {means[-1]} / {means[0]}: "
              f"{kept[-1] / max(kept[0], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
