"""Scoring of every benchmark on hand-computed fixtures, and the judge-reply parsers.

Each fixture's expected numbers are worked out by hand in the comments; missing and failed samples
are in every fixture and must be counted, never scored.
"""

import math

import pytest
from PIL import Image

from reasonedit.eval.benchmark import JudgeQuery, JudgeReplyError, SampleResult, parse_reply
from reasonedit.eval.benchmarks import GEditBenchmark, ImgEditBenchmark, KrisBenchmark, RiseBenchmark, ShapesBenchmark
from reasonedit.eval.benchmarks.rise import solved


def ok(key, cat, scores, lang="en", **meta):
    return SampleResult(key, cat, "ok", scores, meta=meta, language=lang)


def missing(key, cat, lang="en", **meta):
    return SampleResult(key, cat, "missing", meta=meta, language=lang, error="no image")


def failed(key, cat, lang="en", **meta):
    return SampleResult(key, cat, "failed", {"sc_instruction": 0.0}, meta=meta, language=lang, error="unparsable")


# -- judge replies ----------------------------------------------------------------------------------
def q(fmt, metrics, scale=(0, 10)):
    return JudgeQuery("q", "prompt", [], tuple(metrics), fmt, scale)


def test_score_list_reply_reads_a_fenced_json_object():
    text = 'Here:\n```json\n{"score": [7, 3], "reasoning": "ok"}\n```'
    assert parse_reply(q("score_list", ["a", "b"]), text) == {"a": 7.0, "b": 3.0}


@pytest.mark.parametrize("text, why", [
    ('{"score": [7], "reasoning": "x"}', "1 value"),
    ('{"score": [7, 11]}', "outside the scale"),
    ('{"score": [7, "seven"]}', "not a number"),
    ("I would give it a seven.", "no JSON object"),
    ('{"reasoning": "x"}', 'no "score"'),
    ("   ", "empty"),
])
def test_score_list_reply_that_does_not_hold_the_scores_is_a_parse_error(text, why):
    with pytest.raises(JudgeReplyError, match=why):
        parse_reply(q("score_list", ["a", "b"]), text)


def test_score_fields_reply_needs_every_named_field():
    query = q("score_fields", ["instruction_score", "knowledge_score"], (1, 5))
    assert parse_reply(query, '{"instruction_score": 4, "knowledge_score": 2, "reasoning": "r"}') == {
        "instruction_score": 4.0, "knowledge_score": 2.0}
    with pytest.raises(JudgeReplyError, match="knowledge_score"):
        parse_reply(query, '{"instruction_score": 4}')


def test_score_lines_reply_takes_three_labelled_integers_in_order():
    query = q("score_lines", ["score_1", "score_2", "score_3"], (1, 5))
    text = "Brief reasoning: shell unchanged.\nPrompt Compliance: 1\nVisual Seamlessness: 4\nPhysical & Detail Fidelity: 5"
    assert parse_reply(query, text) == {"score_1": 1.0, "score_2": 4.0, "score_3": 5.0}
    with pytest.raises(JudgeReplyError, match="found 2"):
        parse_reply(query, "Prompt Compliance: 1\nVisual Seamlessness: 4")


def test_final_score_reply_rejects_two_different_finals_and_out_of_scale_binary():
    assert parse_reply(q("final_score", ["reasoning"], (1, 5)), "Looks right.\nFinal Score: 4") == {"reasoning": 4.0}
    with pytest.raises(JudgeReplyError, match="more than one"):
        parse_reply(q("final_score", ["reasoning"], (1, 5)), "Final Score: 3\n... Final Score: 5")
    with pytest.raises(JudgeReplyError, match="outside the scale"):
        parse_reply(q("final_score", ["reasoning"], (0, 1)), "Final Score: 2")
    with pytest.raises(JudgeReplyError, match="Final Score"):
        parse_reply(q("final_score", ["reasoning"], (1, 5)), "four out of five")


# -- GEdit --------------------------------------------------------------------------------------------
def gedit(sc1, sc2, pq1, pq2):
    return {"sc_instruction": sc1, "sc_overedit": sc2, "pq_naturalness": pq1, "pq_artifacts": pq2}


