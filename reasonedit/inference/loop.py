"""The think -> edit -> reflect loop, the same code for every Editor and Thinker.

Round 1 edits the source with the thought-out instruction (or the user's, without think). After each
round the thinker reflects: Success stops; Reflection edits that round's output with the new
instruction; Failed restarts from the source with the thought-out instruction (or the thinker's own
new one). A reply that did not parse is Failed. At most `rounds` rounds; the result is the best-scored
round, ties going to Success, then to the earlier round. All live samples run as one batch per phase;
a sample that stopped drops out. Round r uses seed + r - 1, so a restart draws new noise.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np

from reasonedit.inference import cancel
from reasonedit.inference.trace import Round, Trace
from reasonedit.inference.types import DECISIONS, EditRequest, Editor, Thinker
from reasonedit.progress import Progress

log = logging.getLogger(__name__)

# progress(phase, round, live samples)


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
                        extra_images: Optional[Sequence[Sequence[np.ndarray]]] = None) -> list[Trace]:
    """Run the loop on every (source, instruction); one Trace each, in order. `extra_images[i]`: sample i's
    further source images ("Picture 2", ...), given to every round's edit; each round edits the source or the
    previous output as the first picture."""
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
    given = progress or (lambda phase, r, live: None)

    def report(phase: str, r: int, live: int) -> None:  # every phase starts here: given-up work stops here too
        cancel.check(f"the loop's {phase} phase")
        given(phase, r, live)

    names = dict(editor=getattr(editor, "name", type(editor).__name__),
                 thinker=getattr(thinker, "name", type(thinker).__name__) if thinker is not None else "")
    traces = [Trace(source=s, instruction=i, thought=None, **names) for s, i in zip(sources, instructions)]
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
    for r in range(1, (rounds if reflect else 1) + 1):
        report("edit", r, len(live))
        requests = [EditRequest(image=inputs[k], prompt=next_instruction[k], seed=seeds[k] + r - 1,
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

        report("reflect", r, len(live))
        verdicts = thinker.reflect([sources[k] for k in live], [traces[k].rounds[-1].image for k in live],
                                   [instructions[k] for k in live], [traces[k].rounds[-1].instruction for k in live])
        if len(verdicts) != len(live):
            raise RuntimeError(f"{names['thinker']}: {len(verdicts)} verdicts for {len(live)} samples")
        still = []
        for k, v in zip(live, verdicts):
            last = traces[k].rounds[-1]
            last.reflection = v
            last.timings.update(v.timings)
            if v.decision not in DECISIONS:
                v.parse_error = v.parse_error or f"unknown decision {v.decision!r}"
                v.decision = "failed"
            if v.decision == "success":
                traces[k].stopped = "success"
                continue
            if v.decision == "reflection" and v.instruction and not v.restart:
                inputs[k], next_instruction[k], from_source[k] = last.image, v.instruction, False
            else:  # failed (or a reflection that asks to restart): back to the source
                inputs[k], from_source[k] = sources[k], True
                next_instruction[k] = v.instruction or planned[k]
            still.append(k)
        live = still
        if not live:
            break
    for k in live:
        traces[k].stopped = traces[k].stopped or "round_limit"
    for t in traces:
        t.best = best_round(t.rounds)
        if t.parse_errors:
            log.info("%d reply(ies) did not parse for %r; those rounds counted as failed", t.parse_errors,
                     t.instruction)
    return traces


__all__ = ["best_round", "edit_with_reasoning"]
