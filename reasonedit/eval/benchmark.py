"""The interface every benchmark implements, and the records that flow between generation, judging and scoring.

Contract (the runner, the judge client and the CLI rely on exactly this):

1. ``bench = get_benchmark(name, **options)`` (``reasonedit.eval.benchmarks``, whose ``BENCHMARKS``
   maps each name to its class); names are
   ``shapes``, ``gedit``, ``imgedit``, ``kris``, ``rise``.
2. ``bench.load(data_dir)`` reads the user's local copy in the benchmark's official layout and
   validates it; a missing directory, file or field raises ``BenchmarkDataError`` (a ValueError)
   naming the path and the field. A key (index, image id) that names an output file must be one
   plain file name (``output_name``; see ``paths.py``) and a source file a relative path inside the
   data folder (``existing_file``): anything else is refused, naming the benchmark, key and file.
   ``shapes`` also accepts ``None``: scenes made on the fly from its seed (held out: only scenes of
   the synth ``test`` split).
3. ``bench.samples()`` -> the ``BenchSample`` list, in a stable order (keys are unique).
   ``bench.source_images(sample)`` -> the input image(s) as uint8 (H, W, 3) arrays, in order;
   ``BadImageError`` for one that is not an image, is truncated or has more than ``bench.max_pixels``.
4. ``bench.output_path(images_dir, sample, model_name)`` -> where the edited image goes, in the
   layout the benchmark's official scoring scripts read (so they can score the same images), built
   with ``paths.output_file`` from plain names only; ``bench.writable_output(...)`` is the same path
   proved to lie inside ``images_dir`` with symlinks resolved, and is what the runner writes to.
   ``bench.find_output(images_dir, sample, model_name)`` -> that file, or the same stem with another
   image extension (.jpg, ...), or None: the sample is "missing". Scoring images made elsewhere
   (``--images``) is the same call. ``bench.official_extensions`` are the suffixes the official scorer
   opens (an edit found with another one is re-encoded by generation, never regenerated);
   ``bench.companion_files(images_dir, sample, model_name)`` -> ``{path: source file}`` the official
   scorer needs beside the edit (GEdit's ``<key>_SRCIMG.png``), written by generation.
5. Per sample with an edited image present:
   - ``bench.uses_judge`` False (shapes): ``bench.oracle_scores(sample, edited_path)`` -> scores.
   - ``bench.uses_judge`` True: ``bench.judge_queries(sample, edited_path)`` -> ``JudgeQuery`` list;
     send each (prompt text + images in order) to the judge, then ``parse_reply(query, text)`` ->
     ``{metric: float}``; it raises ``JudgeReplyError`` on anything it cannot read (never guesses).
     Merge the dicts of all queries of the sample into ``SampleResult.scores``.
6. Build one ``SampleResult`` per sample: status "ok" (every query parsed), "missing" (no edited
   image) or "failed" (``error`` says why, ``failure`` names the kind, one of ``FAILURES``: the
   source image could not be read, the edited image could not be read, the judge gave no reply,
   a reply did not parse). Copy the sample's ``category``, ``language`` and ``meta`` (scoring
   reads e.g. GEdit's "intersection", RISE's "consistency_free" and "binary" from it), the judge id
   and temperature. Scores of a failed sample are ignored by ``score``. ``to_dict``/``from_dict``
   round-trip it through JSON (for resumable JSONL files).
7. ``bench.score(results)`` -> the report dict below, as the benchmark's
   official protocol defines it. Missing and failed samples are counted in every category they
   belong to and are left out of the means (as the official scripts leave out what they cannot
   score; RISE's accuracy counts them as unsolved, as its script does); they are never given a
   guessed score.
8. ``reasonedit.eval.report.write_reports(out_dir, {mode: report}, Stamp(...), {mode: results})``
   writes results.json, report.md (which counts and names the failed samples by kind) and the charts; ``ablation_table({mode: shapes report})`` is the
   paper's ablation table.

Report dict (JSON-serialisable)::

    {"benchmark": "gedit",
     "metrics": ["SC", "PQ", "O"],          # table column order
     "primary": "O",                        # the headline metric, the one charts compare
     "counts": {"total": n, "ok": n, "missing": n, "failed": n},
     "sections": {                          # e.g. "en/fullset", "en/intersection"; "all" when one
        NAME: {"overall": {metric: value},  # value None when nothing was scored
               "by_category": {category: {metric: value, "n": total, "ok": n, "missing": n, "failed": n}}}},
     "notes": ["how overall is computed", ...]}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .images import DEFAULT_MAX_PIXELS, read_rgb
from .replies import REPLY_PARSERS, JudgeReplyError, parse_reply
from reasonedit.paths import UnsafeNameError, inside, name_problem, relative_source

STATUSES = ("ok", "missing", "failed")
# why a failed sample has no scores: its source image, its edited image, no reply from the judge, a reply
# that did not parse
FAILURES = ("bad_source", "bad_image", "not_judged", "bad_reply")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class BenchmarkDataError(ValueError):
    """A benchmark directory that is missing or not in the official layout; names the path and field."""


@dataclass
class BenchSample:
    """One benchmark item. `sources` are the input image paths in order (empty for generated scenes)."""

    key: str
    category: str
    instruction: str
    sources: list[Path] = field(default_factory=list)
    language: str = "en"
    # benchmark-specific: GEdit "intersection"; KRIS "gt_image", "explanation", "group", "knowledge";
    # RISE "reference_text", "reference_image", "consistency_free", "binary"; shapes "target_scene", ...
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeQuery:
    """One request to the judge: a prompt and images, and how its reply turns into named scores.

    `reply_format` selects the parser in `REPLY_PARSERS` (`replies.py`); `metrics` are the names it yields, in
    reply order; `scale` is the (low, high) range every score must lie in; `integers`: only whole numbers are
    scores (a 0/1 judgement).
    """

    name: str
    prompt: str
    images: list[Path]
    metrics: tuple[str, ...]
    reply_format: str
    scale: tuple[float, float] = (0.0, 10.0)
    system: str | None = None
    integers: bool = False


@dataclass
class SampleResult:
    """What happened to one sample: its scores, or why it has none."""

    key: str
    category: str
    status: str  # ok | missing | failed
    scores: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    judge: str | None = None  # judge model id ("oracle" for shapes)
    temperature: float | None = None
    language: str = "en"
    failure: str | None = None  # for status "failed": one of FAILURES

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"SampleResult {self.key}: status {self.status!r} is not one of {STATUSES}")
        if self.failure is not None and self.failure not in FAILURES:
            raise ValueError(f"SampleResult {self.key}: failure {self.failure!r} is not one of {FAILURES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleResult":
        missing = [k for k in ("key", "category", "status") if k not in d]
        if missing:
            raise ValueError(f"result record {d.get('key', '?')}: missing field(s) {missing}")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- the interface ------------------------------------------------------------------------------
class Benchmark:
    """Base of every benchmark: read the official layout, place outputs, ask the judge, score."""

    name: str = ""
    uses_judge: bool = True
    official_extensions: tuple[str, ...] = (".png",)  # what the official scorer opens, in the order it tries them

    def __init__(self) -> None:
        self._samples: list[BenchSample] | None = None
        self.data_dir: Path | None = None
        self.max_pixels = DEFAULT_MAX_PIXELS  # a source or edited image with more is a failed sample

    def load(self, data_dir: str | Path | None) -> "Benchmark":
        raise NotImplementedError

    def samples(self) -> list[BenchSample]:
        if self._samples is None:
            raise RuntimeError(f"{self.name}: call load(data_dir) before samples()")
        return self._samples

    def source_images(self, sample: BenchSample) -> list[np.ndarray]:
        """The input images of a sample as uint8 (H, W, 3) arrays; BadImageError (naming the file) for one that
        is not an image, is truncated or has more than `max_pixels` pixels."""
        return [read_rgb(p, self.max_pixels) for p in sample.sources]

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        """Where the edited image goes; built with `paths.output_file`, so every part is one plain name."""
        raise NotImplementedError

    def writable_output(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        """`output_path`, proved to lie inside `images_dir` with every symlink resolved (`paths.inside`):
        what the runner writes to."""
        return inside(images_dir, self.output_path(images_dir, sample, model_name))

    def companion_files(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> dict[Path, Path]:
        """Files the official scorer needs beside the edited image, {path to write: the source image it holds};
        built with `paths.output_file`. None by default."""
        return {}

    def find_output(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path | None:
        """The edited image of a sample if present: `output_path`, or the same stem with another image
        extension (the official scripts accept .png and .jpg); None when it is missing."""
        path = self.output_path(images_dir, sample, model_name)
        for candidate in [path] + [path.with_suffix(ext) for ext in IMAGE_EXTENSIONS if ext != path.suffix]:
            if candidate.is_file():
                return candidate
        return None

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        raise NotImplementedError(f"{self.name} has no judge queries")

    # -- the judge's prompt text, replaceable ----------------------------------------------------
    def use_judge_prompts(self, path: str | Path) -> "Benchmark":
        """Replace the prompt text of judge queries by name with templates from a JSON file
        `{"<query name>": "<template>"}` (or `"<query name>:<category>"` for one category), e.g. the official
        scripts' own wording, so scores match theirs.
        Templates take `{instruction}`, `{language}`, `{category}`, `{key}` and the sample's text meta fields;
        a reply must still come in the query's reply format."""
        where = str(path)
        doc = read_json(Path(path), "judge prompts")
        if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
            raise BenchmarkDataError(f"{where}: judge prompts must be a JSON object of query name -> template text")
        self.judge_prompts, self.judge_prompts_file = dict(doc), where
        return self

    def prompted_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        """`judge_queries` with any replaced prompt text filled in for this sample."""
        queries = self.judge_queries(sample, edited_path)
        prompts: dict[str, str] = getattr(self, "judge_prompts", {})
        if not prompts:
            return queries
        fields = {"instruction": sample.instruction, "language": sample.language, "category": sample.category,
                  "key": sample.key, **{k: v for k, v in sample.meta.items() if isinstance(v, (str, int, float))}}
        for q in queries:
            name = next((n for n in (f"{q.name}:{sample.category}", q.name) if n in prompts), None)
            if name is not None:
                try:
                    q.prompt = prompts[name].format_map(fields)
                except KeyError as e:
                    raise BenchmarkDataError(
                        f"{self.judge_prompts_file}: prompt {name!r} uses {{{e.args[0]}}}, which sample "
                        f"{sample.key} lacks; it has {sorted(fields)}") from None
        return queries

    def check_judge_prompts(self, seen: Iterable[tuple[str, str]]) -> None:
        """Refuse replaced prompts that no (query name, category) of this run matches (a typo would go unnoticed)."""
        seen = {form for name, category in seen for form in (name, f"{name}:{category}")}
        unknown = sorted(set(getattr(self, "judge_prompts", {})) - seen)
        if unknown:
            raise BenchmarkDataError(f"{self.judge_prompts_file}: no {self.name} judge query is named {unknown}; "
                                     f"the queries are {sorted(seen)}")

    def oracle_scores(self, sample: BenchSample, edited_path: Path) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} is scored by a judge, not an oracle")

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        raise NotImplementedError


