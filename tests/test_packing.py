"""Preprocessing records into segments, packing them, and the packed rows against each sample alone."""

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from reasonedit.data.packing import Packer, best_fit_decreasing
from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
from reasonedit.data.segments import BucketConfig, ConditionDropout, GeneratorSegment, IGNORE_INDEX, ReasonerSegment, resize_to, stage3_lengths
from reasonedit.data.samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
from reasonedit.shapes.synth import Synthesizer
from reasonedit.config.model import ModelConfig
from reasonedit.models.generator import target_predictions
from reasonedit.models.inputs import condition_states, generator_inputs, mixed_inputs, reasoner_inputs
from reasonedit.models.model import ReasonEditModel
from reasonedit.models.tokenizer import IM_END_TOKEN

KINDS = ("thinking_pair", "reflection", "edit_pair", "text_to_image")
ATOL = 1e-5


def record_texts(records):
    for r in records:
        if isinstance(r, EditPair):
            yield r.instruction
        elif isinstance(r, ThinkingPair):
            yield from (r.abstract_instruction, r.concrete_instruction)
        elif isinstance(r, ReflectionSample):
            yield from (r.instruction, r.target_description, r.reason, r.thought, r.new_instruction)
        elif isinstance(r, TextToImage):
            yield r.caption


@pytest.fixture(scope="module")
def records(world):
    synth = Synthesizer(world, seed=3)
    return {kind: [synth.make(kind, "train", i) for i in range(3)] for kind in KINDS}


@pytest.fixture(scope="module")
def model(records):
    every = [r for rs in records.values() for r in rs]
    return ReasonEditModel.tiny(ModelConfig(), list(record_texts(every)), seed=0).eval()


@pytest.fixture(scope="module")
def preprocessor(model):
    return Preprocessor.from_model(model, PreprocessConfig(buckets=buckets_for(model, 224 * 224)))


@pytest.fixture(scope="module")
def text_segments(preprocessor, records):
    return [s for r in records["thinking_pair"][:2] + records["reflection"][:2]
            for s in preprocessor.reasoner_segments(r)]


@pytest.fixture(scope="module")
def gen_segments(model, records):
    # half the sources dropped (seeded), so the batch mixes one- and zero-source samples
    config = PreprocessConfig(buckets=buckets_for(model, 224 * 224), dropout=ConditionDropout(text=0.0, image=0.5),
                              seed=3)
    pre = Preprocessor.from_model(model, config)
    return [s for r in records["edit_pair"] + records["text_to_image"][:2] + records["thinking_pair"][:1]
            for s in pre.generator_segments(r)]


@dataclass(frozen=True)
class Item:
    key: str
    num_tokens: int


def lognormal_items(n, seed, median=300, sigma=1.0):
    rng = random.Random(seed)
    return [Item(f"s{i}", max(1, int(rng.lognormvariate(math.log(median), sigma)))) for i in range(n)]


# -- reasoner segments ----------------------------------------------------------------------------------


def test_record_kinds_give_their_segments(preprocessor, records):
    roles = [[s.role for s in preprocessor.reasoner_segments(records[k][0])] for k in KINDS]
    assert roles == [["think"], ["describe", "score", "decide"], [], []]
    gens = [len(preprocessor.generator_segments(records[k][0])) for k in KINDS]
    assert gens == [1, 0, 1, 1]


