"""The think -> edit -> reflect loop, the same code for every Editor and Thinker.

Round 1 edits the source with the thought-out instruction (or the user's, without think). After each
round the thinker reflects: Success stops; Reflection edits that round's output with the new
instruction; Failed restarts from the source with the thought-out instruction (or the thinker's own
new one). A reply that did not parse is Failed. At most `rounds` rounds; the result is the best-scored
round, ties going to Success, then to the earlier round. All live samples run as one batch per phase;
a sample that stopped drops out. Round r uses seed + r - 1, so a restart draws new noise.

Those are the "reasonedit" rules. `loop="editthinker"` runs EditThinker's client's instead
(`inference/run_edit_thinker_inference.py`, `process_single_sample`): every round edits the source, with
the same seed; the last edit allowed is not reflected on (its verdict could change nothing); a Failed
verdict keeps the instruction of the round before; the result is the last round. A thinker may carry the
loop it was built for (`thinker.loop`, e.g. `OpenAIThinker(loop=...)`, whose reading of replies depends on
it): the loop follows it unless told, and refuses to be told otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from reasonedit.config import LOOPS
from reasonedit.inference import cancel
from reasonedit.inference.trace import Round, Trace
from reasonedit.inference.types import DECISIONS, EditRequest, Editor, Thinker
from reasonedit.progress import Progress

log = logging.getLogger(__name__)

# progress(phase, round, live samples)


@dataclass(frozen=True)
class LoopRules:
    """What differs between the two loops."""

    name: str
    result: str  # "best": the best-scored round | "last": the last round
    reflect_after_last: bool  # reflect on the last edit allowed too (its verdict only ranks it)
    seed_step: int  # round r uses seed + (r - 1) * seed_step
    always_from_source: bool  # every round edits the source, a Reflection's too
    failed_keeps_instruction: bool  # a Failed verdict without an instruction: the round's (else the thought-out one)


LOOP_RULES = {
    "reasonedit": LoopRules("reasonedit", result="best", reflect_after_last=True, seed_step=1,
                            always_from_source=False, failed_keeps_instruction=False),
    "editthinker": LoopRules("editthinker", result="last", reflect_after_last=False, seed_step=0,
                             always_from_source=True, failed_keeps_instruction=True),
}
assert tuple(LOOP_RULES) == LOOPS


def loop_rules(loop: Optional[str], thinker: Optional[Thinker] = None) -> LoopRules:
    """The rules named `loop`; None: those the thinker was built for (`thinker.loop`), else ours. A `loop`
    that contradicts the thinker's is a ValueError: the thinker reads replies for its own."""
    built_for = getattr(thinker, "loop", None) if thinker is not None else None
    name = loop or built_for or "reasonedit"
    if name not in LOOP_RULES:
        raise ValueError(f"loop {name!r}: expected one of {', '.join(LOOPS)}")
    if built_for is not None and name != built_for:
        who = getattr(thinker, "name", type(thinker).__name__)
        raise ValueError(f"loop {name!r}: the thinker {who} is built for the {built_for} loop (it reads replies "
                         f"for it); build it with loop={name!r}")
    return LOOP_RULES[name]


def best_round(rounds: Sequence[Round]) -> int:
    """Index of the best-scored round: highest score, then Success, then the earliest. Unscored rounds rank last."""
    def key(i: int) -> tuple:
        r = rounds[i]
        score = r.score if r.score is not None else float("-inf")
        return (score, r.decision == "success", -i)
    return max(range(len(rounds)), key=key)


