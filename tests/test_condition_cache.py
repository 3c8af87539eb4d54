import random

import pytest
import torch

from reasonedit.data.condition_cache import ConditionCache, reasoner_fingerprint
from reasonedit.models.reasoner import Reasoner

TEXTS = ["make the red circle blue", "remove the star", "swap the two squares"]


@pytest.fixture()
def reasoner():
    return Reasoner.tiny(TEXTS, seed=0).eval()


@pytest.fixture(scope="module")
def images(world):
    rng = random.Random(1)
    return [world.render(world.random_scene(rng, n)) for n in (1, 3, 5)]


def counting(reasoner, monkeypatch):
    calls = {"n": 0}
    real = reasoner.encoded_condition_states  # what the cache computes misses with

    def wrapped(samples, **kw):
        calls["n"] += len(samples)
        return real(samples, **kw)
    monkeypatch.setattr(reasoner, "encoded_condition_states", wrapped)
    return calls


def test_second_read_is_a_hit_and_bitwise_equal(reasoner, images, tmp_path, monkeypatch):
    cache = ConditionCache(tmp_path, reasoner)
    calls = counting(reasoner, monkeypatch)
    first = cache.states(images, TEXTS)
    again = cache.states(images, TEXTS)
    assert calls["n"] == 3 and (cache.stats.hits, cache.stats.misses) == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = reasoner.condition_states(images, TEXTS, packed=False)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(first, fresh))


def test_only_the_new_samples_are_computed(reasoner, images, tmp_path, monkeypatch):
    cache = ConditionCache(tmp_path, reasoner)
    cache.states(images[:2], TEXTS[:2])
    calls = counting(reasoner, monkeypatch)
    cache.states(images, TEXTS)
    assert calls["n"] == 1


def test_a_changed_instruction_or_image_is_a_different_entry(reasoner, images, tmp_path):
    cache = ConditionCache(tmp_path, reasoner)
    cache.states(images[:1], TEXTS[:1])
    cache.states(images[:1], ["make the red circle green"])
    cache.states(images[1:2], TEXTS[:1])
    assert cache.stats.misses == 3 and cache.stats.hits == 0


def test_changed_weights_or_template_invalidate_the_cache(reasoner, images, tmp_path):
    before = ConditionCache(tmp_path, reasoner)
    before.states(images, TEXTS)
    with torch.no_grad():
        reasoner.model.model.language_model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    after = ConditionCache(tmp_path, reasoner)
    assert after.fingerprint != before.fingerprint
    after.states(images, TEXTS)
    assert after.stats.hits == 0 and after.stats.misses == 3
    fp = reasoner_fingerprint(reasoner)
    reasoner.tokenizer.chat_template = reasoner.tokenizer.chat_template + " "
    assert reasoner_fingerprint(reasoner) != fp


def test_a_torn_entry_is_recomputed_not_trusted(reasoner, images, tmp_path):
    cache = ConditionCache(tmp_path, reasoner)
    first = cache.states(images[:1], TEXTS[:1])
    (entry,) = list(cache.dir.rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:20])
    again = ConditionCache(tmp_path, reasoner)
    got = again.states(images[:1], TEXTS[:1])
    assert again.stats.unreadable == 1 and torch.allclose(got[0], first[0], atol=1e-6)
    assert not list(cache.dir.rglob(".*"))  # no temporary files left behind


def test_stage_two_reads_every_segment_through_the_cache_text_to_image_too(reasoner, images, tmp_path):
    from types import SimpleNamespace

    from reasonedit.models import prompts
    from reasonedit.stages.editing import EditingStage

    def segment(pictures, text):
        return SimpleNamespace(condition=prompts.encode_condition(reasoner.processor, pictures, text),
                               prefix_tokens=reasoner.condition_prefix_length, source_images=list(pictures))
    segments = [segment([images[0]], TEXTS[0]), segment([], "a red circle"), segment([images[1]], TEXTS[1])]
    model = SimpleNamespace(reasoner=reasoner, config=SimpleNamespace(attention_backend="auto"))
    stage = EditingStage.__new__(EditingStage)
    plain = stage.states(model, segments, SimpleNamespace(condition_cache=None))
    cache = ConditionCache(tmp_path, reasoner)
    first = stage.states(model, segments, SimpleNamespace(condition_cache=cache))
    again = stage.states(model, segments, SimpleNamespace(condition_cache=cache))
    assert (cache.stats.misses, cache.stats.hits) == (3, 3)  # the caption (no source image) is cached as well
    # the misses are one packed row, as the plain path packs them: the same bits, then read back unchanged
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, first, again))