def test_labels_are_the_answer_and_its_im_end_only(preprocessor, text_segments):
    tokenizer = preprocessor.processor.tokenizer
    for seg in text_segments:
        labels, ids = seg.labels[0], seg.input_ids[0]
        kept = (labels != IGNORE_INDEX).nonzero().flatten()
        start = int(kept[0])
        # one contiguous run that ends the segment, and the labels there are the input ids
        assert kept.tolist() == list(range(start, seg.num_tokens)), seg.key
        assert torch.equal(labels[start:], ids[start:])
        assert tokenizer.decode(labels[start:].tolist()) == seg.answer + IM_END_TOKEN, seg.key
        # what precedes the answer is exactly the prompt with its generation prompt
        assert tokenizer.decode(ids[:start].tolist()).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_answer_span_errors_name_the_segment(preprocessor, records, monkeypatch):
    from reasonedit.models import prompts
    pair = records["thinking_pair"][0]
    with pytest.raises(ValueError, match=f"{pair.key}/think.*{IM_END_TOKEN}"):
        preprocessor.answer_segment(f"{pair.key}/think", "think", prompts.think(pair.image, "x"), "a<|im_end|>b")
    # a prompt that does not tokenize to a prefix of the conversation is refused, not mislabelled
    real = preprocessor._prompt_ids
    monkeypatch.setattr(preprocessor, "_prompt_ids", lambda *a: real(*a)[:-1] + [0])
    with pytest.raises(ValueError, match="not a prefix"):
        preprocessor.reasoner_segments(pair)


@torch.no_grad()
def test_packed_reasoner_logits_equal_each_segment_alone(model, text_segments):
    reasoner = model.reasoner
    row = reasoner_inputs(text_segments, reasoner)
    out = reasoner.forward_packed(row)
    logits = row.split(out.logits)
    assert row.lengths == [s.num_tokens for s in text_segments]
    for seg, got in zip(text_segments, logits):
        alone = reasoner.model(input_ids=seg.input_ids, attention_mask=torch.ones_like(seg.input_ids),
                               pixel_values=seg.pixel_values, image_grid_thw=seg.image_grid_thw,
                               mm_token_type_ids=seg.mm_token_type_ids, use_cache=False).logits[0]
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=0, msg=seg.key)
    # the packed loss is the token-weighted mean of each segment's loss alone
    losses, counts = [], []
    for seg in text_segments:
        alone = reasoner.model(**seg.inputs(), attention_mask=torch.ones_like(seg.input_ids), use_cache=False)
        losses.append(alone.loss)
        counts.append(int((seg.labels[0, 1:] != IGNORE_INDEX).sum()))
    want = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(out.loss, want, atol=ATOL, rtol=0)


# -- generator segments ---------------------------------------------------------------------------------


def test_generator_token_counts_match_the_packed_row(model, gen_segments):
    assert {len(s.source_images) for s in gen_segments} == {0, 1}
    states = condition_states(gen_segments, model.reasoner)
    inputs = generator_inputs(gen_segments, [s.detach() for s in states], [0.5] * len(gen_segments),
                              model.generator, rng=torch.Generator().manual_seed(0))
    assert len(inputs.batch) == sum(s.num_tokens for s in gen_segments)
    assert inputs.batch.text_lengths == [s.text_tokens for s in gen_segments]
    for seg, (a, b) in zip(gen_segments, inputs.batch.target_ranges):
        assert b - a == seg.target_tokens
        assert sum(z.shape[-2] * z.shape[-1] for z in seg.source_latents) // 4 == seg.source_tokens


@torch.no_grad()
def test_packed_generator_outputs_equal_each_sample_alone(model, gen_segments):
    n = len(gen_segments)
    timesteps = [0.1 + 0.8 * i / n for i in range(n)]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(s.target_latent.shape, generator=g) for s in gen_segments]
    states = condition_states(gen_segments, model.reasoner)
    packed = generator_inputs(gen_segments, states, timesteps, model.generator, noise=noise)
    predictions = target_predictions(packed.batch, model.generator(packed.batch))
    for i, seg in enumerate(gen_segments):
        alone_states = condition_states([seg], model.reasoner)
        torch.testing.assert_close(states[i], alone_states[0], atol=ATOL, rtol=0, msg=seg.key)
        alone = generator_inputs([seg], alone_states, [timesteps[i]], model.generator, noise=[noise[i]])
        want = target_predictions(alone.batch, model.generator(alone.batch))[0]
        torch.testing.assert_close(predictions[i], want, atol=ATOL, rtol=0, msg=seg.key)
        # x_t = (1 - s) x0 + s noise, and the loss target is noise - x0
        s, x0 = timesteps[i], seg.target_latent
        torch.testing.assert_close(packed.samples[i].target, (1 - s) * x0 + s * noise[i])
        torch.testing.assert_close(packed.velocity[i], noise[i] - x0)


