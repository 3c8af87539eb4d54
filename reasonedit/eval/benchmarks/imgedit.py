"""ImgEdit-Bench, single turn (737 samples, 9 edit types), judged with the benchmark's own prompts.

Local copy: a directory with the edit file (`basic_edit.json`: {key: {"id", "prompt", "edit_type"}}),
the benchmark's judge prompt file ({edit_type: prompt with "<edit_prompt>"}) and the original images
under `id`. Outputs go where `basic_bench.py` reads them: `<images>/<model>/<key>.png`.

The judge sees the prompt for the sample's edit type, then the original and the edited image, and
answers three "<criterion>: <1-5>" lines. Per sample: the mean of the three, rounded to 2 decimals
(as `step1_get_avgscore.py` does); per edit type: the mean of those (`step2_typescore.py`); overall:
the mean of the type means, and beside it the mean over every sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..benchmark import (Benchmark, BenchmarkDataError, BenchSample, JudgeQuery, SampleResult, existing_file,
                         group_by, mean, ok_only, output_name, read_json, require, row, total_counts)
from reasonedit.paths import output_file

EDIT_FILES = ("basic_edit.json", "singleturn.json")
PROMPT_FILES = ("prompts.json", "judge_prompts.json", "basic_prompts.json")
METRICS = ("score_1", "score_2", "score_3")


def _first(root: Path, names: Sequence[str], given: str | None, what: str) -> Path:
    if given:
        path = root / given
        if not path.is_file():
            raise BenchmarkDataError(f"imgedit: {what} {path} does not exist")
        return path
    for n in names:
        if (root / n).is_file():
            return root / n
    raise BenchmarkDataError(f"imgedit: no {what} in {root} (looked for {', '.join(names)}); "
                             f"name it with the option that sets it")


def sample_mean(scores: dict[str, float]) -> float:
    """The per-sample score: the mean of the three judged criteria, rounded as the official step 1."""
    return round(sum(scores[m] for m in METRICS) / len(METRICS), 2)


class ImgEditBenchmark(Benchmark):
    name = "imgedit"

    def __init__(self, edit_json: str | None = None, prompts_json: str | None = None, images_root: str = "."):
        super().__init__()
        self.edit_json, self.prompts_json, self.images_root = edit_json, prompts_json, images_root
        self.prompts: dict[str, str] = {}

    def load(self, data_dir: str | Path | None) -> "ImgEditBenchmark":
        if data_dir is None:
            raise BenchmarkDataError("imgedit: --data must name a local copy of ImgEdit-Bench (basic_edit.json, "
                                     "the judge prompt file and the original images)")
        root = Path(data_dir)
        if not root.is_dir():
            raise BenchmarkDataError(f"imgedit: {root} is not a directory")
        edit_path = _first(root, EDIT_FILES, self.edit_json, "edit file")
        prompt_path = _first(root, PROMPT_FILES, self.prompts_json, "judge prompt file")
        edits, prompts = read_json(edit_path, "imgedit edit file"), read_json(prompt_path, "imgedit judge prompt file")
        if not isinstance(edits, dict) or not edits:
            raise BenchmarkDataError(f"{edit_path}: expected an object {{key: {{id, prompt, edit_type}}}}")
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise BenchmarkDataError(f"{prompt_path}: expected an object {{edit_type: prompt text}}")
        images = root / self.images_root
        samples = []
        for key, rec in edits.items():
            where = f"{edit_path}: sample {key}"
            output_name(self.name, key, edit_path, "key")
            require(rec, ("id", "prompt", "edit_type"), where, {"id": str, "prompt": str, "edit_type": str})
            if rec["edit_type"] not in prompts:
                raise BenchmarkDataError(f"{where}: edit_type {rec['edit_type']!r} has no prompt in {prompt_path} "
                                         f"(it has {sorted(prompts)})")
            if "<edit_prompt>" not in prompts[rec["edit_type"]]:
                raise BenchmarkDataError(f"{prompt_path}: the prompt for {rec['edit_type']!r} has no <edit_prompt> slot")
            source = existing_file(images, rec["id"], where, "id")
            samples.append(BenchSample(str(key), rec["edit_type"], rec["prompt"], [source], "en", {"id": rec["id"]}))
        self.prompts, self._samples, self.data_dir = dict(prompts), samples, root
        return self

    def output_path(self, images_dir: str | Path, sample: BenchSample, model_name: str) -> Path:
        return output_file(images_dir, model_name, f"{sample.key}.png")

    def judge_queries(self, sample: BenchSample, edited_path: Path) -> list[JudgeQuery]:
        prompt = self.prompts[sample.category].replace("<edit_prompt>", sample.instruction)
        return [JudgeQuery("imgedit", prompt, [sample.sources[0], Path(edited_path)], METRICS, "score_lines", (1, 5))]

    def score(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        per_sample = {id(r): sample_mean(r.scores) for r in ok_only(results)}

        def avg(rs: Sequence[SampleResult]) -> float | None:
            return mean(per_sample[id(r)] for r in rs if id(r) in per_sample)

        by_type = group_by(results, lambda r: r.category)
        rows = {t: row(rs, {"score": avg(rs)}) for t, rs in sorted(by_type.items())}
        type_mean = mean(v["score"] for v in rows.values() if v["score"] is not None)
        return {
            "benchmark": self.name, "metrics": ["score"], "primary": "score",
            "counts": total_counts(results),
            "sections": {"all": {"overall": {"score": type_mean, "sample_mean": avg(results)}, "by_category": rows}},
            "notes": ["per sample: mean of the three 1-5 criteria, rounded to 2 decimals",
                      "overall score: mean of the edit-type means; sample_mean: mean over every scored sample"],
        }


__all__ = ["ImgEditBenchmark", "METRICS", "sample_mean"]
