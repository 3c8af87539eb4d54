"""The edit service under a seeded fuzz: a real `reasonedit serve --editor shapes` process sent malformed and
oversized requests of every field and kind (reasonedit.testing.fuzz), with its answers, /health latency between
bursts and resident memory before and after.

    python bench/serve_fuzz.py [--cases 2000] [--seed 0] [--warmup 500] [--burst 100] [--concurrency 1] [--auth]

The process runs with the command's defaults (64 MiB bodies, 2048-pixel sides, no thinker) and --no-auth, or
with a token from the environment (--auth, which adds the missing and wrong Authorization kinds). RSS (VmRSS of
/proc/PID/status) is read after a warm-up of --warmup cases, so that what the first requests of each kind
allocate for good is not counted as growth, and again after the --cases that follow; one case at a time by
default, as the slow test sends them (with --concurrency 4, bodies at the 64 MiB limit in flight together leave
the C allocator's heap larger after they are freed, and RSS moves by 10-20 % with no leak). Exit status 1 when an
answer is not a JSON 4xx with the documented status and field, a /health probe takes 1 s or more, or RSS
moves by more than 20 %: what tests/test_serve_fuzz.py's slow test checks.
"""

from __future__ import annotations

import argparse
import os
import sys

from reasonedit.testing.fuzz import fuzz_serve_process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="cases sent after the warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=500, help="cases sent before RSS is first read")
    ap.add_argument("--burst", type=int, default=100, help="cases between two /health probes")
    ap.add_argument("--concurrency", type=int, default=1, help="cases in flight at once")
    ap.add_argument("--auth", action="store_true", help="serve with a token and fuzz the Authorization header too")
    args = ap.parse_args()
    token = f"Bench-Token-{args.seed}" if args.auth else None  # fixed: the cases depend on it
    print(f"reasonedit serve --editor shapes ({'a token' if token else '--no-auth'}); seed {args.seed}, "
          f"{args.warmup} warm-up + {args.cases} cases in bursts of {args.burst}, {args.concurrency} at a time; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    run = fuzz_serve_process(args.cases, args.seed, warmup=args.warmup, token=token, burst=args.burst,
                             concurrency=args.concurrency)
    r = run.report
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(r.by_status.items(), key=lambda kv: str(kv[0])))
    print(f"cases           {r.cases} of {len(r.by_kind)} kinds in {r.wall_seconds:.1f}s "
          f"({r.cases / r.wall_seconds:.0f}/s)")
    print(f"by status       {statuses}")
    print(f"failures        {len(r.failures) + len(run.warmup.failures)} (not a JSON 4xx, a 5xx, no answer); "
          f"mismatches {len(r.mismatches)} (another status or field than the docs give)")
    failed = f"; {len(r.health_failures)} failed" if r.health_failures else ""
    print(f"/health         max {r.health_max * 1000:.1f}ms, median {r.health_median * 1000:.1f}ms over "
          f"{len(r.health_seconds)} probes{failed}")
    print(f"RSS             {run.rss_before / 2 ** 20:.0f} MiB after the warm-up -> {run.rss_after / 2 ** 20:.0f} MiB "
          f"after the run: {run.rss_ratio:.3f}x")
    for problem in (run.warmup.failures + r.failures + r.mismatches)[:10]:
        print(f"  {problem}")
    ok = (not r.failures and not run.warmup.failures and not r.mismatches and not r.health_failures
          and r.health_max < 1.0 and abs(run.rss_ratio - 1) <= 0.2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
