"""The edit service under a seeded fuzz (reasonedit.testing.fuzz): malformed and oversized requests of every
field and kind are each answered with a JSON 4xx naming what docs/serve.md says they name, never a 500, and
/health answers between bursts. Here against an in-process server with a token and a thinker; in the slow
tier against a real `reasonedit serve --editor shapes` process, whose memory is read before and after."""

import random

import httpx
import pytest

from reasonedit.inference.types import Reflection
from reasonedit.serve import Limits, ServeConfig, ServerThread, create_app
from reasonedit.testing.fuzz import (
    UNCHECKED,
    Answer,
    FuzzTarget,
    base_fields,
    form_parts,
    fuzz_serve_process,
    judge,
    kinds,
    make_case,
    multipart,
    run_fuzz,
)

SEED = 0
TOKEN = "Fuzz-Token-7"
# a small body limit, so the bodies over it are cheap; a pixel limit under max_side squared, so an image can be
# over the area limit with both sides within theirs
TARGET = FuzzTarget(max_body_bytes=2 ** 20, token=TOKEN, limits=Limits(max_side=4096, max_pixels=2 ** 20),
                    thinker=True)
CASES = 6 * len(kinds(TARGET))  # each kind six times
BURST = 48


class InvertingEditor:
    name = "inverting"

    def edit(self, requests):
        return [255 - r.image for r in requests]


class EchoThinker:
    """Takes the instruction as it is and calls every edit a success: think and reflect are accepted fields."""

    name = "echo"

    def think(self, sources, instructions):
        return list(instructions)

    def reflect(self, sources, edited, instructions, previous):
        return [Reflection("success", score=10.0) for _ in sources]


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(token=TOKEN, max_body_bytes=TARGET.max_body_bytes, limits=TARGET.limits)
    with ServerThread(create_app(InvertingEditor(), config, EchoThinker())) as s:
        yield s


@pytest.fixture(scope="module")
def report(server):
    return run_fuzz(server.url, CASES, SEED, TARGET, burst=BURST, max_seconds=120)


def test_every_malformed_request_is_answered_with_a_json_4xx_never_a_5xx(report):
    assert report.cases == CASES and not report.failures, report.describe()
    assert all(isinstance(status, int) and 400 <= status < 500 for status in report.by_status), report.by_status


def test_every_refusal_has_the_status_and_field_the_docs_give(report):
    assert not report.mismatches, report.describe()


def test_health_answers_between_bursts(report):
    assert len(report.health_seconds) == 1 + -(-CASES // BURST) and not report.health_failures, report.describe()


def test_the_run_holds_every_kind_of_malformed_request(report):
    assert set(report.by_kind) == {kind for kind, _ in kinds(TARGET)}
    assert min(report.by_kind.values()) == 6


@pytest.mark.parametrize("form", [False, True], ids=["json", "multipart"])
def test_the_request_each_case_spoils_is_one_the_service_takes(server, form):
    # so that each refusal is the doing of the one thing a case changes
    for i in range(12):
        rng = random.Random(i)
        fields = base_fields(rng, TARGET)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if form:
            answer = httpx.post(server.url + "/edit", content=multipart(form_parts(fields, rng), "xyz"),
                                headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"}, timeout=30)
        else:
            answer = httpx.post(server.url + "/edit", json=fields, headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.json()["success"] is True, (fields, answer.text[:300])


def test_a_case_is_a_pure_function_of_seed_and_index():
    assert make_case(3, 17, TARGET) == make_case(3, 17, TARGET)
    assert [make_case(3, i, TARGET).kind for i in range(60)] == [make_case(3, i, TARGET).kind for i in range(60)]
    assert make_case(3, 17, TARGET) != make_case(4, 17, TARGET)


def test_the_judge_fails_what_the_docs_do_not_allow():
    case = next(c for c in (make_case(SEED, i, TARGET) for i in range(100)) if c.field not in (UNCHECKED, None))
    error = b'{"success": false, "error": "x", "field": %s}'
    field = b'"%s"' % case.field.encode()
    assert judge(case, Answer(case.statuses[0], "application/json", error % field)) == (None, None)
    assert judge(case, Answer(500, "application/json", error % b"null"))[0] == "a 500"
    plain = Answer(400, "text/plain; charset=utf-8", b"Invalid HTTP request received.")
    assert judge(case, plain)[0].startswith("not JSON")
    assert judge(case, Answer(200, "application/json", b'{"success": true}'))[0] == "not a 4xx: 200"
    assert judge(case, Answer(None, error="timed out"))[0].startswith("no answer")
    assert judge(case, Answer(case.statuses[0], "application/json", error % b'"elsewhere"'))[1].startswith("field")


@pytest.mark.slow
def test_a_serve_process_answers_2000_malformed_requests_with_json_4xx_and_its_memory_stays_put():
    # RSS "before" is read after a warm-up burst of 500 cases (every kind eight times or more), so that what the
    # first requests of each kind allocate for good (imports, caches, the thread pool) does not count as growth;
    # the 2000 cases come after it. One case at a time: with several bodies at the 64 MiB limit in flight at
    # once, the C allocator keeps up to a limit's worth per body resident after it is freed (fragmentation, not
    # a leak: the Python heap does not grow), which alone moves this ~400 MiB process's RSS by 10-20 %.
    run = fuzz_serve_process(2000, SEED, warmup=500, concurrency=1, max_seconds=300)
    report = run.report
    assert report.cases == 2000 and not report.failures and not run.warmup.failures, report.describe()
    assert not report.mismatches, report.describe()
    assert not report.health_failures and report.health_max < 1.0, report.describe()
    assert abs(run.rss_ratio - 1) <= 0.2, f"RSS {run.rss_before >> 20} MiB -> {run.rss_after >> 20} MiB"
