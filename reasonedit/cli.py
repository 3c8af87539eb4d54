"""The `reasonedit` command.

Exit codes: 0 done; 1 bad input or a failed run (the message names the key, file or field);
2 a usage error; 3 the part asked for is not built yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from .eval import cli as eval_cli
from .inference import cli as edit_cli
from .progress import ProgressLine
from .serve import cli as serve_cli

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_BUILT = 1, 2, 3

# subcommands that live in their own module: `add_arguments(parser)` and `run(args) -> int`
COMMAND_MODULES = {
    "edit": (edit_cli, "edit an image with think -> edit -> reflect"),
    "serve": (serve_cli, "serve the generator and the loop over HTTP"),
    "eval": (eval_cli, "score a model on shapes, GEdit, ImgEdit, KRIS or RISE"),
}


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. world.grid=5 data.n=50 model=qwen-image-edit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonedit", description=(
        "ReasonEdit: train and run reasoning-enhanced image editing models (think -> edit -> reflect)."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = sub.add_parser("data", help="make, check and preview datasets",
                          description="Make, check and preview datasets of the four sample kinds.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    synth = dsub.add_parser("synth", help="write synthetic shapes-world shards", description=(
        "Write webdataset shards of thinking pairs, reflection samples, edit pairs and text-to-image "
        "samples from the synthetic shapes world, deterministically from the seed. --n records of each "
        "kind in each split. The world and data settings come from --config and key=value overrides."))
    synth.add_argument("--out", required=True, type=Path, help="output directory (created; must be empty)")
    synth.add_argument("--n", type=int, help="records of each kind in each split (data.n)")
    synth.add_argument("--seed", type=int, help="generation seed (data.seed)")
    synth.add_argument("--splits", help="comma-separated splits among train,val,test (data.splits)")
    synth.add_argument("--kinds", help="comma-separated kinds among thinking_pair,reflection,edit_pair,"
                       "text_to_image (data.kinds)")
    synth.add_argument("--shard-size", type=int, help="records per shard (data.shard_size)")
    synth.add_argument("--config", type=Path, help="an experiment YAML to take world and data settings from")
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_overrides(synth)

    verify = dsub.add_parser("verify", help="score a dataset with the exact oracle", description=(
        "Read every image of a synthesized dataset back from its pixels and print how often the oracle "
        "agrees with what was generated, and the records that could not be read, per split/kind and reason, "
        "counted as the training loader counts them; exits 1 on any disagreement or skipped record."))
    verify.add_argument("path", type=Path)
    verify.add_argument("--split", help="only this split")

    sheet = dsub.add_parser("sheet", help="write a PNG contact sheet of a dataset")
    sheet.add_argument("path", type=Path)
    sheet.add_argument("--out", type=Path, required=True, help="PNG to write")
    sheet.add_argument("--rows", type=int, default=3, help="records of each kind")
    sheet.add_argument("--split", default="train")

    imp = dsub.add_parser("import", help="import JSONL, sharegpt, EditThinker or caption folders into shards",
                          description="Import data in a format users already have into a dataset of shards "
                                      "(same layout as `data synth`). Malformed rows are errors naming the file and "
                                      "line (or, with --skip-unmapped, skipped and listed in OUT/import_report.jsonl); "
                                      "nothing is written unless the whole import succeeds. Formats and their "
                                      "mappings: docs/importers.md.")
    imp.add_argument("--format", required=True, help="jsonl | sharegpt | editthinker-rl | captions")
    imp.add_argument("--out", required=True, type=Path, help="output dataset directory")
    imp.add_argument("--split", default=None, help="split to file rows under (default: train, or a row's own split)")
    imp.add_argument("--shard-size", type=int, default=1000)
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    imp.add_argument("--image-root", type=Path, help="folder relative image paths are read from "
                     "(default: each input file's folder)")
    imp.add_argument("--skip-unmapped", action="store_true", help="skip rows that cannot be mapped to a record "
                     "(malformed, or of no record kind) instead of stopping; they are counted by reason in the "
                     "manifest and listed (file:line, reason) in OUT/import_report.jsonl")
    imp.add_argument("inputs", nargs="+", type=Path, help="input files or folders")
    traj = dsub.add_parser("trajectories", help="run the loop over a dataset and turn its trajectories into "
                           "SFT shards and RL prompts", description=(
        "Run think -> edit -> reflect on each edit pair and thinking pair of --data, score every round with the exact "
        "oracle (shapes data) or a judge (--judge-url), and record it in OUT/trajectories.jsonl with its images; then "
        "filter: high-variance trajectories (score spread > --rl-spread) become RL prompts (OUT/rl_prompts.jsonl), the "
        "stable ones are kept when a later round scores at least as well as the first, truncated after their best "
        "round, unrolled into reflection samples and thinking pairs, balanced, and written to OUT/sft (a dataset "
        "`reasonedit train --data` reads). A rerun resumes, skipping every trajectory already recorded. "
        "--shard i/n (n > 1) only collects; run once more without --shard to collect what is left and filter."))
    traj.add_argument("--data", required=True, type=Path, help="a dataset (`reasonedit data synth` or import)")
    traj.add_argument("--out", required=True, type=Path, help="output folder (resumed when it holds a run)")
    traj.add_argument("--split", default="train", help="the split to read (default train)")
    traj.add_argument("--kinds", default="edit_pair,thinking_pair", help="record kinds to run on, comma-separated")
    traj.add_argument("--limit", type=int, help="only the first N records of each kind")
    traj.add_argument("--editor", required=True, help="'shapes' (the exact shapes editor), an HTTP editing service "
                      "URL, or a ReasonEditModel folder (its generator edits)")
    traj.add_argument("--editor-error-rate", type=float, default=0.0, metavar="P",
                      help="--editor shapes: the share of edits it gets wrong on purpose (default 0)")
    traj.add_argument("--thinker", help="an OpenAI-compatible chat base URL (with --thinker-model naming its model), "
                      "or a ReasonEditModel folder whose reasoner thinks")
    traj.add_argument("--thinker-model", help="with --thinker URL: the chat model's name; without --thinker: a "
                      "ReasonEditModel folder whose reasoner thinks")
    traj.add_argument("--thinker-key", help="the thinker's API key (or OPENAI_API_KEY)")
    traj.add_argument("--rounds", type=int, default=3, help="at most this many edit rounds (default 3)")
    traj.add_argument("--seed", type=int, default=0, help="base seed (each record's also depends on its key)")
    traj.add_argument("--batch-size", type=int, default=4, help="records run through the loop at once")
    traj.add_argument("--steps", type=int, default=28, help="sampling steps per edit (model and HTTP editors)")
    traj.add_argument("--device", default=None, help="where model folders run (default: cuda when available)")
    traj.add_argument("--shard", default="0/1", help="i/n: this process takes records i, i+n, ... and only collects "
                      "when n > 1")
    traj.add_argument("--judge-url", help="score rounds with this OpenAI-compatible vision judge instead of the "
                      "oracle (needed for data without shapes scenes)")
    traj.add_argument("--judge-model", help="the judge's model name")
    traj.add_argument("--judge-key", help="the judge's API key (better: REASONEDIT_JUDGE_API_KEY)")
    traj.add_argument("--rl-spread", type=float, default=5.0, help="a trajectory whose round scores spread more "
                      "than this (max - min, 0-10) is an RL prompt (default 5)")
    traj.add_argument("--success-score", type=float, default=10.0, help="a round scoring at least this is right "
                      "(default 10, the oracle's exact match)")
    traj.add_argument("--balance", default="1:1:1", metavar="S:R:F", help="Success:Reflection:Failed ratio of the "
                      "reflection samples (default 1:1:1); 'none' keeps every one")
    traj.add_argument("--shard-size", type=int, default=1000, help="records per SFT shard")

    config = sub.add_parser("config", help="print the resolved config of an experiment", description=(
        "Merge an experiment YAML with key=value overrides, validate it and print the result."))
    config.add_argument("config", type=Path)
    _add_overrides(config)

    run = sub.add_parser("run", help="run an experiment's steps", description=(
        "Run the steps of an experiment config (data, models, batches, preview, stage1-3, edit, eval), "
        "saving the resolved config and every output under output_dir."))
    run.add_argument("config", type=Path)
    _add_overrides(run)

    from . import sweep as sweep_module
    sweep_module.add_arguments(sub.add_parser("sweep", help="expand a sweep config into runs; run them here or "
                                              "write their cluster launch lines", description=(
        "Expand a sweep YAML (configs/sweep/NAME.yaml: an experiment, a grid and/or a list of runs) into runs with "
        "their own names, output directories and resolved configs; run them here one after another (re-running "
        "skips finished runs) or, with --emit, write one torchrun/deepspeed launch line per run.")))
    train = sub.add_parser("train", help="train one stage (0 pretrain on tiny presets, 1 reasoning, 2 editing, "
                           "3 unified, rl GRPO)", description=(
        "Train one stage of an experiment, alone, under torchrun (DDP or FSDP2 via train.parallel) or under "
        "the deepspeed launcher (ZeRO-2/3 with --deepspeed JSON). "
        "By default stage 1 starts from OUTPUT_DIR/pretrain/model, else vae/model, else model, and stage N "
        "from OUTPUT_DIR/stage<N-1>/model; it reads "
        "OUTPUT_DIR/data and writes OUTPUT_DIR/stage<N>/ (checkpoints/, model/); an existing checkpoint of "
        "the same starting model is resumed. Stage 0 (pretrain, tiny presets only) starts from "
        "OUTPUT_DIR/vae/model, else OUTPUT_DIR/model, and writes OUTPUT_DIR/pretrain/. Stage rl (GRPO on the "
        "reasoner's LoRA, its rollouts rewarded by rl.editor) starts from OUTPUT_DIR/stage3/model, else "
        "stage1/model, and writes OUTPUT_DIR/rl/ (with curves.png)."))
    train.add_argument("--config", required=True, type=Path, help="the experiment YAML")
    train.add_argument("--stage", required=True, choices=("0", "1", "2", "3", "rl"),
                       help="0 pretrain, 1 reasoning, 2 editing, 3 unified, rl: GRPO on the reasoner (from "
                       "OUTPUT_DIR/stage3/model, else stage1/model; rewarded by rl.editor; writes OUTPUT_DIR/rl/)")
    train.add_argument("--start", type=Path, help="model folder to start from (default: the previous stage's)")
    train.add_argument("--data", type=Path, help="dataset folder (default: the stage's stageN.data, else "
                       "OUTPUT_DIR/data); --stage rl also takes a `data trajectories` folder or its rl_prompts.jsonl "
                       "(as rl.prompts)")
    train.add_argument("--out", type=Path, help="stage folder to write (default: OUTPUT_DIR/stage<N>)")
    train.add_argument("--deepspeed", type=Path, metavar="JSON", help="train with DeepSpeed ZeRO-2/3 from this JSON "
                       "(launch/deepspeed/zero2.json, zero3.json); same as train.parallel=deepspeed "
                       "train.deepspeed_config=JSON")
    _add_overrides(train)
    plan = sub.add_parser("plan", help="per-GPU memory of each stage by part, before launching", description=(
        "Count what a stage holds on each GPU (parameters, gradients, optimizer state, EMA, an activation estimate "
        "at the stage's token budgets) from the experiment's models built on the meta device, for a parallel "
        "layout and GPU count, and say whether it fits the GPU's memory. Nothing is loaded or launched."))
    plan.add_argument("config", type=Path, help="the experiment YAML (or the name of a packaged one)")
    plan.add_argument("--stage", type=int, choices=(0, 1, 2, 3), action="append",
                      help="the stage(s) to plan (default: 1, 2 and 3)")
    plan.add_argument("--gpus", type=int, help="GPUs (default: each stage's stageN.gpus, the paper's counts in "
                      "paper.yaml)")
    plan.add_argument("--parallel", default="fsdp2", choices=("ddp", "fsdp2", "zero2", "zero3"))
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    _add_overrides(plan)

    for name, (module, what) in COMMAND_MODULES.items():
        module.add_arguments(sub.add_parser(name, help=what, description=module.__doc__))
    return parser


def _cmd_synth(args: argparse.Namespace) -> int:
    from .config import load_config
    from reasonedit.shapes.world import ShapesWorld
    from reasonedit.shapes.synth import synthesize

    overrides = list(args.overrides)
    for flag, key in (("n", "n"), ("seed", "seed"), ("shard_size", "shard_size")):
        if getattr(args, flag) is not None:
            overrides.append(f"data.{key}={getattr(args, flag)}")
    for flag in ("splits", "kinds"):
        if getattr(args, flag) is not None:
            overrides.append(f"data.{flag}=[{getattr(args, flag)}]")
    _, cfg = load_config(args.config, overrides)
    if args.config is not None and args.config.is_file():  # else a packaged config's name
        from .data.shards import check_apart
        check_apart(args.out, [("--config", args.config)])
    started = time.perf_counter()
    print(f"writing {cfg.data.n} records x {len(cfg.data.kinds)} kinds x {len(cfg.data.splits)} splits "
          f"to {args.out}", file=sys.stderr)
    manifest = synthesize(args.out, cfg.data, ShapesWorld(cfg.world), overwrite=args.overwrite, progress=ProgressLine())
    n_shards = sum(len(v) for s in manifest["shards"].values() for v in s.values())
    print(f"wrote {args.out} ({n_shards} shards) in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .data.importers import FORMATS, import_dataset

    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r} is not one of {sorted(FORMATS)}")
    kwargs = {"shard_size": args.shard_size, "overwrite": args.overwrite, "skip_unmapped": args.skip_unmapped,
              "progress": ProgressLine()}
    if args.image_root is not None:
        kwargs["image_root"] = str(args.image_root)
    if args.split is not None:
        kwargs["split"] = args.split
    manifest = import_dataset(args.format, [str(p) for p in args.inputs], args.out, **kwargs)
    counts = ", ".join(f"{split}/{kind}: {n}" for split, kinds in manifest["counts"].items() for kind, n in kinds.items())
    print(f"imported {counts} into {args.out}")
    skipped = manifest["skipped"]
    if skipped["count"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped["reasons"].items())
        print(f"skipped {skipped['count']} row(s) ({reasons}); each is listed in {args.out / skipped['report']}")
    return 0


def _trajectory_agents(args: argparse.Namespace, world):
    """(editor, thinker) as `eval` builds them: --editor shapes|URL|model folder, --thinker URL|model folder."""
    from .eval.runner import build_agents
    from .models.model import CONFIG_FILE

    editor_url, model_dir = args.editor, None
    if args.editor != "shapes" and "://" not in args.editor:
        model_dir, editor_url = Path(args.editor), None
        if not (model_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--editor {args.editor}: neither 'shapes', a URL, nor a model folder "
                                    f"(no {CONFIG_FILE})")
    thinker_url, thinker_dir = args.thinker, None
    if args.thinker is not None and "://" not in args.thinker:
        thinker_url, thinker_dir = None, Path(args.thinker)
    elif args.thinker is None and args.thinker_model is not None:
        thinker_dir = Path(args.thinker_model)
    if thinker_dir is not None and not (thinker_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--thinker {thinker_dir}: not a model folder (no {CONFIG_FILE}); for a chat "
                                "model give --thinker URL --thinker-model NAME")
    if thinker_url is None and thinker_dir is None and model_dir is None:
        raise ValueError("--thinker: give a chat URL (with --thinker-model) or a model folder; the loop reflects")
    return build_agents(model_dir, editor_url, thinker_url, ["think_reflect"], thinker_model=args.thinker_model,
                        thinker_key=args.thinker_key, thinker_dir=thinker_dir, world=world,
                        editor_error_rate=args.editor_error_rate, editor_seed=args.seed, device=args.device)


def _shapes_world(data: Path):
    """The shapes world a `data synth` dataset was made in (its manifest's `world`), else None."""
    import json

    from .eval.benchmarks.shapes import world_from_manifest

    manifest = data / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--data {data}: no dataset (no manifest.json)")
    doc = json.loads(manifest.read_text())
    return world_from_manifest(doc, str(manifest)) if isinstance(doc.get("world"), dict) else None


def _oracle_scorer(world):
    from reasonedit.shapes.oracle import Oracle
    from reasonedit.shapes.world import Scene

    oracle = Oracle(world)

    def score(source, edited):
        report = oracle.score(edited, Scene.from_dict(source.meta["target_scene"]),
                              Scene.from_dict(source.meta["source_scene"]) if "source_scene" in source.meta else None)
        return float(report.score), "; ".join(report.reasons(world.config.grid)) or "matches the target"
    return score


def _cmd_trajectories(args: argparse.Namespace) -> int:
    from .data.trajectories import FilterSettings, filter_trajectories, merge, parse_ratio, write_outputs
    from .eval.runner import Shard
    from .eval.trajectories import (JudgeScorer, check_settings, collect, image_loader, part_files,
                                    read_sources)

    shard = Shard.parse(args.shard)
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: must be at least 1")
    if not 0.0 <= args.editor_error_rate <= 1.0:
        raise ValueError(f"--editor-error-rate {args.editor_error_rate}: must lie in [0, 1]")
    ratio = None if args.balance == "none" else parse_ratio(args.balance)
    settings = FilterSettings(rl_spread=args.rl_spread, success_score=args.success_score,
                              ratio=ratio or (1, 1, 1), seed=args.seed, balance=ratio is not None)
    from .data.shards import check_apart
    check_apart(args.out, [("--data", args.data)])
    world = _shapes_world(args.data)
    if args.editor == "shapes" and world is None:
        raise ValueError(f"--editor shapes edits shapes-world renders; --data {args.data} is not a `data synth` "
                         "dataset (its manifest has no 'world')")
    sources = read_sources(args.data, args.split, [k.strip() for k in args.kinds.split(",") if k.strip()], args.limit)
    judge = None
    if args.judge_url is not None:
        from .eval.judge import Judge, JudgeSettings
        judge = Judge(JudgeSettings.resolve(args.judge_url, args.judge_model, args.judge_key),
                      cache=args.out / "judge_cache.jsonl")
        scorer = JudgeScorer(judge)
    elif world is not None:
        unscored = [s.key for s in sources if "target_scene" not in s.meta]
        if unscored:
            raise ValueError(f"--data {args.data}: record {unscored[0]} (and {len(unscored) - 1} more) has no "
                             "meta.target_scene for the oracle; score with a judge (--judge-url)")
        scorer = _oracle_scorer(world)
    else:
        raise ValueError(f"--data {args.data}: no shapes world to score with the oracle; give --judge-url")
    check_settings(args.out, {"data": str(args.data.resolve()), "split": args.split, "kinds": args.kinds,
                              "limit": args.limit, "editor": args.editor, "editor_error_rate": args.editor_error_rate,
                              "thinker": args.thinker, "thinker_model": args.thinker_model, "rounds": args.rounds,
                              "seed": args.seed, "steps": args.steps, "judge": args.judge_url})
    editor, thinker = _trajectory_agents(args, world)
    started = time.perf_counter()
    try:
        stats = collect(sources, editor, thinker, scorer, args.out, rounds=args.rounds, seed=args.seed, shard=shard,
                        batch_size=args.batch_size, steps=args.steps, progress=ProgressLine())
    finally:
        if judge is not None:
            judge.close()
    print(f"shard {shard}: {stats.collected} trajectories collected, {stats.done_before} already there, of "
          f"{stats.total} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if shard.count > 1:
        print(f"shard {shard}: done; once every shard is, run the same command without --shard to filter")
        return 0
    trajectories = merge(part_files(args.out))
    missing = {s.key for s in sources} - {t.key for t in trajectories}
    if missing:
        raise ValueError(f"{len(missing)} records have no trajectory after collecting (e.g. {sorted(missing)[0]})")
    result = filter_trajectories(trajectories, settings)
    counts = write_outputs(args.out, result, image_loader(args.out), shard_size=args.shard_size, split=args.split,
                           settings=settings)
    print(f"{len(trajectories)} trajectories: {counts['rl_prompts']} RL prompts, {counts['kept']} of "
          f"{counts['stable']} stable kept; reflection samples {counts['balanced']} (unrolled {counts['unrolled']}), "
          f"{counts['thinking_pairs']} thinking pairs")
    print(f"sft: {args.out / 'sft'}\nrl prompts: {args.out / 'rl_prompts.jsonl'}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from reasonedit.shapes.verify import verify_dataset

    agreement = verify_dataset(args.path, args.split)
    print(agreement.table())
    if not agreement.all_agree:
        for name, t in agreement.rows():
            if t.failures:
                print(f"disagreements in '{name}': {', '.join(t.failures)}", file=sys.stderr)
        for line in agreement.unreadable:
            print(f"shard not read whole: {line}", file=sys.stderr)
        for line in agreement.skips:
            print(f"skipped record: {line}", file=sys.stderr)
        for line in agreement.unchecked:
            print(f"record not checked: {line}", file=sys.stderr)
        skipped = agreement.records.total_skipped
        if skipped or agreement.records.total_uncounted:
            print(f"{skipped} records skipped" + (f" and {agreement.records.total_uncounted} shard(s) of unknown size"
                                                  if agreement.records.total_uncounted else "")
                  + " (by split/kind and reason in the table above)", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiment import run_experiment

    from .experiment import launch_rank

    tree, cfg = load_config(args.config, args.overrides)
    rank, world_size = launch_rank()
    if rank == 0:
        print(f"experiment {cfg.name}: steps {', '.join(cfg.steps)} -> {cfg.output_dir}" +
              (f" ({world_size} ranks: the training steps on all, the others on rank 0)" if world_size > 1 else ""))
    result = run_experiment(tree, cfg, progress=ProgressLine())
    if rank != 0:  # the main rank prints the run's summary
        return 0
    for step, seconds in result.timings.items():
        print(f"  {step:<8} {seconds:6.1f}s")
    for name, path in result.artifacts.items():
        print(f"  {name}: {path}")
    for name, res in result.stages.items():
        if res.data is not None:
            print(f"  {name} records: {res.data.summary()}")
    if result.batches:
        print(f"{'packed stream':<14} {'records':>8} {'segments':>9} {'batches':>8} {'budget':>7} "
              f"{'utilisation':>12} {'padding if padded':>18} {'oversize':>9} {'corrupt':>8}")
        for name, r in result.batches.items():
            print(f"{name:<14} {r['records']:>8} {r['segments']:>9} {r['batches']:>8} {r['budget']:>7} "
                  f"{r['utilisation']:>12.3f} {r['padded_share']:>18.1%} {r['oversize']:>9} {r['skipped_records']:>8}")
    if result.agreement is not None:
        print(result.agreement.table())
        if not result.agreement.all_agree:
            print("the oracle disagrees with the generated data", file=sys.stderr)
            return EXIT_ERROR
    if result.reading:
        print(f"pretrain reads the world ({result.reading['scenes']} held-out {result.reading['split']} scenes): " +
              ", ".join(f"{k} {100 * v:.0f} %" for k, v in result.reading["accuracy"].items()))
    if result.validation:
        print(f"{'validation (val split, fixed noise)':<36} {'start':>8} {'end':>8} {'change':>8}")
        for stage, report in result.validation.items():
            if report is None:
                continue
            for term, before in report["before"].items():
                after = report["after"][term]
                print(f"{stage + ' ' + term:<36} {before:>8.4f} {after:>8.4f} {after - before:>+8.4f}")
    if result.edits:
        print(f"think -> edit -> reflect with {result.edits['model']} (edit step):")
        for r in result.edits["samples"]:
            score = "-" if r["best_score"] is None else f"{r['best_score']:g}"
            verdict = "right" if r["oracle_success"] else f"wrong, score {r['oracle_score']:g}"
            print(f"  {r['category']:<9} {r['instruction'][:48]!r:<50} {r['rounds']} round(s), the reasoner says "
                  f"{r['stopped']} (score {score}), the oracle: {verdict}; {r['parse_errors']} parse error(s) -> "
                  f"{r['trace']}/index.html")
    print(f"resolved config: {result.output_dir / 'config.yaml'}")
    if result.ablation:
        for t in result.ablation["tables"]:
            print(f"shapes ablation, editor {t['editor']}, thinker {t['thinker']} (exact oracle; "
                  f"{t['parse_errors']} thinker replies did not parse and counted as Failed):")
            print(t["table"])
            print(f"  report: {t['paths'].get('markdown', t['paths'])}")
    if result.figures:
        from .eval.heldout import figures_table
        print(f"what {result.figures['model']} learned (test split, exact oracle; {result.figures['samples']}):")
        print(figures_table(result.figures["figures"]))
        if "curves" in result.artifacts:
            print(f"  learning curves: {result.artifacts['curves']}")
    if result.rl_gain:
        from .eval.rl_gain import gain_table
        g = result.rl_gain
        print(f"what the rl stage added ({g['n']} test samples of each kind, the shapes editor wrong on "
              f"{100 * g['error_rate']:.0f} % of its edits; {g['seconds']:.0f} s):")
        print(gain_table(g))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models.model import CONFIG_FILE
    from .training import TrainingStopped, train_stage

    overrides = list(args.overrides)
    if args.deepspeed is not None:
        if not args.deepspeed.is_file():
            raise FileNotFoundError(f"--deepspeed {args.deepspeed}: no such DeepSpeed JSON")
        overrides += ["train.parallel=deepspeed", f"train.deepspeed_config={args.deepspeed}"]
    _, cfg = load_config(args.config, overrides)
    out_dir = Path(cfg.output_dir)
    n = int(args.stage) if args.stage.isdigit() else args.stage
    from .experiment import stage_name
    name = stage_name(n)
    reward = None
    if n == 0:
        from .experiment import pretrain_start
        start = args.start or pretrain_start(out_dir)
    elif n == "rl":
        from .experiment import rl_reward, rl_start
        start = args.start or rl_start(out_dir)
        reward = rl_reward(cfg, start)
    else:
        from .experiment import initial_model
        start = args.start or (initial_model(out_dir) if n == 1 else out_dir / f"stage{n - 1}" / "model")
    from .models.diffusers_folder import is_diffusers_folder
    if not (start / CONFIG_FILE).is_file() and not is_diffusers_folder(start):
        before = ("train stage 3 or 1" if n == "rl" else f"train stage {n - 1}" if n > 1 else
                  "run the models step")
        raise FileNotFoundError(f"--start {start}: not a model folder (no reasonedit.json) nor a diffusers folder "
                                f"(no model_index.json); {before} first or pass --start DIR")
    if n == "rl" and args.data is not None and not (args.data / "manifest.json").is_file() and (
            (args.data.is_file() and args.data.suffix == ".jsonl") or (args.data / "rl_prompts.jsonl").is_file()):
        # a `reasonedit data trajectories` folder (or its rl_prompts.jsonl): its prompts, as rl.prompts
        if cfg.rl.prompts and Path(cfg.rl.prompts).resolve() != args.data.resolve():
            raise ValueError(f"--data {args.data} and rl.prompts={cfg.rl.prompts}: two sets of prompts; give one")
        cfg.rl.prompts, cfg.rl.data, args.data = str(args.data), [], None  # --data wins over rl.data, as for a dataset
    if args.data is not None:
        if n == "rl" and cfg.rl.prompts:
            raise ValueError(f"--data {args.data} and rl.prompts={cfg.rl.prompts}: the prompts take the dataset's "
                             "place; give one of the two")
        if not (args.data / "manifest.json").is_file():
            raise FileNotFoundError(f"--data {args.data}: no dataset (no manifest.json); run `reasonedit data synth` "
                                    "or pass --data")
        data = args.data
    else:  # the stage's own datasets (stageN.data), else OUTPUT_DIR/data
        from .experiment import stage_sources
        data = stage_sources(cfg, n, out_dir)
        if not data[0][0].joinpath("manifest.json").is_file():
            raise FileNotFoundError(f"--data {data[0][0]}: no dataset (no manifest.json); run `reasonedit data synth`, "
                                    f"pass --data, or name the stage's datasets ({name}.data=[{{path: DIR}}])")
    try:
        res = train_stage(cfg, n, start, data, args.out or out_dir / name, reward=reward)
    except TrainingStopped as e:
        print(f"reasonedit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if reward is not None:
            reward.close()  # the judge client's connections (rl.reward=judge)
    if res.history:
        first, last = res.history[0], res.history[-1]
        terms = [k for k in first if k not in ("lr",)]
        print(f"{name}: {res.steps} steps in {res.seconds:.1f}s; " +
              ", ".join(f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in terms))
    if res.data is not None:  # this rank's loader: with train.data_streams, its own share of the records
        print(f"{name}: records read by the loader, skipped records counted once each by reason:")
        print(res.data.table())
    if res.interrupted:
        print(f"{name}: stopped by SIGTERM at step {res.steps}; run the same command to resume")
    else:
        print(f"model: {res.model}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.plan import plans

    _, cfg = load_config(args.config, args.overrides)
    fits = True
    for plan in plans(cfg, args.stage or [1, 2, 3], args.gpus, args.parallel):
        print(plan.table(args.gpu_memory) + "\n")
        fits &= plan.total <= args.gpu_memory * 1024 ** 3
    return 0 if fits else EXIT_ERROR


def _close_process_group() -> None:
    """Tear down the process group a command under torchrun or deepspeed joined, before the interpreter exits:
    left to the exit, gloo's threads are sometimes destroyed still running, and the rank aborts ("terminate called
    without an active exception") after its work is done, failing the launch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # httpx says every request it sends at INFO: a judge, thinker or editor run would drown in it
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from .config import ConfigError
    from .data.samples import SchemaError
    from reasonedit.shapes.synth import SynthError
    from .errors import NotBuiltError, RemoteServiceError
    from .publish import OutputError

    try:
        if args.command in COMMAND_MODULES:
            return COMMAND_MODULES[args.command][0].run(args)
        if args.command == "data":
            if args.data_command == "synth":
                return _cmd_synth(args)
            if args.data_command == "verify":
                return _cmd_verify(args)
            if args.data_command == "sheet":
                from .data.preview import dataset_sheet
                print(dataset_sheet(args.path, args.out, args.rows, args.split))
                return 0
            if args.data_command == "import":
                return _cmd_import(args)
            if args.data_command == "trajectories":
                return _cmd_trajectories(args)
        if args.command == "config":
            from omegaconf import OmegaConf

            from .config import load_config
            tree, _ = load_config(args.config, args.overrides)
            print(OmegaConf.to_yaml(tree, resolve=True), end="")
            return 0
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "sweep":
            from . import sweep as sweep_module
            return sweep_module.run(args)
    except NotBuiltError as e:
        print(f"reasonedit: {e}", file=sys.stderr)
        return EXIT_NOT_BUILT
    except (ConfigError, SynthError, SchemaError, FileNotFoundError, ValueError, RemoteServiceError,
            OutputError) as e:
        print(f"reasonedit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        _close_process_group()
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
