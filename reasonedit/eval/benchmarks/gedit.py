"""GEdit-Bench (606 English + 606 Chinese samples, 11 task types), scored the VIEScore way.

Local copy, either of:
- the Hugging Face hub snapshot of stepfun-ai/GEdit-Bench (a folder with its data files anywhere
  under it, or one such file): parquet files, or the `datasets` Arrow files, whose rows hold key,
  task_type, instruction, instruction_language, Intersection_exist and the two `Image` columns
  input_image and input_image_raw (structs of `bytes` and `path`). Each embedded image is written
  once to a cache folder (default `<snapshot>/.reasonedit-images/`) so samples can point at files;
- a `metadata.jsonl` export (one row per sample with the same fields, the two image fields being
  paths relative to the directory).

Outputs go where the official scorer reads them: `<images>/<model>/fullset/<task_type>/<language>/<key>.png`,
with the judged source image beside each as `<key>_SRCIMG.png` (`test_gedit_score.py` skips a sample without it).

Per sample the judge gives two semantic-consistency sub-scores (source + edit) and two perceptual
quality sub-scores (edit alone), each 0-10: SC = min of its two, PQ = min of its two,
O = sqrt(SC * PQ). Means per task type, then the mean over the 11 task types, which is undefined (None;
the official NaN) when a task type has no scored sample; our mean over the task types that have one is
reported beside it. Per language; the intersection subset beside the full set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ...publish import atomic_write_bytes
from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, JudgeQuery, SampleResult, existing_file,
                         group_by, mean, ok_only, output_name, require, row, total_counts)
from ..images import DEFAULT_MAX_PIXELS, BadImageError, decoded_format
from reasonedit.paths import output_file

TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn", "zh")  # the dataset writes Chinese as "cn"; "zh" is accepted too
FIELDS = ("key", "task_type", "instruction", "instruction_language", "input_image", "input_image_raw",
          "Intersection_exist")
METADATA = "metadata.jsonl"
IMAGE_COLUMNS = ("input_image", "input_image_raw")
SOURCE_SUFFIX = "_SRCIMG.png"  # the judged source image beside each edit, as generate_image_example.py saves it
TABLE_SUFFIXES = (".parquet", ".arrow")  # hub parquet; `datasets` Arrow (IPC stream) files
CACHE_DIRNAME = ".reasonedit-images"
BATCH_ROWS = 16  # rows held in memory at once while extracting (each holds two full-size images)
PROGRESS_EVERY_S = 5.0

log = logging.getLogger(__name__)

# Our wording; the reply format (a JSON object with a two-number "score" list) is VIEScore's.
SC_PROMPT = """You judge an image edit. The first image is the original; the second is the result of editing it \
with this instruction:

"{instruction}"

Give two scores from 0 to 10:
1. how completely and correctly the second image carries out the instruction (0: not at all, 10: perfectly);
2. how well everything the instruction did not ask to change is left as it was (0: the image was changed \
beyond recognition, 10: nothing but the requested edit changed).

Reply with JSON only: {{"score": [<score 1>, <score 2>], "reasoning": "<one or two sentences>"}}"""

PQ_PROMPT = """You judge the visual quality of one generated image, ignoring what it depicts.

Give two scores from 0 to 10:
1. naturalness: does it look like a real photograph or a coherent picture (lighting, perspective, \
proportions)? 0: clearly fake, 10: fully natural;
2. artifacts: is it free of distortions, smears, broken textures, garbled text or odd seams? \
0: severe artifacts, 10: none.

Reply with JSON only: {"score": [<naturalness>, <artifacts>], "reasoning": "<one or two sentences>"}"""


def sample_scores(scores: dict[str, float]) -> tuple[float, float, float]:
    """(SC, PQ, O) of one sample from its four judged sub-scores."""
    sc = min(scores["sc_instruction"], scores["sc_overedit"])
    pq = min(scores["pq_naturalness"], scores["pq_artifacts"])
    return sc, pq, math.sqrt(sc * pq)


# -- the hub snapshot: parquet / Arrow tables with embedded images --------------------------------
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass
class ImageCache:
    """A folder of images named by the SHA-256 of their bytes: each written once, atomically."""

    folder: Path
    max_pixels: int = DEFAULT_MAX_PIXELS  # an embedded image with more is a data error, like a corrupt one
    written: int = 0
    reused: int = 0
    _index: dict[str, Path] = field(default_factory=dict, repr=False)  # digest -> file already on disk
    _known: dict[str, Path] = field(default_factory=dict, repr=False)  # digest -> file checked this load

    def __post_init__(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BenchmarkDataError(f"gedit: cannot create the image cache folder {self.folder} ({e}); "
                                     "give a writable one with --image-cache DIR (GEditBenchmark(image_cache=DIR))") from None
        self._index = {p.stem: p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")}

    def store(self, data: bytes, where: str, column: str) -> Path:
        """The cached file holding these image bytes; checks they decode before writing them."""
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._known:  # the English and Chinese rows of a key share their images
            return self._known[digest]
        path = self._index.get(digest)
        if path is not None and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            self.reused += 1
        else:
            path = self.folder / f"{digest}{_image_suffix(data, where, column, self.max_pixels)}"
            atomic_write_bytes(path, data)
            self.written += 1
        self._known[digest] = path
        return path


def _image_suffix(data: bytes, where: str, column: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The file suffix of encoded image bytes, after decoding them fully (a corrupt or oversized image is an error)."""
    try:
        fmt = decoded_format(data, max_pixels, what="them")
    except BadImageError as e:
        raise BenchmarkDataError(f"{where}: column {column!r} holds {len(data)} bytes that do not decode "
                                 f"as an image ({e})") from None
    return IMAGE_SUFFIXES.get(fmt, f".{fmt.lower()}")


