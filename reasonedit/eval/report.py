"""Reports of a benchmark run: a results JSON, markdown tables per category, PNG charts comparing modes.

Everything is stamped with the model (and the editor and thinker that made the images), the judge, its
temperature, the image resize policy and the counts of missing and failed samples, and written atomically
(a temporary file renamed into place). Given the per-sample results, report.md also counts and names the
failed samples by why they failed (`unscored`): a source image that cannot be read, an edited image that
cannot be read, no reply from the judge, a reply that did not parse; results.json holds the same counts.
`reports` everywhere is {mode: the report dict of `Benchmark.score`} (see `benchmark.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..publish import atomic_file, atomic_write_text
from .benchmark import FAILURES, SampleResult

FAILURE_TEXT = {"bad_source": "source image unreadable", "bad_image": "edited image unreadable",
                "not_judged": "not judged (the judge gave no reply; a rerun asks again)",
                "bad_reply": "judge reply did not parse"}
NAMED = 20  # failed samples named per kind in report.md; results.json has every one


@dataclass
class Stamp:
    """What produced the numbers; printed on every table and chart."""

    model: str
    judge: str | None = None  # judge model id, or "oracle"
    temperature: float | None = None
    resize_policy: str = "none"
    editor: str | None = None  # what edited, e.g. "shapes (exact, error rate 0.30)"; None: not recorded
    thinker: str | None = None  # what thought and reflected, e.g. "reasonedit-reasoner (runs/x/model)"

    def line(self, counts: Mapping[str, int] | None = None) -> str:
        judge = self.judge or "none"
        temp = "n/a" if self.temperature is None else f"{self.temperature:g}"
        text = f"model {self.model}"
        if self.editor is not None or self.thinker is not None:
            text += f" | editor {self.editor or 'n/a'} | thinker {self.thinker or 'none'}"
        text += f" | judge {judge} (temperature {temp}) | resize {self.resize_policy}"
        if counts is not None:
            text += (f" | {counts.get('total', 0)} samples, {counts.get('missing', 0)} missing, "
                     f"{counts.get('failed', 0)} failed")
        return text

    def to_dict(self) -> dict[str, Any]:
        """The stamp as results.json stores it (editor and thinker only when recorded)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("editor", "thinker")}


