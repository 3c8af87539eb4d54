"""Judge-reply corpora: for every reply parser, variants of a reply (the official prompts' own layouts, code fences,
extra prose, Chinese punctuation, Windows line endings, numbered lines, ...) with what the official scoring code
extracts from each and what we extract, kept as data in tests/data/judge_reply_corpora.json (the official values come
from running the official extraction functions on each reply; the sources are named in the file).

We agree with the official code on every variant but the ones listed below, each for the reason the data gives."""

import json
from pathlib import Path

import pytest

from reasonedit.eval.benchmark import JudgeQuery, JudgeReplyError, parse_reply

CORPUS = json.loads((Path(__file__).parent / "data" / "judge_reply_corpora.json").read_text(encoding="utf-8"))
VARIANTS = CORPUS["variants"]

# where the official code guesses: the number it keeps is not the score the judge gave (we refuse or read the score)
OFFICIAL_GUESSES = {
    "gedit_no_json",                                    # VIEScore: random.randint(0, 10)
    "kris_official_consistency_layout_numbered_prose",  # KRIS: the first digit 1-5 anywhere in the reply
    "kris_decimal",                                     # KRIS: int(3.5) == 3
    "rise_decimal",                                     # RISE: digits only, 4.5 -> 4
    "rise_binary_half",                                 # RISE: digits only, 0.5 -> 0
    "rise_echoed_range_then_score",                     # RISE: the 1 of an echoed "1-5"
    "rise_two_different_finals",                        # RISE: the first of two conflicting scores
}
# where it accepts a reply that does not hold the asked scores in range (for us: a failed sample)
OFFICIAL_LENIENT = {
    "gedit_single_number", "gedit_one_value_list", "gedit_out_of_range",
    "kris_out_of_range",
    "rise_binary_answered_on_five_point_scale",
    "imgedit_extra_overall_line", "imgedit_one_line_missing",
}
# where it reads nothing (re-asks, fails the sample or leaves it out) and we read the score the judge wrote
OFFICIAL_FAILS = {
    "gedit_chinese_punctuation", "gedit_trailing_comma", "gedit_string_numbers",
    "kris_official_dual_layout",
    "rise_fullwidth_colon",
    "imgedit_fullwidth_colons", "imgedit_bold_labels", "imgedit_out_of_five",
}


def query_of(v) -> JudgeQuery:
    q = v["query"]
    return JudgeQuery(v["name"], "", [], tuple(q["metrics"]), v["parser"], tuple(q["scale"]),
                      integers=q.get("integers", False))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v["name"] for v in VARIANTS])
def test_our_parser_reads_each_variant_as_recorded(variant):
    query = query_of(variant)
    if variant["ours"] is None:
        with pytest.raises(JudgeReplyError):
            parse_reply(query, variant["reply"])
    else:
        scores = parse_reply(query, variant["reply"])
        assert [scores[m] for m in query.metrics] == variant["ours"]


def test_we_agree_with_the_official_extraction_except_where_listed():
    differs = {v["name"]: v.get("differs") for v in VARIANTS if v.get("differs")}
    assert {n for n, kind in differs.items() if kind == "guess"} == OFFICIAL_GUESSES
    assert {n for n, kind in differs.items() if kind == "lenient"} == OFFICIAL_LENIENT
    assert {n for n, kind in differs.items() if kind == "official_fails"} == OFFICIAL_FAILS
    for v in VARIANTS:
        if v["name"] not in differs:
            assert v["ours"] == v["official"], v["name"]
        else:  # a random guess is recorded as null with a note
            assert v["why"] and (v["ours"] != v["official"] or "random" in v["official_note"]), v["name"]
    # we never keep a value the official code could not read and we could not either
    assert all(v["ours"] is not None for v in VARIANTS if v["name"] in OFFICIAL_FAILS)


@pytest.mark.parametrize("parser", ["final_score", "score_list", "score_fields", "score_lines"])
def test_every_parser_has_every_kind_of_variant(parser):
    layouts = " | ".join(v["layout"] for v in VARIANTS if v["parser"] == parser).lower()
    for kind in ("official prompt layout", "code fence", "extra prose", "chinese punctuation", "windows line endings",
                 "numbered lines"):
        assert kind in layouts, f"{parser}: no {kind!r} variant"
    assert parser in CORPUS["sources"]
