"""KRIS-Bench (1,267 samples in 20 category folders), judged on a 1-5 scale and normalised to 0-100.

Local copy: `<data>/<category>/annotation.json` for each of the 20 categories, {image_id: {"ori_img":
a file name or a list of them, "gt_img", "ins_en", "explain_en"}} with the images beside it. Outputs go
where the official scripts read them: `<images>/<model>/<category>/<image_id>.jpg` (the `metrics_*.py` of
mercurystraw/Kris_Bench open `results/<model>/<category>/<image_id>.jpg` only), written as JPEG at quality
95; `ext="png"` writes lossless `<image_id>.png` instead, which EditThinker's copy of those scripts opens
(`<results_dir>/<category>/<image_id>.png`, with `--results_dir <images>/<model>`).

Metrics: visual consistency (VC), visual quality (VQ), instruction following (IF) and, for the 10
knowledge categories only, knowledge plausibility (KP). Each value is normalised as (s - 1) * 25.
A category's, a type's or a group's AVG, and the overall score, are the flat mean of every normalised
value in it (as the official summary computes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, JudgeQuery, SampleResult, existing_file,
                         mean, ok_only, output_name, read_json, require, total_counts, counts)
from reasonedit.paths import output_file

TYPES = {
    "Attribute Perception": ("count_change", "color_change", "size_adjustment", "part_completion", "anomaly_correction"),
    "Spatial Perception": ("viewpoint_change", "position_movement"),
    "Temporal Prediction": ("temporal_prediction",),
    "Social Science": ("humanities", "practical_knowledge"),
    "Natural Science": ("biology", "chemistry", "geography", "medicine", "mathematics", "physics"),
    "Logical Reasoning": ("abstract_reasoning", "rule-based_reasoning"),
    "Instruction Decomposition": ("multi-element_composition", "multi-instruction_execution"),
}
GROUPS = {
    "Factual Knowledge": ("Attribute Perception", "Spatial Perception", "Temporal Prediction"),
    "Conceptual Knowledge": ("Social Science", "Natural Science"),
    "Procedural Knowledge": ("Logical Reasoning", "Instruction Decomposition"),
}
CATEGORIES = tuple(c for cats in TYPES.values() for c in cats)
KNOWLEDGE = frozenset(TYPES["Social Science"] + TYPES["Natural Science"] + TYPES["Logical Reasoning"])
TYPE_OF = {c: t for t, cats in TYPES.items() for c in cats}
GROUP_OF = {t: g for g, types in GROUPS.items() for t in types}
METRIC_NAMES = {"consistency_score": "VC", "quality_score": "VQ", "instruction_score": "IF", "knowledge_score": "KP"}

# Our wording; the reply format (a JSON object with the score under the official key) is KRIS-Bench's.
# doubled braces: the prompts below are .format()-ed once more with the sample's fields
_JSON = 'Reply with JSON only: {{{{"{key}": <integer 1-5>, "reasoning": "<one or two sentences>"}}}}'
CONSISTENCY_PROMPT = """You judge an image edit. The images before the last are the input; the last image is \
the edited result. The instruction was:

"{instruction}"

Rate from 1 to 5 how well the edited image keeps everything the instruction did not ask to change \
(identity, layout, background, style): 5 = nothing else changed, 1 = the unrelated content is lost.
""" + _JSON.format(key="consistency_score")

INSTRUCTION_PROMPT = """You judge an image edit. The images before the last are the input{gt_note}; the last \
image is the edited result. The instruction was:

"{instruction}"
{explanation}
Rate from 1 to 5 how completely and correctly the edited image carries out the instruction: 5 = exactly \
as asked, 1 = not done or wrong.
""" + _JSON.format(key="instruction_score")

KNOWLEDGE_PROMPT = """You judge an image edit that needs world knowledge. The first image is the input; the \
last image is the edited result. The instruction was:

"{instruction}"
{explanation}
Give two scores from 1 to 5: "instruction_score", how completely and correctly the edit carries out the \
instruction; "knowledge_score", how plausible the result is given the facts or rules the instruction \
relies on (5 = fully consistent with them, 1 = contradicts them).
Reply with JSON only: {{"instruction_score": <1-5>, "knowledge_score": <1-5>, "reasoning": "<one or two sentences>"}}"""

QUALITY_PROMPT = ("""You judge the visual quality of one generated image, ignoring what it depicts. Rate from \
1 to 5 how natural and free of artifacts (distortions, smears, broken textures, odd seams) it is: \
5 = flawless, 1 = severely broken.
""" + _JSON.format(key="quality_score")).format()


def normalise(score: float) -> float:
    """KRIS-Bench's 0-100 scale: 1 -> 0, 5 -> 100."""
    return (score - 1) * 25


def sample_values(result: SampleResult) -> dict[str, float]:
    """The normalised metric values a sample contributes, by short name (KP only in knowledge categories)."""
    out = {}
    for key, short in METRIC_NAMES.items():
        if key == "knowledge_score" and result.category not in KNOWLEDGE:
            continue
        out[short] = normalise(result.scores[key])
    return out


EXTENSIONS = {"jpg": "the official scripts (mercurystraw/Kris_Bench metrics_*.py)",
              "png": "EditThinker's copy of them (appletea233/EditThinker eval/kris)"}


