"""Generation over a benchmark, and scoring of the images it (or anyone else) wrote.

Two separate paths, so images made elsewhere score the same way as ours:

- `generate(bench, editor, thinker, images_dir, model_name, settings)` edits every sample of its
  shard that has no image yet at `bench.output_path(...)` (the benchmark's official layout), in
  batches, writing each image to a temporary file and renaming it into place: a killed run leaves
  only whole images, and the next run skips them. Mode `base` is a plain edit; `think` rewrites
  the instruction first; `think_reflect` runs the whole think -> edit -> reflect loop. Every path
  it writes is first proved to lie inside `images_dir` (`paths.inside`, symlinks resolved). Beside each
  edit it writes the files the official scorer also opens (`bench.companion_files`: GEdit's
  `<key>_SRCIMG.png`), for samples done in an earlier run too; an edit from an earlier run saved with
  an extension the official scorer does not open (KRIS `.png` before `.jpg` was its layout) is
  re-encoded to the official name, not regenerated. JPEG is written at quality `JPEG_QUALITY` (95,
  4:4:4 chroma). A sample
  whose source image cannot be read (not an image, truncated, more than `bench.max_pixels` pixels) is
  skipped and named in `GenerationStats.bad_sources`; the rest go on. An editor that fails after its
  retries stops the run (RemoteServiceError): the images written so far stay, and a rerun resumes.
- `score(bench, images_dir, model_name, judge)` gives one `SampleResult` per sample: "missing"
  when its image is absent (never dropped), "failed" when its source or edited image cannot be read,
  the judge gave no reply or a reply did not parse (never guessed; `failure` says which), else "ok"
  with the scores and the judge's id and temperature.

`run_modes` does both for each mode (base, think, think_reflect) into OUT/images/<mode>/, and
`build_agents` makes the editor and thinker from a model folder, HTTP services and/or the exact shapes
editor (`--editor shapes`).

Shards: `--shard i/n` takes the samples whose index in the benchmark's stable order is i mod n,
so n shards are disjoint and together complete. Seeds are per sample (the run's seed and the
sample's key), so a sample's image does not depend on the shard, the batch or the limit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from reasonedit.config import EVAL_MODES as MODES
from reasonedit.config import LOOPS
from reasonedit.inference.types import SHAPES_EDITOR
from reasonedit.progress import Progress
from reasonedit.publish import atomic_file

from .benchmark import Benchmark, BenchSample, JudgeQuery, JudgeReplyError, SampleResult, parse_reply
from .images import BadImageError, check_image, read_rgb
from reasonedit.paths import inside, safe_name

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'i/n' with 0 <= i < n."""
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
        return cls(i, n)

    def take(self, samples: Sequence[BenchSample]) -> list[BenchSample]:
        return [s for k, s in enumerate(samples) if k % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class GenerationSettings:
    """How images are made. `steps`, `guidance` and `seed` go into every edit request."""

    mode: str = "base"
    rounds: int = 3  # think_reflect: at most this many edit rounds
    steps: int = 28
    guidance: float = 4.0
    negative_prompt: str = " "
    seed: int = 0
    batch_size: int = 4
    limit: Optional[int] = None  # the first N samples of each category (before sharding)
    shard: Shard = field(default_factory=Shard)
    traces_dir: Optional[Path] = None  # think/think_reflect: write each sample's trace JSON here
    loop: str = "reasonedit"  # the loop's rules (reasonedit.inference.loop): reasonedit | editthinker

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("rounds", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop {self.loop!r} is not one of {', '.join(LOOPS)}")


@dataclass
class GenerationStats:
    total: int = 0  # samples in this shard
    done_before: int = 0  # already at their output path (skipped)
    generated: int = 0
    multi_source: int = 0  # samples with several inputs, edited from the first (editors take one image)
    converted: int = 0  # earlier edits re-encoded to the extension the official scorer opens (not regenerated)
    companions: int = 0  # files written beside edits for the official scorer (GEdit <key>_SRCIMG.png)
    bad_sources: dict[str, str] = field(default_factory=dict)  # key -> why its source image could not be read
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def select(bench: Benchmark, limit: Optional[int] = None, shard: Shard = Shard()) -> list[BenchSample]:
    """The benchmark's samples (the first `limit` of each category, so a short run still covers them all),
    then this shard's share."""
    samples = bench.samples()
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for s in samples:
            seen[s.category] = seen.get(s.category, 0) + 1
            if seen[s.category] <= limit:
                kept.append(s)
        samples = kept
    return shard.take(samples)


def sample_seed(seed: int, key: str) -> int:
    """A per-sample seed that does not depend on the shard, batch or limit."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 31)


JPEG_QUALITY = 95  # KRIS's .jpg outputs: near-lossless, full-resolution chroma; a judge scores them a little
# differently from the PNG of the same pixels
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _save_options(fmt: str) -> dict:
    return {"quality": JPEG_QUALITY, "subsampling": 0} if fmt == "JPEG" else {}


def write_image(path: Path, image: np.ndarray) -> None:
    """Write an image atomically (temporary file in the same folder, then rename); format from the suffix (PNG
    unless .jpg / .jpeg / .webp; JPEG at `JPEG_QUALITY`)."""
    from PIL import Image

    fmt = _FORMATS.get(path.suffix.lower(), "PNG")
    with atomic_file(path) as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format=fmt, **_save_options(fmt))


def copy_image(path: Path, source: Path, max_pixels: int) -> None:
    """Write the image in `source` to `path` in the format its suffix names, atomically, keeping its mode where
    that format can hold it (as PIL's `Image.save` of the decoded image does: a PNG copy is lossless)."""
    from PIL import Image

    check_image(source, max_pixels)
    fmt = _FORMATS.get(path.suffix.lower(), "PNG")
    with Image.open(source) as im:
        im.load()
        keep = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") if fmt == "PNG" else ("L", "RGB")
        out = im if im.mode in keep else im.convert("RGBA" if "A" in im.getbands() and fmt == "PNG" else "RGB")
        with atomic_file(path) as f:
            out.save(f, format=fmt, **_save_options(fmt))


def write_json(path: Path, doc) -> None:
    """Write JSON atomically."""
    with atomic_file(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def _edit_batch(editor, thinker, sources: list[np.ndarray], instructions: list[str], seeds: list[int],
                settings: GenerationSettings) -> tuple[list[np.ndarray], list]:
    """Edited images (and traces, for the reasoning modes) for one batch."""
    from reasonedit.inference.types import EditRequest

    if settings.mode == "base":
        requests = [EditRequest(image=s, prompt=p, seed=seed, guidance_scale=settings.guidance,
                                num_inference_steps=settings.steps, negative_prompt=settings.negative_prompt)
                    for s, p, seed in zip(sources, instructions, seeds)]
        return editor.edit(requests), []
    if thinker is None:
        raise ValueError(f"mode {settings.mode} needs a thinker (a model, or --thinker URL)")
    from reasonedit.inference.loop import edit_with_reasoning

    traces = edit_with_reasoning(editor, thinker, sources, instructions, think=True,
                                 reflect=settings.mode == "think_reflect", rounds=settings.rounds,
                                 seed=seeds, guidance_scale=settings.guidance, num_inference_steps=settings.steps,
                                 negative_prompt=settings.negative_prompt, loop=settings.loop)
    return [t.image for t in traces], traces


STAMP = ".reasonedit-generation.json"


def model_identity(model_dir: Optional[Path]) -> str:
    """A model folder's path and save time: changes when the model there is saved again."""
    if model_dir is None:
        return ""
    from reasonedit.models.model import CONFIG_FILE

    meta = Path(model_dir) / CONFIG_FILE
    stamp = meta.stat().st_mtime_ns if meta.is_file() else 0
    return f"{Path(model_dir).resolve()}@{stamp}"


def check_generation_stamp(bench: Benchmark, editor, thinker, images_dir: Path, model_name: str,
                           settings: GenerationSettings, origin: str = "") -> None:
    """Resume only what the same maker made: the images folder records the editor, thinker, model and the
    settings that shape an image; a rerun with any of them changed is refused, naming what changed."""
    made_by = {"benchmark": bench.name, "mode": settings.mode, "steps": settings.steps,
               "guidance": settings.guidance, "seed": settings.seed,
               "rounds": settings.rounds if settings.mode == "think_reflect" else None,
               "editor": getattr(editor, "name", type(editor).__name__),
               "thinker": getattr(thinker, "name", "") if settings.mode != "base" and thinker is not None else "",
               "origin": origin}
    if settings.negative_prompt != " ":  # recorded only when not the default, so earlier stamps still match
        made_by["negative_prompt"] = settings.negative_prompt
    if settings.loop != "reasonedit" and settings.mode != "base":  # likewise
        made_by["loop"] = settings.loop
    path = inside(images_dir, images_dir / safe_name(model_name, "model name (--model-name)") / STAMP)
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before != made_by:
            changed = sorted(k for k in set(before) | set(made_by) if before.get(k) != made_by.get(k))
            raise ValueError(f"{images_dir / model_name}: its images were made with other "
                             + ", ".join(f"{k} ({before.get(k)!r} -> {made_by.get(k)!r})" for k in changed)
                             + "; resuming would mix them: use another --out or delete that folder")
    write_json(path, made_by)


def generate(bench: Benchmark, editor, thinker, images_dir: str | os.PathLike, model_name: str,
             settings: GenerationSettings, progress: Optional[Progress] = None, origin: str = "") -> GenerationStats:
    """Edit every sample of the shard that has no image yet; see the module docstring. `origin` names the
    model behind the editor (see `model_identity`), so a rerun never resumes another model's images."""
    images_dir = Path(images_dir)
    check_generation_stamp(bench, editor, thinker, images_dir, model_name, settings, origin)
    samples = select(bench, settings.limit, settings.shard)
    stats = GenerationStats(total=len(samples))
    todo = []
    for s in samples:
        if _done_before(bench, images_dir, s, model_name, stats):
            stats.done_before += 1
            _write_companions(bench, images_dir, s, model_name, stats)
        else:
            todo.append(s)
    log.info("%s %s shard %s: %d samples, %d already done (%d re-encoded to the official extension), %d to generate",
             bench.name, settings.mode, settings.shard, stats.total, stats.done_before, stats.converted, len(todo))
    started = time.perf_counter()
    for start in range(0, len(todo), settings.batch_size):
        batch, sources = [], []
        for s in todo[start:start + settings.batch_size]:
            try:
                images = bench.source_images(s)
            except (BadImageError, OSError) as e:  # this sample's failure, not the run's
                stats.bad_sources[s.key] = str(e)
                log.warning("%s sample %s: source image unreadable, skipped: %s", bench.name, s.key, e)
                continue
            if not images:
                raise ValueError(f"{bench.name} sample {s.key}: no source image")
            if len(images) > 1:
                stats.multi_source += 1
                log.warning("%s sample %s has %d source images; editing the first (an Editor takes one image)",
                            bench.name, s.key, len(images))
            batch.append(s)
            sources.append(images[0])
        if batch:
            edited, traces = _edit_batch(editor, thinker, sources, [s.instruction for s in batch],
                                         [sample_seed(settings.seed, s.key) for s in batch], settings)
            for k, (s, image) in enumerate(zip(batch, edited)):
                if settings.traces_dir is not None and traces:
                    trace = Path(settings.traces_dir) / f"{_trace_name(s.key)}.json"
                    write_json(inside(settings.traces_dir, trace), traces[k].to_dict())
                write_image(bench.writable_output(images_dir, s, model_name), image)
                _write_companions(bench, images_dir, s, model_name, stats)
            stats.generated += len(batch)
        if progress:
            progress(f"{bench.name} {settings.mode}", stats.generated + len(stats.bad_sources), len(todo))
    stats.seconds = time.perf_counter() - started
    return stats


def _done_before(bench: Benchmark, images_dir: Path, sample: BenchSample, model_name: str,
                 stats: GenerationStats) -> bool:
    """Whether a sample's edit is already there under a name the official scorer opens; an edit of an earlier run
    saved with another extension is re-encoded to the official name (counted in `stats.converted`)."""
    if bench.output_path(images_dir, sample, model_name).is_file():
        return True
    found = bench.find_output(images_dir, sample, model_name)
    if found is None:
        return False
    if found.suffix.lower() in bench.official_extensions:
        return True
    try:
        write_image(bench.writable_output(images_dir, sample, model_name), read_rgb(found, bench.max_pixels))
    except (BadImageError, OSError) as e:
        log.warning("%s sample %s: cannot re-encode %s (%s); generating it again", bench.name, sample.key, found, e)
        return False
    stats.converted += 1
    return True


def _write_companions(bench: Benchmark, images_dir: Path, sample: BenchSample, model_name: str,
                      stats: GenerationStats) -> None:
    """The files the official scorer opens beside an edit (`bench.companion_files`), each proved inside
    `images_dir`; one whose source cannot be read is logged and left out (the official scorer skips that sample)."""
    for path, source in bench.companion_files(images_dir, sample, model_name).items():
        if path.is_file():
            continue
        try:
            copy_image(inside(images_dir, path), source, bench.max_pixels)
        except (BadImageError, OSError) as e:
            log.warning("%s sample %s: cannot write %s from %s: %s", bench.name, sample.key, path.name, source, e)
            continue
        stats.companions += 1


def _trace_name(key: str) -> str:
    """A sample key as one file name: KRIS's "category/id" becomes "category_id"."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return "_" + name if name.startswith(".") else name


# -- scoring ---------------------------------------------------------------------------------------
@dataclass
class ScoreStats:
    total: int = 0
    missing: int = 0
    failed: int = 0
    not_judged: int = 0  # failed samples with a query the judge gave no reply to (failure "not_judged")
    queries: int = 0
    answered: int = 0  # judge calls that came back with a reply (from the cache too), parsable or not
    unanswered: int = 0  # judge calls that got none: the judge down, timing out, refusing, a reply over the bound
    seconds: float = 0.0


def score(bench: Benchmark, images_dir: str | os.PathLike, model_name: str, judge=None,
          limit: Optional[int] = None, shard: Shard = Shard(),
          progress: Optional[Progress] = None) -> tuple[list[SampleResult], ScoreStats]:
    """One SampleResult per selected sample, in order; see the module docstring."""
    images_dir = Path(images_dir)
    safe_name(model_name, "model name (--model-name)")
    samples = select(bench, limit, shard)
    stats = ScoreStats(total=len(samples))
    started = time.perf_counter()
    results: list[Optional[SampleResult]] = [None] * len(samples)
    asks: list[tuple[int, JudgeQuery]] = []  # (sample index, query), all sent to the judge in one call
    for i, s in enumerate(samples):
        path = bench.find_output(images_dir, s, model_name)  # the official name, or the same stem as .jpg etc.
        if path is None:
            bad = _source_problem(bench, s)  # a source that cannot be read is why there is no image
            results[i] = _result(s, "failed", error=f"source image unreadable: {bad}", failure="bad_source") if bad \
                else _result(s, "missing", error=f"no image at {bench.output_path(images_dir, s, model_name)}")
            continue
        if not bench.uses_judge:
            try:
                results[i] = _result(s, "ok", scores=bench.oracle_scores(s, path), judge="oracle")
            except BadImageError as e:  # an unreadable image is this sample's failure, not the run's
                results[i] = _result(s, "failed", error=f"edited image unreadable: {e}", judge="oracle",
                                     failure="bad_image")
            except (ValueError, OSError) as e:  # the oracle cannot read it as a scene
                results[i] = _result(s, "failed", error=f"{path}: {e}", judge="oracle", failure="bad_image")
            if progress:
                progress(f"{bench.name} oracle", i + 1, len(samples))
            continue
        if judge is None:
            raise ValueError(f"{bench.name} is scored by a judge: give --judge-url and --judge-model "
                             "(or REASONEDIT_JUDGE_BASE_URL / _MODEL)")
        queries = bench.prompted_queries(s, path)
        bad = _query_image_problem(bench, queries, path)
        if bad is not None:  # never sent: a bomb or a non-image is this sample's failure, not the judge's
            failure, error = bad
            results[i] = _result(s, "failed", error=error, failure=failure)
            continue
        asks.extend((i, q) for q in queries)
    if asks:
        bench.check_judge_prompts((q.name, samples[i].category) for i, q in asks)
        stats.answered, stats.unanswered = _judge_all(bench, samples, results, asks, judge, progress)
    stats.queries = len(asks)
    for r in results:
        stats.missing += r.status == "missing"
        stats.failed += r.status == "failed"
        stats.not_judged += r.failure == "not_judged"
    stats.seconds = time.perf_counter() - started
    return results, stats  # type: ignore[return-value]


def _source_problem(bench: Benchmark, sample: BenchSample) -> Optional[str]:
    """Why a sample's source images cannot be read (decoded in full), or None."""
    try:
        bench.source_images(sample)
    except (BadImageError, OSError) as e:
        return str(e)
    return None


def _query_image_problem(bench: Benchmark, queries: Sequence[JudgeQuery], edited: Path) -> Optional[tuple[str, str]]:
    """(failure, why) for the first image of the queries that is not an image or has too many pixels (from its
    header: nothing is decoded), or None."""
    for path in dict.fromkeys(p for q in queries for p in q.images):
        try:
            check_image(path, bench.max_pixels)
        except (BadImageError, OSError) as e:
            if Path(path) == Path(edited):
                return "bad_image", f"edited image unreadable: {e}"
            return "bad_source", f"source image unreadable: {e}"
    return None


def _judge_all(bench: Benchmark, samples: Sequence[BenchSample], results: list, asks: list, judge,
               progress: Optional[Progress]) -> tuple[int, int]:
    """Ask the judge every query and fill in their samples' results; (calls answered, calls unanswered)."""
    from .judge import JudgeRequest

    requests = [JudgeRequest(prompt=q.prompt, images=list(q.images), system=q.system) for _, q in asks]
    landed, lock = [0], threading.Lock()

    def on_reply(_index, _reply) -> None:  # called from the judge's worker threads
        with lock:
            landed[0] += 1
            if progress:
                progress(f"{bench.name} judge", landed[0], len(requests))

    replies = judge.ask(requests, on_reply=on_reply)
    per_sample: dict[int, list] = {}
    for (i, q), reply in zip(asks, replies):
        per_sample.setdefault(i, []).append((q, reply))
    s_judge, temperature = judge.settings.judge_id, judge.settings.temperature
    answered = unanswered = 0
    for i, pairs in per_sample.items():
        s, scores, errors, failures = samples[i], {}, [], set()
        for q, reply in pairs:
            if not reply.ok:
                unreadable = reply.error_kind == "bad_image"  # our side: the judge was never asked
                failures.add("bad_image" if unreadable else "not_judged")
                unanswered += not unreadable
                errors.append(f"{q.name}: judge gave no reply ({reply.error})")
                continue
            answered += 1
            try:
                scores.update(parse_reply(q, reply.text))
            except JudgeReplyError as e:
                failures.add("bad_reply")
                errors.append(f"{e} (reply: {reply.text[:120]!r})")
        status = "failed" if errors else "ok"
        failure = next((f for f in ("not_judged", "bad_image", "bad_reply") if f in failures), None)
        results[i] = _result(s, status, scores=scores if status == "ok" else {}, error="; ".join(errors) or None,
                             judge=s_judge, temperature=temperature, failure=failure)
    return answered, unanswered


def _result(sample: BenchSample, status: str, scores: Optional[dict] = None, error: Optional[str] = None,
            judge: Optional[str] = None, temperature: Optional[float] = None,
            failure: Optional[str] = None) -> SampleResult:
    return SampleResult(key=sample.key, category=sample.category, status=status, scores=scores or {},
                        meta=dict(sample.meta), error=error, judge=judge, temperature=temperature,
                        language=sample.language, failure=failure)


# -- editors and thinkers ----------------------------------------------------------------------------


def build_agents(model_dir: Optional[Path], editor_url: Optional[str], thinker_url: Optional[str],
                 modes: list[str], *, thinker_model: Optional[str] = None, thinker_key: Optional[str] = None,
                 thinker_contract: str = "reasonedit", concurrency: int = 8, thinker_dir: Optional[Path] = None,
                 world=None, editor_error_rate: float = 0.0, editor_seed: int = 0, device=None, dtype="auto",
                 editor_preset: Optional[str] = None, editor_resize_to_source: Optional[bool] = None,
                 thinker_prompt: Optional[str | Path] = None, loop: Optional[str] = None,
                 max_new_tokens: int | dict[str, int] = 128):
    """(editor, thinker) from a model folder, HTTP services, the shapes editor and/or a thinker model folder;
    a thinker only when a mode needs one.

    editor_url: HTTP service URL(s), or SHAPES_EDITOR for the exact shapes editor on `world` (a ShapesWorld;
        None: the default world), which makes errors on purpose at `editor_error_rate`.
    thinker_dir: a model folder whose reasoner is the thinker (its generator is not loaded); without it and
        without `thinker_url`, the thinker is `model_dir`'s reasoner.
    device: where the models go (None or "auto": CUDA when there is one); dtype: what they run in ("auto":
        bfloat16 on CUDA, as saved elsewhere).
    editor_preset, editor_resize_to_source: how an HTTP editor speaks to its service (`HttpEditor`).
    thinker_prompt, loop: the chat thinker's prompt (editthinker contract) and the loop's rules the thinker is
        built for (`build_thinker`); max_new_tokens: the built-in reasoner's longest reply (one number or per role).
    """
    needs_thinker = any(m != "base" for m in modes)
    shapes = editor_url == SHAPES_EDITOR
    if model_dir is None and editor_url is None:
        raise ValueError("give --model DIR, --editor URL, or --images DIR (to score images made elsewhere); "
                         "--editor shapes runs the exact shapes-world editor")
    if thinker_url is not None and thinker_dir is not None:
        raise ValueError("give one thinker: --thinker URL (a chat endpoint, --thinker-model naming its model) "
                         "or --thinker-model DIR (a model folder) without --thinker")
    if needs_thinker and model_dir is None and thinker_url is None and thinker_dir is None:
        raise ValueError(f"--modes {','.join(modes)} needs a thinker: give --model DIR, --thinker URL or "
                         "--thinker-model DIR")
    if editor_error_rate and not shapes:
        raise ValueError("--editor-error-rate: only the shapes editor (--editor shapes) makes errors on purpose")
    if (editor_preset is not None or editor_resize_to_source is not None) and (editor_url is None or shapes):
        flag = "--editor-preset" if editor_preset is not None else "--editor-resize-to-source"
        raise ValueError(f"{flag}: only with --editor URL (an HTTP editing service)")
    from reasonedit.inference.pipeline import Pipeline, build_editor, build_thinker

    pipeline = None
    if model_dir is not None and editor_url is None:
        pipeline = Pipeline.load(model_dir, components=("reasoner", "generator", "vae"), device=device, dtype=dtype)
    editor = build_editor(editor_url, pipeline=pipeline, world=world, error_rate=editor_error_rate, seed=editor_seed,
                          concurrency=concurrency, preset=editor_preset, resize_to_source=editor_resize_to_source)
    thinker = None
    if needs_thinker and thinker_url is not None:
        thinker = build_thinker(thinker_url, model_name=thinker_model, api_key=thinker_key, contract=thinker_contract,
                                concurrency=concurrency, prompt_template=thinker_prompt, loop=loop)
    elif needs_thinker:
        source = thinker_dir if thinker_dir is not None else model_dir
        if pipeline is None or Path(source).resolve() != Path(model_dir).resolve():
            pipeline = Pipeline.load(source, components=("reasoner",), device=device, dtype=dtype)
        thinker = build_thinker(pipeline=pipeline, prompt_template=thinker_prompt, loop=loop,
                                max_new_tokens=max_new_tokens)
    return editor, thinker


def agent_labels(editor, thinker, model_dir: Optional[Path] = None,
                 thinker_dir: Optional[Path] = None) -> tuple[str, Optional[str]]:
    """What made the images, for the report's stamp: (editor, thinker or None), with the model folder each
    built-in one runs on, e.g. ("shapes (exact, error rate 0.30)", "reasonedit-reasoner (runs/x/model)")."""
    editor_label = getattr(editor, "name", type(editor).__name__)
    if editor_label == "reasonedit-generator" and model_dir is not None:
        editor_label = f"{editor_label} ({model_dir})"
    if thinker is None:
        return editor_label, None
    thinker_label = getattr(thinker, "name", type(thinker).__name__)
    source = thinker_dir if thinker_dir is not None else model_dir
    if thinker_label == "reasonedit-reasoner" and source is not None:
        thinker_label = f"{thinker_label} ({source})"
    return editor_label, thinker_label


def default_model_name(model_dir: Optional[Path], editor_url: Optional[str]) -> str:
    if editor_url == SHAPES_EDITOR:  # apart from the model's own generator images, even in the same --out
        return "shapes-editor"
    if model_dir is not None:
        path = Path(model_dir).resolve()
        # runs/x/stage3/model -> stage3: the folder a model is saved in is usually called `model`
        return path.parent.name if path.name == "model" and path.parent.name else path.name
    return "editor"



# -- generation then scoring, per mode ------------------------------------------------------------------
@dataclass
class ModeRun:
    """One mode's images, how they were made, and how they scored (`report` is `Benchmark.score`'s)."""

    mode: str
    images_dir: Path
    generation: Optional[GenerationStats] = None
    results: list[SampleResult] = field(default_factory=list)
    scoring: Optional[ScoreStats] = None
    report: Optional[dict] = None


def run_modes(bench: Benchmark, editor, thinker, modes: Sequence[str], out_dir: str | os.PathLike, model_name: str,
              settings: GenerationSettings, judge=None, score_images: bool = True,
              progress: Optional[Progress] = None, origin: str = "") -> dict[str, ModeRun]:
    """For each mode: generate into OUT/images/<mode>/ (official layout), then score unless told not to."""
    out_dir = Path(out_dir)
    runs = {}
    for mode in modes:
        # each folder proved inside OUT here, each file inside its folder by `generate`
        traces = None if mode == "base" else inside(out_dir, out_dir / "traces" / mode)
        s = replace(settings, mode=mode, traces_dir=traces)
        run = ModeRun(mode, inside(out_dir, out_dir / "images" / mode))
        run.generation = generate(bench, editor, thinker, run.images_dir, model_name, s, progress, origin)
        log.info("%s %s: generated %d (%.2f samples/s), %d were already done", bench.name, mode,
                 run.generation.generated, run.generation.samples_per_second, run.generation.done_before)
        if score_images:
            run.results, run.scoring = score(bench, run.images_dir, model_name, judge, s.limit, s.shard, progress)
            run.report = bench.score(run.results)
        runs[mode] = run
    return runs


__all__ = ["GenerationSettings", "GenerationStats", "JPEG_QUALITY", "MODES", "ModeRun", "SHAPES_EDITOR", "ScoreStats",
           "Shard", "agent_labels", "build_agents", "check_generation_stamp", "default_model_name", "generate",
           "copy_image", "model_identity", "run_modes", "sample_seed", "score", "select", "write_image", "write_json"]