# -- helpers the benchmarks share -----------------------------------------------------------------
def mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def counts(results: Iterable[SampleResult]) -> dict[str, int]:
    out = {"n": 0, "ok": 0, "missing": 0, "failed": 0}
    for r in results:
        out["n"] += 1
        out[r.status] += 1
    return out


def total_counts(results: Sequence[SampleResult]) -> dict[str, int]:
    c = counts(results)
    return {"total": c["n"], "ok": c["ok"], "missing": c["missing"], "failed": c["failed"]}


def group_by(results: Iterable[SampleResult], key: Callable[[SampleResult], str | None]) -> dict[str, list[SampleResult]]:
    out: dict[str, list[SampleResult]] = {}
    for r in results:
        k = key(r)
        if k is not None:
            out.setdefault(k, []).append(r)
    return out


def row(results: Sequence[SampleResult], metrics: dict[str, float | None]) -> dict[str, Any]:
    """One table row: the metric values and the sample counts behind them."""
    return {**metrics, **counts(results)}


def ok_only(results: Iterable[SampleResult]) -> list[SampleResult]:
    return [r for r in results if r.status == "ok"]


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the benchmark; a missing or unparsable one is a BenchmarkDataError naming it."""
    import json
    if not path.is_file():
        raise BenchmarkDataError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkDataError(f"{what}: {path} is not valid JSON ({e})") from None


def require(record: dict, fields: Sequence[str], where: str, types: dict[str, type | tuple] | None = None) -> None:
    """Every field present (and of its type where given); otherwise a BenchmarkDataError naming it."""
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object, got {type(record).__name__}")
    for f in fields:
        if f not in record or record[f] is None:
            raise BenchmarkDataError(f"{where}: missing field {f!r}")
        if types and f in types and not isinstance(record[f], types[f]):
            raise BenchmarkDataError(f"{where}: field {f!r} is {record[f]!r}, expected {types[f]}")


def output_name(bench: str, value: Any, where: str, field_name: str) -> str:
    """A record's key (or index, task type) that names an output file, as a string; BenchmarkDataError naming
    the benchmark, the value and where it came from when it is not one plain file name (see `paths`)."""
    problem = name_problem(str(value))
    if problem is not None:
        raise BenchmarkDataError(f"{bench}: {where}: {field_name} {value!r} cannot name an output file ({problem}); "
                                 f"outputs are named <{field_name}>.png as the official scripts expect: "
                                 "fix or remove that record")
    return str(value)


def existing_file(root: Path, rel: str, where: str, field_name: str) -> Path:
    """root / rel, a file that exists, named by a relative path that stays inside root."""
    try:
        path = relative_source(root, rel, f"{where}: field {field_name!r}")
    except UnsafeNameError as e:
        raise BenchmarkDataError(str(e)) from None
    if not path.is_file():
        raise BenchmarkDataError(f"{where}: field {field_name!r} names {path}, which does not exist")
    return path


__all__ = ["Benchmark", "BenchmarkDataError", "BenchSample", "FAILURES", "JudgeQuery", "JudgeReplyError",
           "REPLY_PARSERS", "STATUSES", "SampleResult", "output_name", "parse_reply"]