# -- atomic files ---------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def write_json(path: Path, doc: Any) -> Path:
    return write_text(path, json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


# -- tables ---------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def section_table(report: Mapping[str, Any], section: str) -> str:
    """One markdown table: a row per category, the report's metrics, then the sample counts."""
    sec = report["sections"][section]
    metrics = list(report["metrics"])
    head = ["category", *metrics, "n", "ok", "missing", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat, r in sec["by_category"].items():
        lines.append("| " + " | ".join([cat, *(_fmt(r.get(m)) for m in metrics),
                                        *(str(r.get(k, 0)) for k in ("n", "ok", "missing", "failed"))]) + " |")
    overall = sec["overall"]
    c = report["counts"]
    lines.append("| **overall** | " + " | ".join(_fmt(overall.get(m)) for m in metrics)
                 + f" | {c['total']} | {c['ok']} | {c['missing']} | {c['failed']} |")
    extra = {k: v for k, v in overall.items() if k not in metrics}
    if extra:
        lines.append("")
        lines.append("Also: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in extra.items()))
    return "\n".join(lines)


def unscored(results: Sequence[SampleResult]) -> dict[str, list[str]]:
    """The keys of the failed samples by why they failed (`FAILURES`, then "other"), only kinds that occur."""
    out: dict[str, list[str]] = {}
    for r in results:
        if r.status == "failed":
            out.setdefault(r.failure if r.failure in FAILURES else "other", []).append(r.key)
    return {k: out[k] for k in (*FAILURES, "other") if k in out}


def unscored_lines(results: Sequence[SampleResult]) -> list[str]:
    """Markdown bullets: how many samples failed for each reason, and which (the first NAMED of each)."""
    lines = []
    for kind, keys in unscored(results).items():
        named = ", ".join(keys[:NAMED]) + (f" and {len(keys) - NAMED} more" if len(keys) > NAMED else "")
        lines.append(f"- {len(keys)} {FAILURE_TEXT.get(kind, 'failed')}: {named}")
    return lines


def markdown(reports: Mapping[str, Mapping[str, Any]], stamp: Stamp,
             results: Mapping[str, Sequence[SampleResult]] | None = None) -> str:
    """Every mode's report as markdown: per section, a table per category; the stamp above each; with
    `results`, the failed samples counted and named by why they failed."""
    out = []
    for mode, report in reports.items():
        out.append(f"## {report['benchmark']}: {mode}\n")
        out.append(f"_{stamp.line(report['counts'])}_\n")
        failed = unscored_lines(results[mode]) if results is not None and mode in results else []
        if failed:
            out.append("Not scored:\n")
            out += failed
            out.append("")
        for section in report["sections"]:
            out.append(f"### {section}\n")
            out.append(section_table(report, section) + "\n")
        for note in report.get("notes", []):
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out)


def comparison_table(reports: Mapping[str, Mapping[str, Any]], section: str, metric: str | None = None) -> str:
    """Modes side by side: a row per category, a column per mode, one metric (the primary by default)."""
    first = next(iter(reports.values()))
    metric = metric or first["primary"]
    cats: list[str] = []
    for rep in reports.values():
        cats += [c for c in rep["sections"][section]["by_category"] if c not in cats]
    head = ["category", *reports]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat in cats:
        vals = [rep["sections"][section]["by_category"].get(cat, {}).get(metric) for rep in reports.values()]
        lines.append("| " + " | ".join([cat, *map(_fmt, vals)]) + " |")
    lines.append("| **overall** | " + " | ".join(_fmt(rep["sections"][section]["overall"].get(metric))
                                                  for rep in reports.values()) + " |")
    return f"{metric} ({section})\n\n" + "\n".join(lines)


def ablation_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper's ablation for the shapes benchmark: success and mean score per mode, on concrete and
    abstract instructions."""
    head = ["mode", "concrete success %", "concrete score", "abstract success %", "abstract score",
            "missing", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, rep in reports.items():
        if rep["benchmark"] != "shapes":
            raise ValueError(f"ablation_table: mode {mode!r} holds a {rep['benchmark']} report, not shapes")
        cats = rep["sections"]["all"]["by_category"]
        cells = [mode]
        for cat in ("concrete", "abstract"):
            r = cats.get(cat, {})
            cells += [_fmt(r.get("success")), _fmt(r.get("score"))]
        cells += [str(rep["counts"]["missing"]), str(rep["counts"]["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------------------------
def plot_modes(path: Path, reports: Mapping[str, Mapping[str, Any]], section: str, stamp: Stamp,
               metric: str | None = None) -> Path:
    """A PNG of grouped bars: one group per category, one bar per mode; stamped below the plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(reports.values()))
    metric = metric or first["primary"]
    cats: list[str] = []
    for rep in reports.values():
        cats += [c for c in rep["sections"][section]["by_category"] if c not in cats]
    cats.append("overall")
    width = 0.8 / max(len(reports), 1)
    fig = Figure(figsize=(max(6.0, 0.9 * len(cats) * max(1, len(reports)) ** 0.5 + 2), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (mode, rep) in enumerate(reports.items()):
        sec = rep["sections"][section]
        vals = [sec["overall"].get(metric) if c == "overall" else sec["by_category"].get(c, {}).get(metric)
                for c in cats]
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=mode)
        for x, v in zip(xs, vals):
            if v is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{first['benchmark']} ({section}): {metric} per category")
    ax.legend(fontsize=8)
    counts = "; ".join(f"{m}: {r['counts']['missing']} missing, {r['counts']['failed']} failed"
                       for m, r in reports.items())
    fig.text(0.01, 0.01, f"{stamp.line()}\n{counts}", fontsize=7, va="bottom")
    fig.subplots_adjust(bottom=0.32)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return Path(path)


# -- everything at once ---------------------------------------------------------------------------
def write_reports(out_dir: str | Path, reports: Mapping[str, Mapping[str, Any]], stamp: Stamp,
                  results: Mapping[str, Sequence[SampleResult]] | None = None) -> dict[str, Path]:
    """`results.json`, `report.md` and one PNG per section under `out_dir`; returns their paths by name."""
    if not reports:
        raise ValueError("write_reports: no reports to write")
    out = Path(out_dir)
    bench = next(iter(reports.values()))["benchmark"]
    doc = {"benchmark": bench, "stamp": stamp.to_dict(), "modes": {}}
    for mode, rep in reports.items():
        doc["modes"][mode] = {"report": rep}
        if results is not None and mode in results:
            doc["modes"][mode]["unscored"] = {k: len(v) for k, v in unscored(results[mode]).items()}
            doc["modes"][mode]["samples"] = [r.to_dict() for r in results[mode]]
    paths = {"results": write_json(out / "results.json", doc)}
    text = markdown(reports, stamp, results)
    if len(reports) > 1:
        sections = next(iter(reports.values()))["sections"]
        text += "\n## modes compared\n\n" + "\n\n".join(comparison_table(reports, s) for s in sections) + "\n"
        if bench == "shapes":
            text += "\n## ablation\n\n" + ablation_table(reports) + "\n"
    paths["markdown"] = write_text(out / "report.md", text)
    for section in next(iter(reports.values()))["sections"]:
        name = section.replace("/", "_")
        paths[f"chart_{name}"] = plot_modes(out / f"{bench}_{name}.png", reports, section, stamp)
    return paths


__all__ = ["FAILURE_TEXT", "Stamp", "ablation_table", "comparison_table", "markdown", "plot_modes", "section_table",
           "unscored", "unscored_lines", "write_json", "write_reports", "write_text"]