@torch.no_grad()
def test_stage3_mixed_row_equals_each_segment_alone(model, text_segments, gen_segments):
    items = text_segments[:3] + gen_segments[:3]
    packer = Packer((1024, 1024), window=len(items), length=stage3_lengths, min_fill=1.0)
    batches = list(packer.pack(items))
    assert all(b.tokens[0] <= 1024 and b.tokens[1] <= 1024 for b in batches)
    batch = max(batches, key=len)
    assert {type(s) for s in batch.items} == {ReasonerSegment, GeneratorSegment}
    mixed = mixed_inputs(batch.items, model.reasoner)
    reasoner = model.reasoner
    states = mixed.split_condition_states(reasoner.packed_hidden_states(mixed.row))
    logits = mixed.row.split(reasoner.forward_packed(mixed.row).logits)
    for seg, got in zip(mixed.reasoner_segments, logits):
        alone = reasoner.forward_packed(reasoner_inputs([seg], reasoner)).logits[0]
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=0, msg=seg.key)
    for seg, got in zip(mixed.generator_segments, states):
        torch.testing.assert_close(got, condition_states([seg], reasoner)[0], atol=ATOL, rtol=0, msg=seg.key)
    # condition prompts carry no labels
    for d in mixed.condition_docs:
        assert (mixed.row.split(mixed.row.labels[..., None])[d] == IGNORE_INDEX).all()


def test_a_row_without_images_runs_the_vision_tower_on_an_idle_image_that_changes_nothing(model, records):
    """Under FSDP2 and ZeRO-3 every rank runs the same modules each step: a stage-3 row holding no image (captions
    only) gets a blank image document of its own, which no label reads and no other document sees."""
    from reasonedit.stages.base import StageContext, idle_generator_term
    captions = [s for s in Preprocessor.from_model(model).generator_segments(records["text_to_image"][0])]
    assert captions and all("pixel_values" not in s.condition for s in captions)
    plain, idle = mixed_inputs(captions, model.reasoner), mixed_inputs(captions, model.reasoner, with_image=True)
    assert plain.row.pixel_values is None and idle.row.pixel_values is not None
    assert len(idle.row.lengths) == len(plain.row.lengths) + 1 and (idle.row.labels[0, sum(plain.row.lengths):]
                                                                     == IGNORE_INDEX).all()
    with torch.no_grad():
        a = plain.split_condition_states(model.reasoner.packed_hidden_states(plain.row))
        b = idle.split_condition_states(model.reasoner.packed_hidden_states(idle.row))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    # a rank with no generator sample runs the generator on a dummy that adds zero, with gradients of zero
    hidden = torch.randn(3, model.reasoner.hidden_size, requires_grad=True)
    term = idle_generator_term(model, StageContext(None, torch.Generator(), torch.device("cpu")), hidden)
    term.sum.backward()
    assert term.sum.item() == 0.0 and term.count.item() == 0 and hidden.grad is not None
    grads = dict(model.generator.named_parameters())
    assert all(not p.grad.any() for p in grads.values() if p.grad is not None)
    last = f"transformer_blocks.{len(model.generator.transformer_blocks) - 1}."  # its text output is never read
    assert {n for n, p in grads.items() if p.grad is None} <= {n for n in grads if n.startswith(last)}
    model.generator.zero_grad(set_to_none=True)


# -- the packer -----------------------------------------------------------------------------------------


def test_best_fit_decreasing_puts_each_item_in_the_tightest_bin():
    lengths = [(n,) for n in (5, 7, 3, 2, 4, 6)]
    # 7, 6 and 5 each open a bin (rooms 3, 4, 5); 4 takes the tightest room that fits it (bin 1, room 4,
    # not bin 2's 5); 3 fills bin 0; 2 goes to the only bin with room left
    assert best_fit_decreasing(lengths, (10,)) == [[1, 2], [5, 4], [0, 3]]


