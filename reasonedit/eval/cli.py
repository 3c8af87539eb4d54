"""Score a model on shapes, GEdit-Bench, ImgEdit-Bench, KRIS-Bench or RISE-Bench.

Generate and score:  reasonedit eval --bench B --data DIR --model MODEL_DIR --modes base,think,think_reflect
External services:   reasonedit eval --bench B --data DIR --editor URL[,URL] [--thinker URL --thinker-model M]
Exact shapes editor: reasonedit eval --bench shapes --editor shapes --thinker-model MODEL_DIR [--editor-error-rate P]
Score images only:   reasonedit eval --bench B --data DIR --images IMAGES_DIR [--model-name NAME]
Images go to OUT/images/<mode>/ in the benchmark's official output layout; reports (results.json,
report.md, PNG charts) to OUT. Re-running skips every image already there and every judge reply
already in OUT/judge_cache.jsonl. Judged benchmarks need --judge-url/--judge-model (or
REASONEDIT_JUDGE_BASE_URL/_MODEL/_API_KEY, falling back to OPENAI_*).
A sample whose source or edited image cannot be read, or that the judge gave no reply for, is a failed
sample named in the report; the exit status is 1 when the judge was asked and never answered.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from reasonedit.config import LOOPS
from reasonedit.config.model import RUN_DTYPES
from reasonedit.inference.editor_presets import add_preset_arguments, get_preset

from .images import DEFAULT_MAX_PIXELS
from .runner import (MODES, SHAPES_EDITOR, GenerationSettings, ModeRun, Shard, agent_labels, build_agents,
                     default_model_name)

RESIZE_POLICY = "none"  # edits keep the source size; the judge gets the image files as written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bench", required=True, help="shapes | gedit | imgedit | kris | rise")
    p.add_argument("--data", type=Path, help="the benchmark's local copy in its official layout "
                   "(shapes: a `reasonedit data synth` dataset, or leave out to make held-out scenes)")
    g = p.add_argument_group("what makes the images")
    g.add_argument("--model", type=Path, help="a ReasonEditModel folder (editor and thinker)")
    g.add_argument("--modes", default="base", help=f"comma-separated among {','.join(MODES)} (default base)")
    g.add_argument("--editor", help="HTTP editing service URL(s), comma-separated (round robin); or 'shapes': the "
                   "exact shapes-world editor (--bench shapes), which executes concrete instructions on the scene "
                   "and leaves the source unchanged when it cannot parse one")
    add_preset_arguments(g, "--editor URL")
    g.add_argument("--editor-error-rate", type=float, default=0.0, metavar="P",
                   help="--editor shapes: the share of edits it gets wrong on purpose, with one of the reflection "
                        "error types (default 0: exact); which ones follows from --seed")
    g.add_argument("--thinker", help="OpenAI-compatible chat base URL used as the thinker (e.g. http://host:8000/v1)")
    g.add_argument("--thinker-model", help="with --thinker: the chat model's name (or OPENAI_MODEL); without: a "
                   "ReasonEditModel folder whose reasoner is the thinker (its generator is not loaded)")
    g.add_argument("--thinker-key", help="the thinker's API key (or OPENAI_API_KEY)")
    g.add_argument("--thinker-contract", default="reasonedit", help="reasonedit | editthinker")
    g.add_argument("--thinker-prompt", type=Path, metavar="FILE", help="--thinker-contract editthinker: the prompt "
                   "file to send, e.g. EditThinker's inference/prompt_template.txt (EditThinker-8B was trained on "
                   "it), sent as its client sends it; default our own wording")
    from reasonedit.inference.cli import MAX_NEW_TOKENS_HELP, max_new_tokens_arg
    g.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=128,
                   help="the model's reasoner as the thinker: " + MAX_NEW_TOKENS_HELP)
    g.add_argument("--images", type=Path, help="score images generated elsewhere, laid out as the benchmark's "
                   "official scripts expect (no generation)")
    g.add_argument("--model-name", help="the model's folder name in the output layout (default: from --model, "
                   "'editor' for --editor, the only folder under --images)")
    g = p.add_argument_group("generation")
    g.add_argument("--rounds", type=int, default=3, help="think_reflect: at most this many edit rounds")
    g.add_argument("--loop", default="reasonedit", choices=LOOPS, help="think_reflect's rules: reasonedit (the "
                   "best-scored round; a reflect after every edit; seed + round - 1) or editthinker (as EditThinker's "
                   "client: the last round; none after the last edit; one seed; with --thinker-contract "
                   "editthinker, replies read as its client reads them)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps per edit (default 28, or the "
                   "--editor-preset's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4, or the "
                   "--editor-preset's)")
    g.add_argument("--seed", type=int, default=0, help="base seed (each sample's seed also depends on its key)")
    g.add_argument("--batch-size", type=int, default=4, help="samples edited at once")
    g.add_argument("--device", default=None, help="where --model runs: cpu, cuda or cuda:N (default: cuda when "
                   "available)")
    g.add_argument("--dtype", default="auto", choices=RUN_DTYPES,
                   help="what --model runs in (default auto: bfloat16 on CUDA, as saved on a CPU)")
    g.add_argument("--shard", default="0/1", help="i/n: this process takes samples i, i+n, ... (generation only "
                   "when n > 1; score with one run without --shard once every shard is done)")
    g.add_argument("--limit", type=int, help="only the first N samples of each category (task type, kind)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="a source or edited image with more pixels is a failed sample, never decoded (a "
                        f"decompression bomb); default {DEFAULT_MAX_PIXELS:,}")
    g = p.add_argument_group("judge (gedit, imgedit, kris, rise)")
    g.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    g.add_argument("--judge-model", help="e.g. gpt-4.1")
    g.add_argument("--judge-key", help="API key (better: REASONEDIT_JUDGE_API_KEY)")
    g.add_argument("--judge-temperature", type=float, default=0.0)
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    g.add_argument("--judge-retries", type=int, default=4, help="retries after a timeout, 429 or 5xx")
    g.add_argument("--concurrency", type=int, default=8, help="judge (and HTTP editor) requests in flight at once")
    g.add_argument("--judge-max-reply-bytes", type=int, default=1 << 20, metavar="N",
                   help="a judge reply body longer than this is a failed call for its sample, read no further "
                        "(default 1 MiB)")
    g.add_argument("--judge-cache", type=Path, help="reply cache (default OUT/judge_cache.jsonl)")
    g.add_argument("--judge-prompts", type=Path, help="JSON {query name: template} replacing our judge prompt "
                   "text, e.g. with the official scripts' wording (see eval/README.md)")
    g.add_argument("--image-cache", type=Path, help="gedit: where the hub snapshot's embedded images are written "
                   "(default DATA/.reasonedit-images)")
    g.add_argument("--kris-ext", choices=("jpg", "png"), help="kris: the edited images' extension: jpg (default; JPEG "
                   "quality 95, the only one the official KRIS-Bench scripts open) or png (lossless, what "
                   "EditThinker's copy of those scripts opens)")
    p.add_argument("--out", type=Path, help="output folder (default runs/eval/<bench>)")


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes {text!r}: choose from {','.join(MODES)}")
    return list(dict.fromkeys(modes))


def _bench(args: argparse.Namespace):
    from .benchmarks import get_benchmark

    options: dict = {}
    if args.bench == "shapes" and args.data is None and args.limit is not None:
        options["n"] = args.limit  # make only the scenes the run will use
    if args.image_cache is not None:
        if args.bench != "gedit":
            raise ValueError(f"--image-cache: only gedit reads embedded images, not {args.bench}")
        options["image_cache"] = args.image_cache
    if getattr(args, "kris_ext", None) is not None:
        if args.bench != "kris":
            raise ValueError(f"--kris-ext: only kris has a choice of output extension, not {args.bench}")
        options["ext"] = args.kris_ext
    bench = get_benchmark(args.bench, **options)
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels}: must be at least 1")
    bench.max_pixels = args.max_pixels  # before load: gedit checks the images it extracts
    if args.judge_prompts is not None:
        if not bench.uses_judge:
            raise ValueError(f"--judge-prompts: {args.bench} is scored by its oracle, not a judge")
        bench.use_judge_prompts(args.judge_prompts)
    return bench.load(args.data)


def _thinker_dir(args: argparse.Namespace) -> Optional[Path]:
    """--thinker-model names a model folder when no --thinker URL is given."""
    if args.thinker is not None or args.thinker_model is None:
        return None
    from ..models.model import CONFIG_FILE

    path = Path(args.thinker_model)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--thinker-model {path}: without --thinker URL it names a model folder whose "
                                "reasoner thinks, and this is not one (no reasonedit.json); for a chat model, "
                                "give --thinker URL as well")
    return path


def _shapes_world(args: argparse.Namespace, bench):
    """The world the shapes editor works in: the benchmark's (its dataset manifest's)."""
    if args.editor != SHAPES_EDITOR:
        return None
    if bench.name != "shapes":
        raise ValueError(f"--editor shapes edits renders of the shapes world; use it with --bench shapes, "
                         f"not {bench.name}")
    if not 0.0 <= args.editor_error_rate <= 1.0:
        raise ValueError(f"--editor-error-rate {args.editor_error_rate}: must lie in [0, 1]")
    return bench.world


def _judge(args: argparse.Namespace, bench, out: Path):
    if not bench.uses_judge:
        return None
    from .judge import Judge, JudgeSettings

    settings = JudgeSettings.resolve(args.judge_url, args.judge_model, args.judge_key,
                                     temperature=args.judge_temperature, timeout=args.judge_timeout,
                                     retries=args.judge_retries, concurrency=args.concurrency,
                                     max_reply_bytes=args.judge_max_reply_bytes)
    return Judge(settings, cache=args.judge_cache or out / "judge_cache.jsonl")


def _images_model_name(images: Path, given: Optional[str]) -> str:
    if given:
        return given
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    names = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) != 1:
        raise ValueError(f"--images {images}: holds {len(names)} model folders ({', '.join(names) or 'none'}); "
                         "name the one to score with --model-name")
    return names[0]


def print_reports(bench_name: str, reports: dict, stamp) -> None:
    from .report import ablation_table, comparison_table, section_table

    print(stamp.line())
    if bench_name == "shapes":
        print(ablation_table(reports))
        return
    first = next(iter(reports.values()))
    for section in first["sections"]:
        if len(reports) > 1:
            print(comparison_table(reports, section))
        else:
            print(f"{section}\n\n{section_table(first, section)}")
        print()


def run(args: argparse.Namespace) -> int:
    from reasonedit.progress import ProgressLine

    from .report import Stamp, write_reports
    from .runner import score

    from reasonedit.inference.cli import read_thinker_prompt

    shard = Shard.parse(args.shard)
    prompt = read_thinker_prompt(args)  # before the benchmark loads: a bad file is named at once
    bench, limit = _bench(args), args.limit
    out = args.out or Path("runs") / "eval" / bench.name
    progress = ProgressLine()
    judge = None if shard.count > 1 else _judge(args, bench, out)
    try:
        if args.images is not None:
            if args.model is not None or args.editor is not None or args.editor_preset is not None:
                raise ValueError("--images scores images made elsewhere: leave out --model and --editor")
            if shard.count > 1:
                raise ValueError("--shard splits generation; --images scores every sample in one run: leave it out")
            name = _images_model_name(args.images, args.model_name)
            editor_label = thinker_label = None
            print(f"scoring {bench.name} images of {name} under {args.images}", file=sys.stderr)
            run_ = ModeRun(name, args.images)
            run_.results, run_.scoring = score(bench, args.images, name, judge, limit, shard, progress)
            run_.report = bench.score(run_.results)
            runs, model_label = {name: run_}, name
        else:
            from .runner import model_identity, run_modes

            modes = _modes(args.modes)
            thinker_dir, world = _thinker_dir(args), _shapes_world(args, bench)
            editor, thinker = build_agents(args.model, args.editor, args.thinker, modes,
                                           thinker_model=args.thinker_model, thinker_key=args.thinker_key,
                                           thinker_contract=args.thinker_contract, concurrency=args.concurrency,
                                           thinker_prompt=prompt, loop=args.loop,
                                           max_new_tokens=args.max_new_tokens,
                                           thinker_dir=thinker_dir, world=world,
                                           editor_error_rate=args.editor_error_rate, device=args.device,
                                           dtype=args.dtype, editor_preset=args.editor_preset,
                                           editor_resize_to_source=args.editor_resize_to_source)
            editor_label, thinker_label = agent_labels(editor, thinker, args.model, thinker_dir)
            name = args.model_name or default_model_name(args.model, args.editor)
            # a flag given wins; else the editor service's own settings (the defaults without a preset)
            steps, guidance, negative_prompt = get_preset(args.editor_preset).fill(args.steps, args.guidance)
            settings = GenerationSettings(rounds=args.rounds, steps=steps, guidance=guidance,
                                          negative_prompt=negative_prompt, seed=args.seed,
                                          batch_size=args.batch_size, limit=limit, shard=shard, loop=args.loop)
            origin = model_identity(args.model) if args.model is not None else ",".join(
                filter(None, [args.editor, args.thinker]))
            if thinker_dir is not None and thinker is not None:
                origin += f";thinker {model_identity(thinker_dir)}"
            runs = run_modes(bench, editor, thinker, modes, out, name, settings, judge,
                             score_images=shard.count == 1, progress=progress, origin=origin)
            for mode, r in runs.items():
                g = r.generation
                print(f"{mode}: generated {g.generated} of {g.total} ({g.done_before} already done) in "
                      f"{g.seconds:.1f}s -> {r.images_dir}", file=sys.stderr)
                if g.converted or g.companions:
                    print(f"{mode}: {g.converted} earlier edit(s) re-encoded to the official extension, "
                          f"{g.companions} file(s) written beside edits for the official scorer", file=sys.stderr)
                if g.bad_sources:
                    print(f"{mode}: {len(g.bad_sources)} sample(s) skipped, their source image unreadable: "
                          + ", ".join(g.bad_sources), file=sys.stderr)
            if args.editor == SHAPES_EDITOR:
                print(f"{editor.name}: {editor.stats.summary()}", file=sys.stderr)
            model_label = f"{name} ({', '.join(filter(None, [str(args.model or ''), args.editor or '']))})"
            if shard.count > 1:
                print(f"shard {shard}: images written; once every shard is done, run the same command "
                      "without --shard to score them")
                return 0
    finally:
        if judge is not None:
            judge.close()
    stamp = Stamp(model=model_label, judge=judge.settings.judge_id if judge else "oracle",
                  temperature=judge.settings.temperature if judge else None, resize_policy=RESIZE_POLICY,
                  editor=editor_label, thinker=thinker_label)
    reports = {m: r.report for m, r in runs.items()}
    paths = write_reports(out, reports, stamp, {m: r.results for m, r in runs.items()})
    print_reports(bench.name, reports, stamp)
    for r in runs.values():
        c = r.report["counts"]
        if c["missing"] or c["failed"]:
            print(f"{r.mode}: {c['missing']} missing and {c['failed']} failed of {c['total']} samples "
                  f"(see {paths['results']})", file=sys.stderr)
        if r.scoring.not_judged:
            print(f"{r.mode}: {r.scoring.not_judged} of {c['total']} samples not judged: the judge gave no reply "
                  "(a rerun asks again)", file=sys.stderr)
    for what, path in paths.items():
        print(f"{what}: {path}")
    if judge is not None:
        s = judge.stats
        print(f"judge: {s.requests} requests, {s.cache_hits} cached replies, {s.retries} retries, "
              f"{s.failures} gave up" + (f" ({_kinds(s.by_error)})" if s.by_error else ""), file=sys.stderr)
        answered = sum(r.scoring.answered for r in runs.values())
        unanswered = sum(r.scoring.unanswered for r in runs.values())
        if unanswered and not answered:
            print(f"reasonedit: error: the judge at {judge.url} never answered: no reply to any of its {unanswered} "
                  "queries; the report counts every sample sent to it as not judged", file=sys.stderr)
            return 1
    return 0


def _kinds(by_error: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(by_error.items()))