def edit_with_reasoning(editor: Editor, thinker: Optional[Thinker], sources: Sequence[np.ndarray],
                        instructions: Sequence[str], *, think: bool = True, reflect: bool = True, rounds: int = 3,
                        seed: int | Sequence[int] = 0, guidance_scale: float = 4.0, num_inference_steps: int = 28,
                        negative_prompt: str = " ", progress: Optional[Progress] = None,
                        extra_images: Optional[Sequence[Sequence[np.ndarray]]] = None,
                        loop: Optional[str] = None) -> list[Trace]:
    """Run the loop on every (source, instruction); one Trace each, in order. `extra_images[i]`: sample i's
    further source images ("Picture 2", ...), given to every round's edit; each round edits the source or the
    previous output as the first picture. `loop`: "reasonedit" | "editthinker" (see the module docstring);
    None: the thinker's, else "reasonedit"."""
    n = len(sources)
    if len(instructions) != n:
        raise ValueError(f"edit_with_reasoning: {n} sources for {len(instructions)} instructions")
    extras = [tuple(e) for e in extra_images] if extra_images is not None else [()] * n
    if len(extras) != n:
        raise ValueError(f"edit_with_reasoning: extra images for {len(extras)} samples, {n} sources")
    if rounds < 1:
        raise ValueError(f"rounds: must be at least 1, got {rounds}")
    if (think or reflect) and thinker is None:
        raise ValueError("think and reflect need a thinker; pass one or set think=False, reflect=False")
    seeds = [int(seed)] * n if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: {len(seeds)} seeds for {n} samples")
    rules = loop_rules(loop, thinker)
    given = progress or (lambda phase, r, live: None)

    def report(phase: str, r: int, live: int) -> None:  # every phase starts here: given-up work stops here too
        cancel.check(f"the loop's {phase} phase")
        given(phase, r, live)

    names = dict(editor=getattr(editor, "name", type(editor).__name__),
                 thinker=getattr(thinker, "name", type(thinker).__name__) if thinker is not None else "")
    traces = [Trace(source=s, instruction=i, thought=None, loop=rules.name, **names)
              for s, i in zip(sources, instructions)]
    if n == 0:
        return traces

    # think: abstract instruction -> concrete steps, one batch
    planned = list(instructions)
    if think:
        report("think", 0, n)
        t0 = time.perf_counter()
        planned = list(thinker.think(list(sources), list(instructions)))
        share = (time.perf_counter() - t0) / n
        if len(planned) != n:
            raise RuntimeError(f"{names['thinker']}: think returned {len(planned)} instructions for {n} samples")
        for t, p in zip(traces, planned):
            t.thought, t.timings["think"] = p, share

    live = list(range(n))
    inputs = list(sources)  # what each sample's next round edits
    next_instruction = list(planned)
    from_source = [True] * n
    last = rounds if reflect else 1
    for r in range(1, last + 1):
        report("edit", r, len(live))
        requests = [EditRequest(image=inputs[k], prompt=next_instruction[k], seed=seeds[k] + (r - 1) * rules.seed_step,
                                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                negative_prompt=negative_prompt, extra_images=extras[k]) for k in live]
        t0 = time.perf_counter()
        edited = editor.edit(requests)
        share = (time.perf_counter() - t0) / len(live)
        if len(edited) != len(live):
            raise RuntimeError(f"{names['editor']}: {len(edited)} images for {len(live)} requests")
        for k, req, image in zip(live, requests, edited):
            traces[k].rounds.append(Round(index=r, instruction=req.prompt, seed=req.seed, image=np.asarray(image),
                                          edited_from="source" if from_source[k] else "previous",
                                          timings={"edit": share}))
        if not reflect:
            for k in live:
                traces[k].stopped = "no_reflection"
            break
        if r == last and not rules.reflect_after_last:
            break

        report("reflect", r, len(live))
        verdicts = thinker.reflect([sources[k] for k in live], [traces[k].rounds[-1].image for k in live],
                                   [instructions[k] for k in live], [traces[k].rounds[-1].instruction for k in live])
        if len(verdicts) != len(live):
            raise RuntimeError(f"{names['thinker']}: {len(verdicts)} verdicts for {len(live)} samples")
        still = []
        for k, v in zip(live, verdicts):
            done = traces[k].rounds[-1]
            done.reflection = v
            done.timings.update(v.timings)
            if v.decision not in DECISIONS:
                v.parse_error = v.parse_error or f"unknown decision {v.decision!r}"
                v.decision = "failed"
            if v.decision == "success":
                traces[k].stopped = "success"
                continue
            if v.decision == "reflection" and v.instruction and not (v.restart or rules.always_from_source):
                inputs[k], next_instruction[k], from_source[k] = done.image, v.instruction, False
            else:  # failed (or a reflection that asks to restart): back to the source
                inputs[k], from_source[k] = sources[k], True
                next_instruction[k] = v.instruction or (done.instruction if rules.failed_keeps_instruction
                                                        else planned[k])
            still.append(k)
        live = still
        if not live:
            break
    for k in live:
        traces[k].stopped = traces[k].stopped or "round_limit"
    for t in traces:
        t.best = best_round(t.rounds) if rules.result == "best" else len(t.rounds) - 1
        if t.parse_errors:
            log.info("%d reply(ies) did not parse for %r; those rounds counted as failed", t.parse_errors,
                     t.instruction)
    return traces


__all__ = ["LOOP_RULES", "LoopRules", "best_round", "edit_with_reasoning", "loop_rules"]