def test_no_batch_exceeds_the_budget_and_every_item_comes_out_once_or_as_oversize():
    items = lognormal_items(3000, seed=0, median=400, sigma=1.2)
    packer = Packer(4096, window=128)
    batches = list(packer.pack(items))
    assert all(sum(b.lengths[i][0] for i in range(len(b))) <= 4096 for b in batches)
    out = [it.key for b in batches for it in b.items]
    oversize = [it.key for it in items if it.num_tokens > 4096]
    assert oversize and len(out) == len(set(out))
    assert sorted(out + oversize) == sorted(it.key for it in items)
    assert packer.stats.oversize == len(oversize) and packer.stats.oversize_keys == oversize
    assert packer.stats.items == len(out) and packer.pending() == []


def test_oversize_items_are_counted_and_logged(caplog):
    packer = Packer(256, window=4, name="reasoner")
    with caplog.at_level(logging.WARNING, logger="reasonedit.data.packing"):
        batches = list(packer.pack([Item("ok", 100), Item("huge", 300), Item("ok2", 50)]))
    assert [it.key for b in batches for it in b.items] == ["ok", "ok2"]
    assert packer.stats.oversize == 1 and packer.stats.oversize_tokens == [300]
    assert "reasoner: skipped huge: [300] tokens is over the budget [256]" in caplog.text


def test_utilisation_is_real_tokens_over_the_budget():
    items = lognormal_items(500, seed=1, median=200, sigma=0.5)
    packer = Packer(2048, window=64)
    batches = list(packer.pack(items))
    for b in batches:
        assert b.utilisation == pytest.approx(sum(it.num_tokens for it in b.items) / 2048)
    total = sum(it.num_tokens for b in batches for it in b.items)
    assert packer.stats.utilisation == pytest.approx(total / (2048 * len(batches)))
    assert packer.stats.tokens == [total] and packer.stats.batches == len(batches)
    # bins leave the window full unless forced out
    assert all(b.utilisation >= 0.99 for b in batches if b.reason == "full")


def test_packing_is_deterministic_and_resumes_from_its_pending_window():
    items = lognormal_items(1500, seed=2)

    def keys(batches):
        return [[it.key for it in b.items] for b in batches]

    whole = keys(Packer(4096, window=100, max_age=400).pack(items))
    assert whole == keys(Packer(4096, window=100, max_age=400).pack(items))
    first = Packer(4096, window=100, max_age=400)
    head = [b for it in items[:700] for b in first.add(it)]
    state = first.state_dict()
    assert [it.key for it in first.pending()] == [it.key for it in state["pending"]] != []
    resumed = Packer(4096, window=100, max_age=400)
    resumed.load_state_dict(state)
    tail = list(resumed.pack(items[700:]))
    assert keys(head) + keys(tail) == whole
    assert resumed.stats.batches == len(whole)


def test_max_age_bounds_how_long_an_item_waits():
    # a 2000-token item never combines well with 1200-token ones; with max_age it still leaves in time
    items = [Item("odd", 2000)] + [Item(f"x{i}", 1200) for i in range(200)]
    packer = Packer(4096, window=16, min_fill=0.99, max_age=32)
    for i, it in enumerate(items):
        if any("odd" in [x.key for x in b.items] for b in packer.add(it)):
            assert i <= 33
            break
    else:
        pytest.fail("the odd item never left the window")


def test_two_budgets_bound_both_rows():
    rng = random.Random(0)
    items = [(rng.randint(50, 400), rng.choice([0, rng.randint(100, 900)])) for _ in range(600)]
    packer = Packer((2048, 4096), window=64, length=lambda x: x)
    batches = list(packer.pack(items))
    assert sum(len(b) for b in batches) == len(items)
    assert all(b.tokens[0] <= 2048 and b.tokens[1] <= 4096 for b in batches)
    assert batches[0].utilisation == pytest.approx(sum(batches[0].utilisations) / 2)


def test_budget_must_be_a_multiple_of_the_attention_block():
    with pytest.raises(ValueError, match=r"budget \[1000\] must be positive multiples of 128.*\[1024\]"):
        Packer(1000)


