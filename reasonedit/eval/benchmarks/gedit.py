"""GEdit-Bench (606 English + 606 Chinese samples, 11 task types), scored the VIEScore way.

Local copy: a directory with `metadata.jsonl` (one row per sample with the dataset's fields key,
task_type, instruction, instruction_language, input_image, input_image_raw, Intersection_exist; the
two image fields are paths relative to the directory). Outputs go where the official scorer reads
them: `<images>/<model>/fullset/<task_type>/<language>/<key>.png`.

Per sample the judge gives two semantic-consistency sub-scores (source + edit) and two perceptual
quality sub-scores (edit alone), each 0-10: SC = min of its two, PQ = min of its two,
O = sqrt(SC * PQ). Means per task type, then the mean over the task types; per language; the
intersection subset beside the full set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, JudgeQuery, SampleResult, existing_file,
                         group_by, mean, ok_only, require, row, total_counts)

TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn", "zh")  # the dataset writes Chinese as "cn"; "zh" is accepted too
FIELDS = ("key", "task_type", "instruction", "instruction_language", "input_image", "input_image_raw",
          "Intersection_exist")
METADATA = "metadata.jsonl"

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


class GEditBenchmark(Benchmark):
    name = "gedit"

    def __init__(self, languages: Sequence[str] = LANGUAGES):
        super().__init__()
        unknown = [lang for lang in languages if lang not in LANGUAGES]
        if unknown:
            raise ValueError(f"gedit: unknown language(s) {unknown}; choose from {list(LANGUAGES)}")
        self.languages = tuple(languages)

    def load(self, data_dir: str | Path | None) -> "GEditBenchmark":
        if data_dir is None:
            raise BenchmarkDataError("gedit: --data must name a local copy of GEdit-Bench (a directory with metadata.jsonl)")
        root = Path(data_dir)
        meta_path = root / METADATA
        if not meta_path.is_file():
            raise BenchmarkDataError(f"gedit: {meta_path} does not exist; the directory must hold {METADATA} "
                                     f"with the fields {list(FIELDS)} (see eval/README.md)")
        samples, seen = [], set()
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
                if rec["task_type"] not in TASK_TYPES:
                    raise BenchmarkDataError(f"{where}: field 'task_type' is {rec['task_type']!r}; "
                                             f"GEdit-Bench has {list(TASK_TYPES)}")
                if rec["instruction_language"] not in LANGUAGES:
                    raise BenchmarkDataError(f"{where}: field 'instruction_language' is "
                                             f"{rec['instruction_language']!r}, expected one of {list(LANGUAGES)}")
                key = (rec["key"], rec["instruction_language"])
                if key in seen:
                    raise BenchmarkDataError(f"{where}: key {rec['key']!r} ({rec['instruction_language']}) appears twice")
                seen.add(key)
                if rec["instruction_language"] not in self.languages:
                    continue
                judged = existing_file(root, rec["input_image"], where, "input_image")
                raw = existing_file(root, rec["input_image_raw"], where, "input_image_raw")
                samples.append(BenchSample(
                    f"{rec['key']}_{rec['instruction_language']}", rec["task_type"], rec["instruction"], [raw],
                    rec["instruction_language"],
                    {"key": rec["key"], "intersection": rec["Intersection_exist"], "input_image": str(judged)}))
        if not samples:
            raise BenchmarkDataError(f"gedit: {meta_path} has no samples in {list(self.languages)}")
        self._samples, self.data_dir = samples, root
        return self

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return (Path(images_dir) / model_name / "fullset" / sample.category / sample.language
                / f"{sample.meta['key']}.png")

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        source = Path(sample.meta["input_image"])
        return [
            JudgeQuery("semantic_consistency", SC_PROMPT.format(instruction=sample.instruction),
                       [source, Path(edited_path)], ("sc_instruction", "sc_overedit"), "score_list", (0, 10)),
            JudgeQuery("perceptual_quality", PQ_PROMPT, [Path(edited_path)],
                       ("pq_naturalness", "pq_artifacts"), "score_list", (0, 10)),
        ]

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Per language, for the full set and the intersection subset: SC, PQ, O per task type and
        their mean over the task types present."""
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
                rows = {t: row(by_type[t], metrics(by_type[t])) for t in TASK_TYPES if t in by_type}
                overall = {m: mean(v[m] for v in rows.values() if v[m] is not None) for m in ("SC", "PQ", "O")}
                sections[f"{lang}/{subset}"] = {"overall": overall, "by_category": rows}
        return {
            "benchmark": self.name, "metrics": ["SC", "PQ", "O"], "primary": "O",
            "counts": total_counts(results), "sections": sections,
            "notes": ["per sample: SC = min(2 semantic sub-scores), PQ = min(2 quality sub-scores), O = sqrt(SC*PQ)",
                      "overall: the mean over task types of each task type's mean (scored samples only)"],
        }


__all__ = ["FIELDS", "GEditBenchmark", "LANGUAGES", "TASK_TYPES", "sample_scores"]
