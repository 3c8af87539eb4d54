"""RISEBench (360 samples: temporal 85, causal 90, spatial 100, logical 85), judged per sub-dimension.

Local copy: a directory with the benchmark's JSON list (`datav2_total_w_subtask.json`; each item has
index, category, instruction, image, and reference text or reference_img / reference_txt, optionally
reasoning_img, consistency_free, subtask) and the image folders it names. Outputs go where
`gpt_eval.py` reads them: `<images>/<model>/images/<category>/<index>.png`.

Sub-scores: appearance consistency, reasoning and (not for logical tasks) visual plausibility, each
1-5; logical tasks are judged 0/1 and mapped to 1/5 (4 * s + 1). A sample is solved when every
applicable sub-score is 5; consistency-free samples are not judged on consistency and are solved
without it (as `gpt_eval.py` does since commit ce8cba37). Per category, subtask and overall: accuracy
= solved / all samples (missing and failed count as unsolved, as the official script counts a reply it
cannot read), the accuracy over scored samples beside it, the official weighted score (`calculate_score`)
and the sub-dimensions as 25 * (mean - 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, JudgeQuery, SampleResult, existing_file,
                         group_by, mean, ok_only, output_name, read_json, require, row, total_counts)
from reasonedit.paths import output_file

CATEGORIES = ("temporal_reasoning", "causal_reasoning", "spatial_reasoning", "logical_reasoning")
DATA_FILES = ("datav2_total_w_subtask.json", "data.json")
SUBSCORES = ("consistency", "reasoning", "plausibility")

# Our wording; the reply format (a closing "Final Score: N" line) is RISEBench's.
_CLOSE = "End your reply with one line: Final Score: <number>"
CONSISTENCY_PROMPT = """The first image is the input; the second is the output of an edit asked for with:

"{instruction}"

Ignoring whether the requested change itself is right, rate from 1 to 5 how well the output keeps the \
appearance of everything the instruction does not concern (objects, identity, layout, background, style): \
5 = fully kept, 1 = unrecognisable.
""" + _CLOSE

CONSISTENCY_BINARY_PROMPT = """The first image is the input of a puzzle task; the second is the output \
produced for:

"{instruction}"

Answer 1 if the output keeps the puzzle's given content (grid, existing marks, layout) unchanged apart \
from the answer it adds, 0 otherwise.
""" + _CLOSE

REASONING_PROMPT = """An image was edited with this instruction, which needs reasoning to carry out:

"{instruction}"

The correct outcome is described as: "{reference}"
{images_note}
Rate from 1 to 5 how well the output image shows that correct outcome: 5 = exactly, 1 = wrong or not \
attempted.
""" + _CLOSE

REASONING_IMAGE_PROMPT = """An image was edited with this instruction, which needs reasoning to carry out:

"{instruction}"

The first image shows the correct outcome; the second is the output. Rate from 1 to 5 how well the \
output matches the correct outcome in what the instruction asks for: 5 = exactly, 1 = wrong.
""" + _CLOSE

LOGICAL_TEXT_PROMPT = """The image is the output for this puzzle:

"{instruction}"

The correct answer is: "{reference}". Answer 1 if the image shows exactly that answer, 0 otherwise.
""" + _CLOSE

LOGICAL_IMAGE_PROMPT = """The first image shows the correct solution of this puzzle; the second is the output:

"{instruction}"