def find_tables(root: Path) -> list[Path]:
    """The snapshot's data files under `root`, sorted: parquet if any, else `datasets` Arrow files.
    Hidden folders (the image cache, huggingface-cli's .cache) are skipped."""
    for suffix in TABLE_SUFFIXES:
        found = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if found:
            return found
    return []


def _is_text(t) -> bool:
    import pyarrow as pa
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_image_struct(t) -> bool:
    """The `datasets` Image storage type: struct<bytes: binary, path: string> (either field may be absent)."""
    import pyarrow as pa
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    if not names.keys() & {"bytes", "path"}:
        return False
    b, p = names.get("bytes"), names.get("path")
    binary_ok = b is None or pa.types.is_binary(b) or pa.types.is_large_binary(b) or pa.types.is_binary_view(b) \
        or pa.types.is_null(b)
    path_ok = p is None or _is_text(p) or pa.types.is_null(p)
    return binary_ok and path_ok


def check_schema(schema, path: Path) -> None:
    """Every GEdit column present with its type; otherwise a BenchmarkDataError naming the file and column."""
    import pyarrow as pa
    missing = [c for c in FIELDS if c not in schema.names]
    if missing:
        raise BenchmarkDataError(f"{path}: missing column(s) {missing}; GEdit-Bench rows have {list(FIELDS)}")
    for name in FIELDS:
        t = schema.field(name).type
        if name in IMAGE_COLUMNS:
            ok, want = _is_image_struct(t), "an Image struct<bytes: binary, path: string>"
        elif name == "Intersection_exist":
            ok, want = pa.types.is_boolean(t), "bool"
        else:
            ok, want = _is_text(t), "string"
        if not ok:
            raise BenchmarkDataError(f"{path}: column {name!r} has type {t}, expected {want}")