def test_gedit_scores_per_task_type_then_mean_over_types_per_language_and_subset():
    results = [
        ok("a", "background_change", gedit(8, 6, 9, 4), intersection=True),     # SC 6,  PQ 4, O sqrt(24)
        ok("b", "background_change", gedit(10, 10, 9, 9), intersection=False),  # SC 10, PQ 9, O sqrt(90)
        ok("c", "color_alter", gedit(4, 7, 5, 8), intersection=True),           # SC 4,  PQ 5, O sqrt(20)
        missing("d", "color_alter", intersection=True),
        failed("e", "color_alter", intersection=True),
        ok("f", "background_change", gedit(2, 3, 8, 8), lang="cn", intersection=False),  # SC 2, PQ 8, O 4
    ]
    rep = GEditBenchmark().score(results)
    full = rep["sections"]["en/fullset"]
    # background_change: SC (6+10)/2 = 8, PQ (4+9)/2 = 6.5, O (sqrt24 + sqrt90)/2
    bg = full["by_category"]["background_change"]
    assert (bg["SC"], bg["PQ"]) == (8, 6.5) and bg["O"] == pytest.approx((math.sqrt(24) + math.sqrt(90)) / 2)
    # color_alter: only c is scored; d and e are counted
    ca = full["by_category"]["color_alter"]
    assert (ca["SC"], ca["PQ"], ca["n"], ca["ok"], ca["missing"], ca["failed"]) == (4, 5, 3, 1, 1, 1)
    # 2 of the 11 task types have a scored sample: the official overall is NaN (None); ours is the mean of the
    # two type means: SC (8+4)/2 = 6, PQ (6.5+5)/2 = 5.75, O ((sqrt24+sqrt90)/2 + sqrt20)/2
    assert (full["overall"]["SC"], full["overall"]["PQ"], full["overall"]["O"]) == (None, None, None)
    assert full["overall"]["task_types_scored"] == 2 and full["by_category"]["tone_transfer"]["n"] == 0
    assert full["overall"]["SC_over_scored_types"] == 6 and full["overall"]["PQ_over_scored_types"] == 5.75
    assert full["overall"]["O_over_scored_types"] == pytest.approx(((math.sqrt(24) + math.sqrt(90)) / 2 + math.sqrt(20)) / 2)
    # intersection subset: background_change = a only (SC 6, PQ 4), color_alter = c: SC (6+4)/2 = 5
    inter = rep["sections"]["en/intersection"]["overall"]
    assert inter["SC_over_scored_types"] == 5 and inter["PQ_over_scored_types"] == 4.5
    assert inter["O_over_scored_types"] == pytest.approx((math.sqrt(24) + math.sqrt(20)) / 2)
    # Chinese apart: SC 2, PQ 8, O sqrt(16) = 4
    cn = rep["sections"]["cn/fullset"]["overall"]
    assert (cn["SC_over_scored_types"], cn["PQ_over_scored_types"], cn["O_over_scored_types"]) == (2, 8, 4)
    assert rep["counts"] == {"total": 6, "ok": 4, "missing": 1, "failed": 1}


def test_gedit_overall_is_the_mean_over_all_11_task_types_once_each_has_a_scored_sample():
    from reasonedit.eval.benchmarks.gedit import TASK_TYPES
    results = [ok(t, t, gedit(i, 10, 10, 10)) for i, t in enumerate(TASK_TYPES)]  # SC = i, PQ = 10
    results.append(failed("x", TASK_TYPES[0]))  # a failed sample leaves its type's mean alone
    overall = GEditBenchmark().score(results)["sections"]["en/fullset"]["overall"]
    assert overall["SC"] == overall["SC_over_scored_types"] == 5.0 and overall["PQ"] == 10
    assert overall["task_types_scored"] == 11


# -- ImgEdit ------------------------------------------------------------------------------------------
def img(a, b, c):
    return {"score_1": a, "score_2": b, "score_3": c}


def test_imgedit_overall_is_mean_of_type_means_beside_the_sample_mean():
    results = [
        ok("1", "add", img(5, 4, 4)),     # 13/3 = 4.333 -> 4.33
        ok("2", "add", img(3, 3, 2)),     # 8/3 = 2.667 -> 2.67
        ok("3", "remove", img(1, 2, 2)),  # 5/3 = 1.667 -> 1.67
        missing("4", "remove"),
        SampleResult("5", "style", "failed", error="unparsable"),
    ]
    rep = ImgEditBenchmark().score(results)
    rows = rep["sections"]["all"]["by_category"]
    # add: (4.33 + 2.67)/2 = 3.5; remove: 1.67; style: nothing scored
    assert rows["add"]["score"] == pytest.approx(3.5) and rows["remove"]["score"] == pytest.approx(1.67)
    assert rows["style"]["score"] is None and rows["style"]["failed"] == 1 and rows["remove"]["missing"] == 1
    overall = rep["sections"]["all"]["overall"]
    assert overall["score"] == pytest.approx((3.5 + 1.67) / 2)             # 2.585: mean of type means
    assert overall["sample_mean"] == pytest.approx((4.33 + 2.67 + 1.67) / 3)  # 2.89: mean of samples