Answer 1 if the output shows the same solution, 0 otherwise.
""" + _CLOSE

PLAUSIBILITY_PROMPT = """Rate from 1 to 5 how visually plausible this generated image is: realistic \
structure, lighting and detail, free of distortions and artifacts (5 = flawless, 1 = badly broken).
""" + _CLOSE


def _present(rec: dict, field: str) -> bool:
    v = rec.get(field)
    return v is not None and v != "" and not (isinstance(v, float) and v != v)  # NaN from spreadsheets


def _flag(rec: dict, field: str) -> bool:
    """The official test of a flag field (`field in item and not pd.isna(item[field])`): set by any value that is
    not null or NaN, even false or ""."""
    v = rec.get(field)
    return field in rec and v is not None and not (isinstance(v, float) and v != v)


def _weighed_without_consistency(rec: dict, field_in_file: bool) -> bool:
    """Whether the official `calculate_score` weighs a sample 0.2 * plausibility + 0.8 * reasoning. It tests
    `'consistency_free' in row and row['consistency_free']` on a pandas row: once any item of the file has the
    field, an item without it holds NaN there, which is true, so it is weighed without consistency too; an
    explicit null (None) or false is false. Read from the code, not run (pandas is not installed here)."""
    if not field_in_file:
        return False
    if "consistency_free" not in rec:
        return True  # NaN
    return bool(rec["consistency_free"])


def mapped(result: SampleResult) -> dict[str, float]:
    """The sub-scores of a sample on the 1-5 scale (binary logical judgements become 1 or 5)."""
    out = {}
    for k in SUBSCORES:
        if k in result.scores:
            v = result.scores[k]
            out[k] = 4 * min(v, 1) + 1 if result.meta.get("binary") else v
    return out


def solved(result: SampleResult) -> bool:
    """Full marks on every applicable sub-score (consistency-free samples skip consistency). The official script
    exempts consistency-free samples of the three non-logical categories; a consistency-free logical sample stops
    it (it reads a third judgement logical samples never get), so exempting those too is our choice, unverified."""
    needed = ["reasoning"]
    if not result.meta.get("consistency_free"):
        needed.append("consistency")
    if result.category != "logical_reasoning":
        needed.append("plausibility")
    s = mapped(result)
    missing = [k for k in needed if k not in s]
    if missing:
        raise ValueError(f"rise sample {result.key}: no {missing} score although its status is ok")
    return all(s[k] == 5 for k in needed)


def percent(m: float | None) -> float | None:
    return None if m is None else 25 * (m - 1)


def weighted_score(result: SampleResult, without_consistency: bool) -> float | None:
    """RISEBench's weighted score of one sample (`calculate_score`, 1-5): 0.3 * consistency + 0.5 * reasoning +
    0.2 * plausibility, or 0.2 * plausibility + 0.8 * reasoning `without_consistency`; logical 0.3 * consistency +
    0.7 * reasoning (mapped to 1-5); halved, at least 1, when reasoning is 1. None where the official value is NaN
    (a sample weighed with a consistency it was not judged on)."""
    s = mapped(result)
    r = s["reasoning"]
    if result.category == "logical_reasoning" or not without_consistency:
        if "consistency" not in s:
            return None
        value = 0.3 * s["consistency"] + 0.7 * r if result.category == "logical_reasoning" \
            else 0.3 * s["consistency"] + 0.5 * r + 0.2 * s["plausibility"]
    else:
        value = 0.2 * s["plausibility"] + 0.8 * r
    return max(1.0, 0.5 * value) if r == 1 else value


class RiseBenchmark(Benchmark):
    name = "rise"
    official_extensions = (".png", ".jpg", ".jpeg")  # gpt_eval.py find_image tries these in turn

    def __init__(self, data_json: str | None = None):
        super().__init__()
        self.data_json = data_json

    def _data_file(self, root: Path) -> Path:
        if self.data_json:
            return root / self.data_json
        for n in DATA_FILES:
            if (root / n).is_file():
                return root / n
        found = sorted(root.glob("*.json"))
        if len(found) == 1:
            return found[0]
        raise BenchmarkDataError(f"rise: cannot tell which JSON in {root} is the benchmark "
                                 f"(looked for {', '.join(DATA_FILES)}; found {[p.name for p in found]}); "
                                 f"name it with data_json")

    def load(self, data_dir: str | Path | None) -> "RiseBenchmark":
        if data_dir is None:
            raise BenchmarkDataError("rise: --data must name a local copy of RISEBench (its JSON and image folders)")
        root = Path(data_dir)
        if not root.is_dir():
            raise BenchmarkDataError(f"rise: {root} is not a directory")
        path = self._data_file(root)
        items = read_json(path, "rise data file")
        if not isinstance(items, list) or not items:
            raise BenchmarkDataError(f"{path}: expected a non-empty list of samples")
        samples, seen = [], set()
        field_in_file = any(isinstance(rec, dict) and "consistency_free" in rec for rec in items)
        for i, rec in enumerate(items):
            where = f"{path}: item {i}"
            require(rec, ("index", "category", "instruction", "image"), where,
                    {"instruction": str, "image": str, "index": (str, int)})
            cat = rec["category"]
            if cat not in CATEGORIES:
                raise BenchmarkDataError(f"{where}: field 'category' is {cat!r}; RISEBench has {list(CATEGORIES)}")
            index = output_name(self.name, rec["index"], where, "index")
            if index in seen:  # 7 and "7" name the same file
                raise BenchmarkDataError(f"{where}: index {rec['index']!r} appears twice")
            seen.add(index)
            meta: dict[str, Any] = {"index": index, "subtask": rec.get("subtask"),
                                    "consistency_free": _flag(rec, "consistency_free"),
                                    "weighed_without_consistency": _weighed_without_consistency(rec, field_in_file),
                                    "binary": cat == "logical_reasoning",
                                    "reasoning_img": _flag(rec, "reasoning_img")}
            if _present(rec, "reference_img"):
                meta["reference_image"] = str(existing_file(root, rec["reference_img"], where, "reference_img"))
            ref_field = "reference_txt" if cat == "logical_reasoning" else "reference"
            if _present(rec, ref_field):
                meta["reference_text"] = str(rec[ref_field])
            if "reference_image" not in meta and "reference_text" not in meta:
                raise BenchmarkDataError(f"{where}: needs {ref_field!r} or 'reference_img'")
            source = existing_file(root, rec["image"], where, "image")
            samples.append(BenchSample(f"{cat}/{index}", cat, rec["instruction"], [source], "en", meta))
        self._samples, self.data_dir = samples, root
        return self

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return output_file(images_dir, model_name, "images", sample.category, f"{sample.meta['index']}.png")

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        edited, source, m = Path(edited_path), sample.sources[0], sample.meta
        ins, logical = sample.instruction, sample.category == "logical_reasoning"
        queries = []
        if not m["consistency_free"]:
            if logical:
                queries.append(JudgeQuery("consistency", CONSISTENCY_BINARY_PROMPT.format(instruction=ins),
                                          [source, edited], ("consistency",), "final_score", (0, 1), integers=True))
            else:
                queries.append(JudgeQuery("consistency", CONSISTENCY_PROMPT.format(instruction=ins),
                                          [source, edited], ("consistency",), "final_score", (1, 5)))
        if logical:
            if "reference_text" in m:
                queries.append(JudgeQuery("reasoning", LOGICAL_TEXT_PROMPT.format(instruction=ins, reference=m["reference_text"]),
                                          [edited], ("reasoning",), "final_score", (0, 1), integers=True))
            else:
                queries.append(JudgeQuery("reasoning", LOGICAL_IMAGE_PROMPT.format(instruction=ins),
                                          [Path(m["reference_image"]), edited], ("reasoning",), "final_score", (0, 1),
                                          integers=True))
            return queries
        if "reference_image" in m and (sample.category == "spatial_reasoning" or "reference_text" not in m):
            queries.append(JudgeQuery("reasoning", REASONING_IMAGE_PROMPT.format(instruction=ins),
                                      [Path(m["reference_image"]), edited], ("reasoning",), "final_score", (1, 5)))
        elif m["reasoning_img"]:
            queries.append(JudgeQuery("reasoning", REASONING_PROMPT.format(
                instruction=ins, reference=m.get("reference_text", ""),
                images_note="The first image is the input; the second is the output.\n"),
                [source, edited], ("reasoning",), "final_score", (1, 5)))
        else:
            queries.append(JudgeQuery("reasoning", REASONING_PROMPT.format(
                instruction=ins, reference=m.get("reference_text", ""), images_note="The image is the output.\n"),
                [edited], ("reasoning",), "final_score", (1, 5)))
        queries.append(JudgeQuery("plausibility", PLAUSIBILITY_PROMPT, [edited], ("plausibility",), "final_score", (1, 5)))
        return queries

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        ok = ok_only(results)
        done = {id(r): solved(r) for r in ok}
        subs = {id(r): mapped(r) for r in ok}
        official = {id(r): weighted_score(r, bool(r.meta.get("weighed_without_consistency"))) for r in ok}
        own = {id(r): weighted_score(r, bool(r.meta.get("consistency_free"))) for r in ok}

        def metrics(rs: Sequence[SampleResult]) -> dict[str, float | None]:
            scored = [r for r in rs if id(r) in done]
            score = mean(official[id(r)] for r in scored if official[id(r)] is not None)
            out = {"accuracy": 100.0 * sum(done[id(r)] for r in scored) / len(rs) if rs else None,
                   "accuracy_scored": mean(100.0 * done[id(r)] for r in scored),
                   "score_pct": percent(score)}
            for k in SUBSCORES:
                out[k] = percent(mean(subs[id(r)][k] for r in scored if k in subs[id(r)]))
            out["score"] = score
            out["score_pct_own_weights"] = percent(mean(own[id(r)] for r in scored if own[id(r)] is not None))
            return out

        by_cat = group_by(results, lambda r: r.category)
        overall = metrics(results)
        by_subtask = group_by(results, lambda r: f"{r.category}/{r.meta.get('subtask') or '-'}")
        return {
            "benchmark": self.name,
            "metrics": ["accuracy", "accuracy_scored", "score_pct", "consistency", "reasoning", "plausibility"],
            "primary": "accuracy", "counts": total_counts(results),
            "sections": {
                "all": {"overall": overall,
                        "by_category": {c: row(by_cat[c], metrics(by_cat[c])) for c in CATEGORIES if c in by_cat}},
                "subtasks": {"overall": overall,
                             "by_category": {k: row(v, metrics(v)) for k, v in sorted(by_subtask.items())}},
            },
            "notes": ["accuracy: solved / all samples, missing and failed counted as unsolved (as gpt_eval.py counts "
                      "a reply it cannot read); solved = full marks on every applicable sub-score",
                      "accuracy_scored (ours): solved / scored samples, missing and failed left out",
                      "score_pct: the official weighted score (calculate_score, 1-5, in 'score') as 25 * (score - 1), "
                      "scored samples only; it weighs every non-logical sample 0.2 * plausibility + 0.8 * reasoning "
                      "once the data file has a consistency_free field on any sample (see eval/README.md); "
                      "score_pct_own_weights (ours) drops consistency only for consistency-free samples",
                      "sub-dimensions: 25 * (mean - 1) of the 1-5 scores (logical 0/1 mapped to 1/5), scored samples only"],
        }


__all__ = ["CATEGORIES", "RiseBenchmark", "mapped", "solved", "weighted_score"]