# -- buckets and condition dropout ----------------------------------------------------------------------


@pytest.mark.parametrize("config", [BucketConfig(), BucketConfig(pixel_budget=224 * 224),
                                    BucketConfig(pixel_budget=512 * 512, reasoner_patch=1),
                                    BucketConfig(pixel_budget=768 * 768, vae_downsample=16)])
def test_buckets_respect_the_pixel_budget_and_side_multiples(config):
    sizes = config.sizes()
    assert config.multiple % (config.vae_downsample * config.generator_patch) == 0
    assert config.multiple % config.reasoner_patch == 0
    assert len(sizes) == len(set(sizes)) >= 3
    for h, w in sizes:
        assert h * w <= config.pixel_budget and h % config.multiple == 0 and w % config.multiple == 0
        assert h * w >= config.min_area_fraction * config.pixel_budget
    square = config.nearest(300, 300)
    assert square[0] == square[1]


def test_images_are_resized_to_the_nearest_bucket():
    config = BucketConfig(pixel_budget=1024 * 1024)
    wide = np.zeros((400, 800, 3), dtype=np.uint8)
    size = config.nearest(*wide.shape[:2])
    assert size == (672, 1344)  # the 2:1 bucket
    assert resize_to(wide, size).shape == (672, 1344, 3)
    tall = config.nearest(1000, 560)
    assert tall[0] > tall[1] and abs(math.log(tall[1] / tall[0]) - math.log(0.56)) < 0.1
    shapes = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    assert resize_to(shapes, BucketConfig(pixel_budget=224 * 224).nearest(224, 224)) is shapes


def test_condition_dropout_rates_hold_and_are_deterministic_per_seed():
    dropout = ConditionDropout(text=0.1, image=0.3)
    n = 20000
    draws = [dropout.draw(f"train_edit_{i:07d}/generate", seed=5) for i in range(n)]
    for rate, got in ((0.1, sum(t for t, _ in draws)), (0.3, sum(i for _, i in draws))):
        assert abs(got / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    both = sum(t and i for t, i in draws) / n
    assert abs(both - 0.03) < 4 * math.sqrt(0.03 * 0.97 / n)
    assert draws == [dropout.draw(f"train_edit_{i:07d}/generate", seed=5) for i in range(n)]
    assert draws != [dropout.draw(f"train_edit_{i:07d}/generate", seed=6) for i in range(n)]
    with pytest.raises(ValueError, match="dropout.image"):
        ConditionDropout(image=1.5).validate()


def test_dropped_conditions_change_the_prompt_and_the_counts(model, records):
    base = PreprocessConfig(buckets=buckets_for(model, 224 * 224))
    keep = Preprocessor.from_model(model, base).generator_segments(records["edit_pair"][0])[0]
    drop = Preprocessor.from_model(model, PreprocessConfig(base.buckets, ConditionDropout(text=1.0, image=1.0))
                                   ).generator_segments(records["edit_pair"][0])[0]
    assert not keep.dropped_text and not keep.dropped_image and keep.source_tokens == keep.target_tokens == 196
    assert drop.dropped_text and drop.dropped_image and drop.instruction == ""
    assert drop.source_tokens == 0 and drop.source_latents == [] and "pixel_values" not in drop.condition
    assert drop.num_tokens < keep.num_tokens


def test_latents_are_encoded_on_the_codecs_device_and_dtype_and_come_back_float32_on_cpu(model, records):
    from reasonedit.models.vae import QwenImageVAE
    vae = QwenImageVAE.tiny(z_dim=4).to(torch.bfloat16)  # a half-precision VAE, as on a GPU
    config = PreprocessConfig(buckets=buckets_for(model, 224 * 224, vae_downsample=vae.downsample))
    pre = Preprocessor(model.reasoner.processor, vae, config)
    (seg,) = pre.generator_segments(records["edit_pair"][0])
    pre.encode_latents([seg])
    assert seg.target_latent.dtype == torch.float32 and seg.target_latent.device.type == "cpu"
    assert seg.target_latent.shape[0] == 4 and torch.isfinite(seg.target_latent).all()