@dataclass
class Table:
    """One data file of the snapshot: its row count and a way to stream its GEdit columns."""

    path: Path
    num_rows: int
    _batches: Any = field(repr=False)

    def rows(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        batches = iter(self._batches())
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:  # a damaged page shows only when it is read
                raise BenchmarkDataError(f"{self.path}: unreadable data ({e})") from None
            if batch is None:
                return
            yield from batch.to_pylist()


def open_table(path: Path) -> Table:
    """Open a parquet or `datasets` Arrow file, check its schema, read only the GEdit columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            check_schema(pf.schema_arrow, path)
            return Table(path, pf.metadata.num_rows,
                         lambda: pf.iter_batches(batch_size=BATCH_ROWS, columns=list(FIELDS)))
        source = pa.memory_map(str(path))  # zero-copy: only the rows being extracted are paged in
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        check_schema(reader.schema, path)
        table = reader.read_all().select(list(FIELDS))
        return Table(path, table.num_rows, lambda: table.to_batches(max_chunksize=BATCH_ROWS))
    except (pa.ArrowException, OSError) as e:
        raise BenchmarkDataError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from None


def image_file(value: Any, column: str, where: str, table_path: Path, cache: ImageCache) -> Path:
    """A file holding one `Image` cell: its bytes extracted to the cache, or its path (relative to the
    data file) when the bytes are null."""
    if not isinstance(value, dict):
        raise BenchmarkDataError(f"{where}: column {column!r} is null")
    data, rel = value.get("bytes"), value.get("path")
    if data:
        return cache.store(data, where, column)
    if rel:
        path = Path(rel) if Path(rel).is_absolute() else table_path.parent / rel
        if not path.is_file():
            raise BenchmarkDataError(f"{where}: column {column!r} has no bytes and its path names {path}, "
                                     "which does not exist")
        _image_suffix(path.read_bytes(), where, column, cache.max_pixels)
        return path
    raise BenchmarkDataError(f"{where}: column {column!r} has neither image bytes nor a path")


class GEditBenchmark(Benchmark):
    name = "gedit"

    def __init__(self, languages: Sequence[str] = LANGUAGES, image_cache: str | Path | None = None):
        super().__init__()
        unknown = [lang for lang in languages if lang not in LANGUAGES]
        if unknown:
            raise ValueError(f"gedit: unknown language(s) {unknown}; choose from {list(LANGUAGES)}")
        self.languages = tuple(languages)
        self.image_cache = Path(image_cache) if image_cache is not None else None
        self.cache: ImageCache | None = None  # after loading a snapshot: where its images went, and counts

    def load(self, data_dir: str | Path | None) -> "GEditBenchmark":
        """Read the hub snapshot (a folder, or one parquet / Arrow file) or a metadata.jsonl export."""
        if data_dir is None:
            raise BenchmarkDataError("gedit: --data must name a local copy of GEdit-Bench (the hub snapshot "
                                     f"folder with its parquet files, one such file, or a folder with {METADATA})")
        root = Path(data_dir)
        if root.is_file():
            if root.suffix not in TABLE_SUFFIXES:
                raise BenchmarkDataError(f"gedit: {root} is not a {' or '.join(TABLE_SUFFIXES)} file")
            return self._load_tables(root, [root], root.parent)
        if not root.is_dir():
            raise BenchmarkDataError(f"gedit: {root} does not exist")
        if (root / METADATA).is_file():
            return self._load_jsonl(root)
        tables = find_tables(root)
        if not tables:
            raise BenchmarkDataError(f"gedit: {root} holds no {METADATA} and no {' or '.join(TABLE_SUFFIXES)} "
                                     "files; give the stepfun-ai/GEdit-Bench snapshot folder (see eval/README.md)")
        return self._load_tables(root, tables, root)

    def _accept(self, rec: dict[str, Any], where: str, seen: dict[tuple[str, str], str], noun: str) -> bool:
        """Check a row's values and key; True when its language is one being evaluated."""
        if rec["task_type"] not in TASK_TYPES:
            raise BenchmarkDataError(f"{where}: {noun} 'task_type' is {rec['task_type']!r}; "
                                     f"GEdit-Bench has {list(TASK_TYPES)}")
        if rec["instruction_language"] not in LANGUAGES:
            raise BenchmarkDataError(f"{where}: {noun} 'instruction_language' is "
                                     f"{rec['instruction_language']!r}, expected one of {list(LANGUAGES)}")
        output_name(self.name, rec["key"], where, "key")
        output_name(self.name, f"{rec['key']}{SOURCE_SUFFIX}", where, "key")  # <key>_SRCIMG.png must be one name too
        key = (rec["key"], rec["instruction_language"])
        if key in seen:
            raise BenchmarkDataError(f"{where}: key {rec['key']!r} ({rec['instruction_language']}) appears twice "
                                     f"(first at {seen[key]})")
        seen[key] = where
        return rec["instruction_language"] in self.languages

    def _sample(self, rec: dict[str, Any], judged: Path, raw: Path) -> BenchSample:
        # the model edits input_image_raw; the judge sees input_image
        return BenchSample(f"{rec['key']}_{rec['instruction_language']}", rec["task_type"], rec["instruction"],
                           [raw], rec["instruction_language"],
                           {"key": rec["key"], "intersection": rec["Intersection_exist"], "input_image": str(judged)})

    def _finish(self, samples: list[BenchSample], root: Path, source: Path) -> "GEditBenchmark":
        if not samples:
            raise BenchmarkDataError(f"gedit: {source} has no samples in {list(self.languages)}")
        self._samples, self.data_dir = samples, root
        return self

    def _load_jsonl(self, root: Path) -> "GEditBenchmark":
        meta_path = root / METADATA
        samples: list[BenchSample] = []
        seen: dict[tuple[str, str], str] = {}
        with open(meta_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta_path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BenchmarkDataError(f"{where}: not valid JSON ({e.msg})") from None
                require(rec, FIELDS, where, {"Intersection_exist": bool})
                if not self._accept(rec, where, seen, "field"):
                    continue
                judged = existing_file(root, rec["input_image"], where, "input_image")
                raw = existing_file(root, rec["input_image_raw"], where, "input_image_raw")
                samples.append(self._sample(rec, judged, raw))
        return self._finish(samples, root, meta_path)

    def _load_tables(self, root: Path, paths: list[Path], cache_parent: Path) -> "GEditBenchmark":
        tables = [open_table(p) for p in paths]  # every schema checked before any image is written
        total = sum(t.num_rows for t in tables)
        cache = ImageCache(self.image_cache or cache_parent / CACHE_DIRNAME, self.max_pixels)
        log.info("gedit: reading %d rows from %d file(s) under %s; images go to %s",
                 total, len(tables), root, cache.folder)
        samples: list[BenchSample] = []
        seen: dict[tuple[str, str], str] = {}
        done, last = 0, time.monotonic()
        for table in tables:
            for index, rec in enumerate(table.rows()):
                where = f"{table.path} row {index}"
                if rec["key"] is None:
                    raise BenchmarkDataError(f"{where}: column 'key' is null")
                where = f"{where} (key {rec['key']!r})"
                for name in FIELDS:
                    if rec[name] is None:
                        raise BenchmarkDataError(f"{where}: column {name!r} is null")
                if self._accept(rec, where, seen, "column"):
                    judged = image_file(rec["input_image"], "input_image", where, table.path, cache)
                    raw = image_file(rec["input_image_raw"], "input_image_raw", where, table.path, cache)
                    samples.append(self._sample(rec, judged, raw))
                done += 1
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    log.info("gedit: %d/%d rows read; %d images extracted, %d already in the cache",
                             done, total, cache.written, cache.reused)
        log.info("gedit: %d samples from %d rows; %d images extracted, %d already in %s",
                 len(samples), done, cache.written, cache.reused, cache.folder)
        self.cache = cache
        return self._finish(samples, root, root)

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return output_file(images_dir, model_name, "fullset", sample.category, sample.language,
                           f"{sample.meta['key']}.png")

    def companion_files(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> dict[Path, Path]:
        """`<key>_SRCIMG.png` beside the edit: the judged source image (input_image), which the official scorer
        opens as the first image and skips the sample without."""
        return {output_file(images_dir, model_name, "fullset", sample.category, sample.language,
                            f"{sample.meta['key']}{SOURCE_SUFFIX}"): Path(sample.meta["input_image"])}

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        source = Path(sample.meta["input_image"])
        return [
            JudgeQuery("semantic_consistency", SC_PROMPT.format(instruction=sample.instruction),
                       [source, Path(edited_path)], ("sc_instruction", "sc_overedit"), "score_list", (0, 10)),
            JudgeQuery("perceptual_quality", PQ_PROMPT, [Path(edited_path)],
                       ("pq_naturalness", "pq_artifacts"), "score_list", (0, 10)),
        ]

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Per language, for the full set and the intersection subset: SC, PQ, O per task type (all 11, None
        where none is scored) and their mean over the 11 task types, None unless every one has a value (as the
        official np.mean gives NaN); beside it, ours: the mean over the task types that have one."""
        per_sample = {id(r): sample_scores(r.scores) for r in ok_only(results)}

        def metrics(rs: Sequence[SampleResult]) -> dict[str, float | None]:
            vals = [per_sample[id(r)] for r in rs if id(r) in per_sample]
            return {"SC": mean(v[0] for v in vals), "PQ": mean(v[1] for v in vals), "O": mean(v[2] for v in vals)}

        sections = {}
        for lang in LANGUAGES:
            in_lang = [r for r in results if r.language == lang]
            if not in_lang:
                continue
            for subset, keep in (("fullset", lambda r: True), ("intersection", lambda r: r.meta.get("intersection"))):
                rs = [r for r in in_lang if keep(r)]
                by_type = group_by(rs, lambda r: r.category)
                rows = {t: row(by_type.get(t, []), metrics(by_type.get(t, []))) for t in TASK_TYPES}
                overall: dict[str, Any] = {}
                for m in ("SC", "PQ", "O"):
                    values = [v[m] for v in rows.values()]
                    overall[m] = mean(values) if all(x is not None for x in values) else None
                for m in ("SC", "PQ", "O"):
                    overall[f"{m}_over_scored_types"] = mean(v[m] for v in rows.values() if v[m] is not None)
                overall["task_types_scored"] = sum(v["O"] is not None for v in rows.values())
                sections[f"{lang}/{subset}"] = {"overall": overall, "by_category": rows}
        return {
            "benchmark": self.name, "metrics": ["SC", "PQ", "O"], "primary": "O",
            "counts": total_counts(results), "sections": sections,
            "notes": ["per sample: SC = min(2 semantic sub-scores), PQ = min(2 quality sub-scores), O = sqrt(SC*PQ)",
                      "overall: the mean over the 11 task types of each task type's mean (scored samples only); "
                      "n/a when a task type has no scored sample, as calculate_statistics.py gives NaN",
                      "<metric>_over_scored_types (ours): the mean over the task types that have a scored sample; "
                      "task_types_scored: how many of the 11 do"],
        }


__all__ = ["FIELDS", "GEditBenchmark", "ImageCache", "LANGUAGES", "TASK_TYPES", "find_tables", "sample_scores"]
