"""The condition prefix cache: the generator's text stream equal to the uncached states, one prefix per source."""

import numpy as np
import pytest
import torch

from reasonedit.inference.builtin import GeneratorEditor, ReasonerThinker
from reasonedit.inference.condition_prefix import ConditionPrefixCache, prefix_end
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.types import EditRequest
from reasonedit.models import prompts
from reasonedit.testing.models import WELL_FORMED, lively_tiny_model, noise_image

INSTRUCTIONS = ["make the red circle blue", "remove the star", " "]  # " ": the negative prompt


@pytest.fixture(scope="module")
def model():
    return lively_tiny_model()


image = noise_image


def assert_states_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_cached_condition_states_equal_uncached_ones_for_every_source_and_instruction(model):
    # three sources, two of one size; a two-image prompt; every instruction about each, as one batch
    sources = [image(56, 56, 0), image(84, 112, 1), image(56, 56, 2), [image(56, 84, 3), image(56, 56, 4)]]
    images = [s for s in sources for _ in INSTRUCTIONS]
    texts = [t for _ in sources for t in INSTRUCTIONS]
    reasoner = model.reasoner
    with torch.no_grad():
        plain = reasoner.condition_states(images, texts, packed=True)
        padded = reasoner.condition_states(images, texts, packed=False)
    cache = ConditionPrefixCache(reasoner)
    first = cache.states(images, texts)
    assert_states_equal(first, plain)
    assert_states_equal(first, padded)
    assert (cache.computed, cache.prefills, cache.hits) == (len(sources), 1, len(images) - len(sources))
    # later rounds: one instruction per source, in another order, every prefix read back from the store
    again = cache.states(images[::-1], texts[::-1])
    assert_states_equal(again, plain[::-1])
    assert (cache.computed, cache.prefills, cache.prompts, cache.uncached) == (len(sources), 1, 2 * len(images), 0)
    # the states differ by source and by instruction: the comparison is not between constant outputs
    assert not torch.allclose(plain[0][-3:], plain[1][-3:]) and not torch.allclose(plain[0], plain[6])


def test_one_prompt_alone_and_a_text_to_image_prompt_equal_the_uncached_states(model):
    reasoner, source = model.reasoner, image(84, 56, 5)
    cache = ConditionPrefixCache(reasoner)
    with torch.no_grad():
        want = reasoner.condition_states([source, []], ["make the red circle blue", "a red circle"], packed=True)
    assert_states_equal(cache.states([source], ["make the red circle blue"]), want[:1])
    assert_states_equal(cache.states([[]], ["a red circle"]), want[1:])  # no image: no prefix, the uncached path
    assert (cache.computed, cache.uncached) == (1, 1)


@pytest.mark.parametrize("template", [prompts.OWN_TEMPLATE,
                                      prompts.ConditionTemplate("labelled", "Edit.", label="Picture {}: ",
                                                                label_one=True)])
def test_the_prefix_ends_where_two_instructions_first_differ(model, template):
    reasoner = model.reasoner
    vision_end = reasoner.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    for images in ([image(56, 56, 6)], [image(56, 56, 6), image(84, 56, 7)]):
        a, b = (prompts.encode_condition(reasoner.processor, images, text, template)
                for text in ("make the red circle blue", "remove the star"))
        ids_a, ids_b = a["input_ids"][0].tolist(), b["input_ids"][0].tolist()
        first_difference = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
        assert prefix_end(ids_a, a["mm_token_type_ids"][0].tolist(), vision_end) == first_difference
        assert prefix_end(ids_b, b["mm_token_type_ids"][0].tolist(), vision_end) == first_difference


def test_a_loop_from_the_source_computes_each_condition_prefix_once(model):
    # EditThinker's rules edit the source every round: prompt, negative prompt and every round share one prefix
    sources, rounds = [image(64, 64, 8), image(64, 64, 9)], 3
    thinker = ReasonerThinker(generate=lambda batch: [WELL_FORMED[prompts.role_of(c)] for c in batch])
    editor = GeneratorEditor(model)
    encoded = []
    hook = model.reasoner.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)
    try:
        traces = edit_with_reasoning(editor, thinker, sources, ["make it blue"] * 2, rounds=rounds,
                                     num_inference_steps=1, loop="editthinker")
    finally:
        hook.remove()
    assert [len(t.rounds) for t in traces] == [rounds, rounds]
    cache = editor.prefix_cache
    assert cache.computed == len(sources) and sum(encoded) == len(sources)  # the vision tower saw each source once
    assert cache.prompts == 2 * len(sources) * rounds  # prompt and negative prompt, every round
    plain = GeneratorEditor(model, cache="none")
    for t, s in zip(traces, sources):
        for r in t.rounds:
            again = plain.edit([EditRequest(image=s, prompt=r.instruction, seed=r.seed, num_inference_steps=1)])[0]
            assert np.abs(again.astype(int) - r.image.astype(int)).max() <= 1  # equal states, to float rounding


def test_the_editor_cache_option_is_checked(model):
    assert GeneratorEditor(model).prefix_cache is not None
    assert GeneratorEditor(model, cache="none").prefix_cache is None
    with pytest.raises(ValueError, match="cache: 'kv' is not one of prefix, none"):
        GeneratorEditor(model, cache="kv")
