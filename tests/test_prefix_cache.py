"""The prefix KV cache: replies equal to uncached greedy generation, and one prefix forward per source image."""

import numpy as np
import pytest
import torch

from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.prefix_cache import PrefixCache
from reasonedit.models import prompts
from reasonedit.testing.models import WELL_FORMED, lively_tiny_model, noise_image


@pytest.fixture(scope="module")
def model():
    return lively_tiny_model()


image = noise_image


def test_cached_replies_equal_uncached_greedy_generation_token_for_token(model):
    # four sources, two of one size (their prefixes share a batch), and prompts of different lengths per source
    sources = [image(56, 56, 0), image(84, 112, 1), image(112, 56, 2), image(56, 56, 3)]
    batch = []
    for k, s in enumerate(sources):
        batch += [prompts.think(s, f"make the red circle blue {k}"), prompts.describe_target(s, "remove the star " * k),
                  prompts.decide(s, "make it blue", "a blue circle", k, "still red")]
    batch.append(prompts.score(sources[1], "a blue circle"))
    reasoner = model.reasoner
    plain = reasoner.generate(batch, max_new_tokens=16)
    cache = PrefixCache(reasoner)
    assert cache.generate(batch, max_new_tokens=16) == plain
    assert cache.generate(batch, max_new_tokens=16) == plain  # the second time every prefix comes from the cache
    assert (cache.misses, cache.hits, cache.prefills, cache.uncached) == (4, 9 + 13, 3, 0)
    assert len(set(plain)) == len(plain)  # the replies differ: the comparison is not between constant outputs


def test_the_prefix_ends_right_after_the_source_image_for_every_role(model):
    tok, source = model.reasoner.tokenizer, image(56, 84, 0)
    ids = [model.reasoner.processor.encode_one(m)["input_ids"][0].tolist()
           for m in (prompts.think(source, "a"), prompts.describe_target(source, "b c"),
                     prompts.decide(source, "d", "e", 1, "f"))]
    end = ids[0].index(tok.convert_tokens_to_ids("<|vision_end|>")) + 1
    assert ids[1][:end] == ids[2][:end] == ids[0][:end]
    assert tok.decode(ids[0][:end]).startswith(f"<|im_start|>system\n{prompts.REASONER_SYSTEM_PROMPT}<|im_end|>")


def test_a_loop_of_several_rounds_computes_each_source_prefix_once(model):
    sources, rounds = [image(64, 64, 5), image(64, 64, 6)], 3
    thinker = ReasonerThinker(model, max_new_tokens=4)
    cache, real = thinker.prefix_cache, thinker.generate
    calls = []  # per call: role, prefixes computed, images through the vision tower
    encoded = []
    hook = model.reasoner.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)

    def generate(batch):
        misses, encoded[:] = cache.misses, []
        real(batch)  # the real cached generation; then a well-formed reply, so every phase runs every round
        calls.append((prompts.role_of(batch[0]), cache.misses - misses, sum(encoded)))
        return [WELL_FORMED[prompts.role_of(c)] for c in batch]
    thinker.generate = generate
    try:
        traces = edit_with_reasoning(GeneratorEditor(model), thinker, sources, ["make it blue"] * 2, rounds=rounds,
                                     num_inference_steps=1)
    finally:
        hook.remove()
    assert [len(t.rounds) for t in traces] == [rounds, rounds]
    n = len(sources)
    assert calls[0] == ("think", n, n)  # each source's prefix: computed once, in think
    assert [c[0] for c in calls] == ["think", "describe", "score", "decide"] + ["score", "decide"] * (rounds - 1)
    assert thinker.calls["describe"] == n  # the target is described once per source, not once per round
    assert all(c[1:] == (0, 0) for c in calls if c[0] in ("describe", "decide"))  # never again for any round
    assert all(c[1] >= 1 for c in calls if c[0] == "score")  # the edit is new each round (equal edits share one)
    assert len(cache) == n  # the edited images scored are not kept


def test_the_thinker_cache_option_is_checked(model):
    assert ReasonerThinker(model).prefix_cache is not None
    assert ReasonerThinker(model, cache="vision").vision_cache is not None
    with pytest.raises(ValueError, match="cache: 'kv' is not one of prefix, vision, none"):
        ReasonerThinker(model, cache="kv")


def test_the_model_generation_config_rules_apply_as_in_generate(model):
    # released Qwen2.5-VL ships repetition_penalty 1.05, which transformers applies to greedy generate too
    config = model.reasoner.model.generation_config
    sources = [image(56, 84, 7), image(84, 56, 8)]
    batch = [prompts.think(s, "make it blue") for s in sources] + [prompts.describe_target(s, "a") for s in sources]
    before, default = model.reasoner.generate(batch, max_new_tokens=16), config.repetition_penalty
    config.repetition_penalty = 5.0
    try:
        plain = model.reasoner.generate(batch, max_new_tokens=16)
        cached = PrefixCache(model.reasoner).generate(batch, max_new_tokens=16)
    finally:
        config.repetition_penalty = default
    assert cached == plain and plain != before