class KrisBenchmark(Benchmark):
    name = "kris"

    def __init__(self, categories: Sequence[str] | None = None, ext: str = "jpg"):
        super().__init__()
        if ext not in EXTENSIONS:
            raise ValueError(f"kris: output extension {ext!r}: choose jpg ({EXTENSIONS['jpg']}) or png "
                             f"({EXTENSIONS['png']})")
        self.ext = ext
        self.official_extensions = (f".{ext}",)
        unknown = [c for c in categories or () if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"kris: unknown categories {unknown}; KRIS-Bench has {list(CATEGORIES)}")
        self.categories = tuple(categories) if categories else CATEGORIES

    def load(self, data_dir: str | Path | None) -> "KrisBenchmark":
        if data_dir is None:
            raise BenchmarkDataError("kris: --data must name a local copy of KRIS-Bench (20 category folders)")
        root = Path(data_dir)
        if not root.is_dir():
            raise BenchmarkDataError(f"kris: {root} is not a directory")
        missing = [c for c in self.categories if not (root / c).is_dir()]
        if missing:
            raise BenchmarkDataError(f"kris: {root} lacks the category folder(s) {missing}")
        samples = []
        for cat in self.categories:
            ann_path = root / cat / "annotation.json"
            ann = read_json(ann_path, f"kris category {cat}")
            if not isinstance(ann, dict) or not ann:
                raise BenchmarkDataError(f"{ann_path}: expected an object {{image_id: annotation}}")
            for image_id, rec in ann.items():
                output_name(self.name, image_id, ann_path, "image_id")
                samples.append(self._sample(root / cat, cat, str(image_id), rec, f"{ann_path}: sample {image_id}"))
        self._samples, self.data_dir = samples, root
        return self

    def _sample(self, folder: Path, cat: str, image_id: str, rec: Any, where: str) -> BenchSample:
        require(rec, ("ori_img", "ins_en"), where, {"ins_en": str})
        names = rec["ori_img"] if isinstance(rec["ori_img"], list) else [rec["ori_img"]]
        if not names or not all(isinstance(n, str) for n in names):
            raise BenchmarkDataError(f"{where}: field 'ori_img' must be a file name or a list of them, got {rec['ori_img']!r}")
        sources = [existing_file(folder, n, where, "ori_img") for n in names]
        meta: dict[str, Any] = {"image_id": image_id, "type": TYPE_OF[cat], "group": GROUP_OF[TYPE_OF[cat]],
                                "knowledge": cat in KNOWLEDGE, "explanation": rec.get("explain_en") or ""}
        if cat == "viewpoint_change":
            require(rec, ("gt_img",), where, {"gt_img": str})
        if isinstance(rec.get("gt_img"), str) and rec["gt_img"]:
            meta["gt_image"] = str(existing_file(folder, rec["gt_img"], where, "gt_img"))
        return BenchSample(f"{cat}/{image_id}", cat, rec["ins_en"], sources, "en", meta)

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return output_file(images_dir, model_name, sample.category, f"{sample.meta['image_id']}.{self.ext}")

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        edited = Path(edited_path)
        explanation = f'Background for the judge: "{sample.meta["explanation"]}"\n' if sample.meta["explanation"] else ""
        queries = [JudgeQuery("consistency", CONSISTENCY_PROMPT.format(instruction=sample.instruction),
                              [*sample.sources, edited], ("consistency_score",), "score_fields", (1, 5))]
        if sample.meta["knowledge"]:
            queries.append(JudgeQuery("instruction_knowledge",
                                      KNOWLEDGE_PROMPT.format(instruction=sample.instruction, explanation=explanation),
                                      [*sample.sources, edited], ("instruction_score", "knowledge_score"),
                                      "score_fields", (1, 5)))
        else:
            refs = list(sample.sources)
            gt_note = ""
            if sample.category == "viewpoint_change":
                refs.append(Path(sample.meta["gt_image"]))
                gt_note = " followed by a reference of the expected view"
            if sample.category != "anomaly_correction":
                explanation = ""  # the official protocol shows the explanation only for anomaly correction
            queries.append(JudgeQuery("instruction", INSTRUCTION_PROMPT.format(
                instruction=sample.instruction, explanation=explanation, gt_note=gt_note),
                [*refs, edited], ("instruction_score",), "score_fields", (1, 5)))
        queries.append(JudgeQuery("quality", QUALITY_PROMPT, [edited], ("quality_score",), "score_fields", (1, 5)))
        return queries

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        values = {id(r): sample_values(r) for r in ok_only(results)}

        def metrics(rs: Sequence[SampleResult], per_metric: bool = True) -> dict[str, float | None]:
            vals = [values[id(r)] for r in rs if id(r) in values]
            out: dict[str, float | None] = {}
            if per_metric:
                for short in METRIC_NAMES.values():
                    out[short] = mean(v[short] for v in vals if short in v)
            out["AVG"] = mean(x for v in vals for x in v.values())
            return out

        def section(key, names) -> dict[str, dict]:
            rows = {}
            for name in names:
                rs = [r for r in results if key(r) == name]
                if rs:
                    rows[name] = {**metrics(rs), **counts(rs)}
            return rows

        overall = metrics(results)
        return {
            "benchmark": self.name, "metrics": ["AVG", "VC", "VQ", "IF", "KP"], "primary": "AVG",
            "counts": total_counts(results),
            "sections": {
                "categories": {"overall": overall, "by_category": section(lambda r: r.category, CATEGORIES)},
                "types": {"overall": overall, "by_category": section(lambda r: TYPE_OF[r.category], TYPES)},
                "groups": {"overall": overall, "by_category": section(lambda r: GROUP_OF[TYPE_OF[r.category]], GROUPS)},
            },
            "notes": ["each 1-5 score is normalised as (s - 1) * 25; KP only in the knowledge categories",
                      "AVG and the overall score: the flat mean of every normalised value (scored samples only)"],
        }


__all__ = ["CATEGORIES", "EXTENSIONS", "GROUPS", "KNOWLEDGE", "KrisBenchmark", "TYPES", "normalise", "sample_values"]