# -- KRIS ---------------------------------------------------------------------------------------------
def kris(vc, vq, if_, kp=None):
    d = {"consistency_score": vc, "quality_score": vq, "instruction_score": if_}
    if kp is not None:
        d["knowledge_score"] = kp
    return d


def test_kris_overall_is_flat_mean_of_normalised_values_with_knowledge_only_where_it_applies():
    results = [
        ok("color_change/1", "color_change", kris(5, 4, 3, kp=5)),  # 100, 75, 50 (KP ignored: not a knowledge category)
        ok("color_change/2", "color_change", kris(1, 2, 1)),        # 0, 25, 0
        ok("biology/1", "biology", kris(4, 4, 2, kp=3)),            # 75, 75, 25, KP 50
        missing("biology/2", "biology"),
        failed("mathematics/1", "mathematics"),
    ]
    rep = KrisBenchmark().score(results)
    cats = rep["sections"]["categories"]["by_category"]
    # color_change: VC (100+0)/2 = 50, VQ (75+25)/2 = 50, IF (50+0)/2 = 25, no KP, AVG 250/6
    assert (cats["color_change"]["VC"], cats["color_change"]["VQ"], cats["color_change"]["IF"]) == (50, 50, 25)
    assert cats["color_change"]["KP"] is None and cats["color_change"]["AVG"] == pytest.approx(250 / 6)
    # biology: AVG (75+75+25+50)/4 = 56.25, KP 50; biology/2 counted as missing
    assert cats["biology"]["AVG"] == 56.25 and cats["biology"]["KP"] == 50 and cats["biology"]["missing"] == 1
    assert cats["mathematics"]["AVG"] is None and cats["mathematics"]["failed"] == 1
    # overall: all ten values (250 + 225)/10 = 47.5, not the mean of category AVGs (48.96)
    assert rep["sections"]["categories"]["overall"]["AVG"] == 47.5
    assert rep["sections"]["categories"]["overall"]["VC"] == pytest.approx((100 + 0 + 75) / 3)
    groups = rep["sections"]["groups"]["by_category"]
    assert groups["Factual Knowledge"]["AVG"] == pytest.approx(250 / 6)
    assert groups["Conceptual Knowledge"]["AVG"] == 56.25 and groups["Conceptual Knowledge"]["failed"] == 1
    assert rep["sections"]["types"]["by_category"]["Attribute Perception"]["AVG"] == pytest.approx(250 / 6)


# -- RISE ---------------------------------------------------------------------------------------------
def test_rise_consistency_free_sample_is_solved_without_full_consistency():
    r = ok("c", "causal_reasoning", {"consistency": 1, "reasoning": 5, "plausibility": 5}, consistency_free=True)
    assert solved(r)
    r.meta["consistency_free"] = False
    assert not solved(r)


def test_rise_logical_binary_scores_map_to_one_and_five():
    # 4 * min(s, 1) + 1: 1 -> 5 (full marks), 0 -> 1
    assert solved(ok("l", "logical_reasoning", {"consistency": 1, "reasoning": 1}, binary=True))
    assert not solved(ok("l", "logical_reasoning", {"consistency": 1, "reasoning": 0}, binary=True))


