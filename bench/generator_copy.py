"""How fast the tiny generator learns to copy its source, with and without `generator.qk_position_init`.

    OMP_NUM_THREADS=1 python bench/generator_copy.py --run DIR [--config configs/experiment/shapes_demo.yaml]
                     [--inits 0,1.5] [--steps 600] [--mix edit_pair=0.5,text_to_image=0.5] [--edits 48]

DIR is a run that holds `data/` and `vae/model/` (`reasonedit run CONFIG output_dir=DIR 'steps=[data,models,vae]'`,
about 4 minutes for the demo). For each init value the bench takes DIR/vae/model with its generator rebuilt
by `build_generator` at that `qk_position_init` (same seed, so only the q/k biases differ), trains stage 2 on it
with the real trainer (`reasonedit train --stage 2`, the config's stage-2 recipe, `--steps` and `--mix` applied),
and scores the result on the first `--edits` held-out test edits with the exact oracle
(`reasonedit.eval.heldout.generator_figures`, 12 sampling steps, guidance 1): edits that keep every unchanged
cell, unchanged cells kept, concrete edits exactly right, mean oracle score against returning the source. It
prints, per init, the share of attention each target token starts with on its own place (first block), then
the trained figures, its flow-matching error on those edits with their own instructions, another edit's and a
blank prompt (whether the generator reads what the instruction says), and last the ratio of unchanged cells
kept. About 3 minutes per init on one thread.

Measured on the demo world (`--run` made from configs/experiment/shapes_demo.yaml, one thread, another run on
the other core), 600 steps: at the start a target token puts 4 % of its image attention on its own place at
init 0 and 73 % at 1.5. Stage 2 on edit pairs alone (the demo's mix), 200 held-out edits: unchanged cells kept
15.3 % at init 0 and 24.2 % at 1.5 (1.58x), mean oracle score 1.73 and 2.41 (returning the source: 6.58),
concrete edits 1.0 % both; flow-matching error with each edit's own instruction / the next edit's / a blank prompt
0.185 / 0.241 / 0.220 at init 0 and 0.164 / 0.271 / 0.199 at 1.5 (the generator reads what the instruction
says). `--inits 1,2.5`: 25.5 % and 22.7 % (scores 2.29, 2.21; 86 % of the first block's attention on the own
place at 2.5): any positive init helps about as much. With `--mix edit_pair=0.85,text_to_image=0.15`, 48
edits: 10.7 % both; the mix matters more than the init (the old 50/50 mix, scored the same way on 200 edits: 5.3 % and 7.8 %).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def with_init(start: Path, dest: Path, value: float) -> Path:
    """`start` saved to `dest` with its generator rebuilt at qk_position_init=value (the build's seed 0)."""
    from reasonedit.models.model import ReasonEditModel, build_generator

    model = ReasonEditModel.from_pretrained(start)
    config = copy.deepcopy(model.config)
    config.generator.qk_position_init = value
    model.generator = build_generator(config, 0)
    model.generator.attention_backend = config.attention_backend
    model.config = config
    model.save_pretrained(dest)
    return dest


def own_place_attention(model_dir: Path) -> float:
    """`reasonedit.models.generator.own_place_attention` of the generator saved under model_dir."""
    from reasonedit.models.generator import PackedQwenImageTransformer, own_place_attention as share

    return share(PackedQwenImageTransformer.from_pretrained(model_dir / "generator").eval())


def train(config: str, run: Path, start: Path, out: Path, steps: int, mix: str, overrides: tuple[str, ...] = ()) -> float:
    """`reasonedit train --stage 2` from `start` on DIR/data for `steps` (and `mix`, `overrides`); its wall time."""
    command = [sys.executable, "-m", "reasonedit", "train", "--config", config, "--stage", "2", "--start", str(start),
               "--data", str(run / "data"), "--out", str(out), f"output_dir={run}", f"stage2.steps={steps}",
               "train.checkpoint_every=0", *overrides]
    if mix:
        command.append("stage2.mix={" + ", ".join(f"{k}: {v}" for k, v in
                                                  (kv.split("=") for kv in mix.split(","))) + "}")
    began = time.perf_counter()
    res = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"stage 2 failed ({' '.join(command)}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - began


def score(model_dir: Path, run: Path, config: str, edits: int) -> dict[str, float]:
    from reasonedit.config import load_config
    from reasonedit.eval.heldout import HeldOut, generator_figures
    from reasonedit.inference.builtin import GeneratorEditor
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.shapes.world import ShapesWorld

    cfg = load_config(config, [f"output_dir={run}"])[1]
    heldout = HeldOut.load(run / "data", split="test", n=edits)
    model = ReasonEditModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return generator_figures(GeneratorEditor(model), heldout.edits[:edits], ShapesWorld(cfg.world), steps=12,
                                 guidance=1.0, seed=0)


def text_use(model_dir: Path, run: Path, edits: int) -> dict[str, float]:
    """Flow-matching MSE on held-out edits (timesteps 0.3, 0.6, 0.9, fixed noise) with each edit's instruction, with
    the next edit's instruction (the same kind of text, the wrong content) and with a blank prompt: whether the
    generator's prediction reads what the instruction says, or only that there is one."""
    from reasonedit.eval.heldout import HeldOut
    from reasonedit.models.generator import GeneratorSample
    from reasonedit.models.model import ReasonEditModel

    model = ReasonEditModel.from_pretrained(model_dir).eval()
    pairs = HeldOut.load(run / "data", split="test", n=edits).edits[:edits]
    with torch.no_grad():
        sources = model.encode_images([p.source for p in pairs])
        targets = model.encode_images([p.target for p in pairs])
        own = [p.instruction for p in pairs]
        prompts = {"own": own, "another": own[1:] + own[:1], "blank": [" "] * len(pairs)}
        errors = {}
        for name, texts in prompts.items():
            states = model.encode_condition([[p.source] for p in pairs], texts)
            total = 0.0
            for t in (0.3, 0.6, 0.9):
                samples, velocity = [], []
                for i, (z, x0) in enumerate(zip(sources, targets)):
                    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
                    samples.append(GeneratorSample(text_states=states[i], target=(1 - t) * x0 + t * noise,
                                                   sources=[z], timestep=t))
                    velocity.append(noise - x0)
                predicted = model.predict(samples, sources_at_t0=True)
                total += sum(float((p - v).pow(2).mean()) for p, v in zip(predicted, velocity)) / len(pairs)
            errors[name] = total / 3
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder holding data/ and vae/model/")
    parser.add_argument("--config", default="configs/experiment/shapes_demo.yaml")
    parser.add_argument("--inits", default="0,1.5", help="qk_position_init values, comma-separated")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--mix", default="", help="stage 2's record mix as kind=weight,...; default: the config's")
    parser.add_argument("--edits", type=int, default=48)
    args = parser.parse_args()
    start = args.run / "vae" / "model"
    if not (start / "reasonedit.json").is_file() or not (args.run / "data" / "manifest.json").is_file():
        sys.exit(f"--run {args.run}: needs data/ and vae/model/; make them with `reasonedit run {args.config} "
                 f"output_dir={args.run} 'steps=[data,models,vae]'`")
    work = args.run / "bench_generator_copy"
    rows = []
    for value in (float(v) for v in args.inits.split(",")):
        tag = f"init_{value:g}"
        model = with_init(start, work / tag / "start", value)
        print(f"qk_position_init {value:g}: at the start each target token puts {own_place_attention(model):.0%} of "
              "its image attention (first block) on its own place in target and source", flush=True)
        seconds = train(args.config, args.run, model, work / tag / "stage2", args.steps, args.mix)
        figures = score(work / tag / "stage2" / "model", args.run, args.config, args.edits)
        rows.append((value, seconds, figures))
        text = text_use(work / tag / "stage2" / "model", args.run, args.edits)
        print(f"qk_position_init {value:g}: flow-matching MSE on the held-out edits with their own instructions "
              f"{text['own']:.4f}, with the next edit's {text['another']:.4f}, with a blank prompt "
              f"{text['blank']:.4f}", flush=True)
        print(f"qk_position_init {value:g}: stage 2 {args.steps} steps in {seconds:.0f} s | edits keeping every "
              f"unchanged cell {figures['copy']:.1%} | unchanged cells kept {figures['copy_cells']:.1%} | concrete "
              f"{figures['concrete']:.1%} | mean score {figures['score']:.2f} (source {figures['source_score']:.2f})",
              flush=True)
    if len(rows) > 1 and rows[0][2]["copy_cells"] > 0:
        base = rows[0][2]["copy_cells"]
        print("unchanged cells kept, against init " + f"{rows[0][0]:g}: " +
              ", ".join(f"{v:g}: {f['copy_cells'] / base:.2f}x" for v, _, f in rows[1:]))


if __name__ == "__main__":
    main()