def test_rise_accuracy_counts_failed_as_unsolved_and_reports_the_official_weighted_score():
    results = [
        ok("t1", "temporal_reasoning", {"consistency": 5, "reasoning": 5, "plausibility": 5}),  # solved, score 5
        ok("t2", "temporal_reasoning", {"consistency": 4, "reasoning": 5, "plausibility": 5}),  # not solved, 4.7
        ok("c1", "causal_reasoning", {"reasoning": 5, "plausibility": 5}, consistency_free=True),  # solved, score NaN
        ok("l1", "logical_reasoning", {"consistency": 1, "reasoning": 1}, binary=True),  # 5, 5: solved, score 5
        ok("l2", "logical_reasoning", {"consistency": 1, "reasoning": 0}, binary=True),  # 5, 1: not solved, 1.1
        missing("s1", "spatial_reasoning"),
        failed("s2", "spatial_reasoning"),
    ]
    rep = RiseBenchmark().score(results)
    overall = rep["sections"]["all"]["overall"]
    assert overall["accuracy"] == pytest.approx(300 / 7)        # 3 of 7, missing and failed unsolved (official)
    assert overall["accuracy_scored"] == 60.0                   # 3 solved of 5 scored (ours, labelled)
    assert "accuracy_all" not in overall
    assert overall["consistency"] == 93.75                      # (5+4+5+5)/4 = 4.75 -> 25 * 3.75
    assert overall["reasoning"] == 80.0                         # (5+5+5+5+1)/5 = 4.2 -> 25 * 3.2
    assert overall["plausibility"] == 100.0                     # 5, 5, 5 -> 25 * 4
    # calculate_score: t1 5, t2 1.2 + 2.5 + 1 = 4.7, l1 1.5 + 3.5 = 5, l2 (1.5 + 0.7) / 2 = 1.1 (reasoning 1: halved);
    # c1 is weighed with the consistency it was not judged on: NaN, left out -> mean 15.8 / 4 = 3.95
    assert overall["score"] == pytest.approx(3.95) and overall["score_pct"] == pytest.approx(73.75)
    # ours: c1 weighed 0.2 * 5 + 0.8 * 5 = 5 -> 20.8 / 5 = 4.16
    assert overall["score_pct_own_weights"] == pytest.approx(79.0)
    cats = rep["sections"]["all"]["by_category"]
    assert cats["temporal_reasoning"]["accuracy"] == 50.0 and cats["temporal_reasoning"]["consistency"] == 87.5
    assert cats["causal_reasoning"]["accuracy"] == 100.0 and cats["logical_reasoning"]["accuracy"] == 50.0
    # a category whose samples are all missing or failed: 0 % solved officially, nothing scored for us
    assert cats["spatial_reasoning"]["accuracy"] == 0.0 and cats["spatial_reasoning"]["accuracy_scored"] is None
    assert (cats["spatial_reasoning"]["missing"], cats["spatial_reasoning"]["failed"]) == (1, 1)


def test_rise_official_weights_drop_consistency_for_every_sample_once_the_file_has_the_field():
    # calculate_score tests the row's consistency_free for truth, and pandas fills NaN (true) where it is absent
    r = ok("t", "temporal_reasoning", {"consistency": 1, "reasoning": 5, "plausibility": 5},
           weighed_without_consistency=True)
    rep = RiseBenchmark().score([r])["sections"]["all"]["overall"]
    assert rep["score"] == pytest.approx(5.0)                   # 0.2 * 5 + 0.8 * 5, consistency ignored
    assert rep["score_pct_own_weights"] == pytest.approx(25 * (0.3 + 2.5 + 1.0 - 1))  # 3.8 with our weights


# -- shapes -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_bench():
    return ShapesBenchmark(n=2, seed=5).load(None)


def test_shapes_oracle_scores_exact_target_ten_and_unchanged_source_seven(shapes_bench, tmp_path):
    sample = shapes_bench.samples()[0]  # edit pair 0 is a recolor (ops cycle from "recolor")
    assert sample.meta["kind"] == "recolor"
    from reasonedit.shapes.world import Scene
    target = shapes_bench.world.render(Scene.from_dict(sample.meta["target_scene"]))
    Image.fromarray(target).save(tmp_path / "target.png")
    Image.fromarray(shapes_bench.source_images(sample)[0]).save(tmp_path / "source.png")
    assert shapes_bench.oracle_scores(sample, tmp_path / "target.png") == {"success": 1.0, "score": 10.0, "errors": 0.0}
    # the unchanged source has one error (the wrong colour): 10 - 3 * 1 = 7
    assert shapes_bench.oracle_scores(sample, tmp_path / "source.png") == {"success": 0.0, "score": 7.0, "errors": 1.0}


def test_shapes_success_rate_and_mean_score_per_instruction_kind(shapes_bench):
    results = [
        ok("e0", "concrete", {"success": 1.0, "score": 10.0}, kind="recolor"),
        ok("e1", "concrete", {"success": 0.0, "score": 7.0}, kind="add"),
        ok("t0", "abstract", {"success": 1.0, "score": 10.0}, kind="relation"),
        missing("t1", "abstract", kind="counting"),
    ]
    rep = shapes_bench.score(results)
    cats = rep["sections"]["all"]["by_category"]
    assert (cats["concrete"]["success"], cats["concrete"]["score"]) == (50.0, 8.5)  # 1 of 2; (10+7)/2
    assert (cats["abstract"]["success"], cats["abstract"]["score"], cats["abstract"]["missing"]) == (100.0, 10.0, 1)
    assert rep["sections"]["all"]["overall"]["success"] == pytest.approx(200 / 3)  # 2 of 3 scored
