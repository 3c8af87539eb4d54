"""Training-step throughput and MFU of each stage, packed rows against padded batches of the same samples.

    python bench/train_step.py [--model tiny|qwen-image-edit|PATH.yaml] [--stages 1,2,3] [--steps 5]
                               [--warmup 2] [--records 48] [--image-size 224] [--vocab N] [--peak-tflops X]
                               [key=value ...]     # experiment overrides, e.g. model.generator.num_layers=4

The model is built at the config's shapes with random weights (nothing is loaded or downloaded):
the reasoner is a Qwen2.5-VL of the configured sizes whose tokenizer is learned from the synthetic
shapes data, its embeddings padded to `--vocab` rows (default: Qwen2.5-VL-7B's 152064 for the
qwen-image-edit preset, so the LM head has its real cost); the generator is the packed MMDiT; the VAE
the patch codec, or a random AutoencoderKLQwenImage for `vae.kind=qwen_image`. Scale a real preset
down with overrides (`model.reasoner.num_layers=4 model.generator.num_layers=4`) to fit one GPU.

Per stage, batches come from the real data path (synthetic records -> loader -> Preprocessor ->
the stage's packer) and are drawn before timing. A step is what the trainer does for one micro-batch
on one rank, through the trainer's own `reasonedit.training.step.Stepper`: the stage's `loss_sums`
(stage code, compiled FlexAttention on CUDA, SDPA on CPU) under bf16 autocast on CUDA, `normalise`,
`combine`, backward, gradient clipping, AdamW (no schedule), and the generator EMA. Padded: the same
batches, each as one padded batch of its samples (every sample right-padded to the longest), through
the stock modules a run without packing uses: transformers' Qwen2.5-VL with an attention mask and
diffusers' QwenImageTransformer2DModel sharing the generator's weights, with the same losses. Warm-up
steps are excluded; figures are medians over timed steps.

Prints, per stage, the model FLOPs by part, one line per layout and the ratio:

    stage2 model FLOPs by part: reasoner.matmul 22%, reasoner.vision 19%, ..., generator.matmul 54%, ...
    stage2 packed: 19,769 tokens/s | step 0.414 s (median of 5) | 33.2 TFLOP/step | MFU 8.1% of 989.4 TFLOP/s
    stage2 padded: 11,224 tokens/s | step 0.726 s (median of 5) | 33.2 TFLOP/step | MFU 4.4% of 989.4 TFLOP/s
    stage2 packed/padded: 1.76x tokens/s on the same 5 batches (padded batches are 14.6% padding)

(one H100, qwen-image-edit widths at 4 + 4 layers, 448 px; on a CPU the lines end "MFU: n/a on CPU").

After each layout's line, the calls of the registered attention functions in one more step of it (the last
batch again), counted by `reasonedit.models.reasoner.attention_calls`; the vision tower makes one per layer
per forward over all the step's images (per window before the packed vision tower):

    stage1 packed attention calls per step: vision tower 2 (1 forward x 2 layers), language model 2, all 4

Then the host syncs and collectives of one more packed step (`reasonedit.testing.syncs.HostSyncs`), and the
packed step time before its figures stayed on the device (the step's counts read back and its figures read every
step) against now (read at the logging cadence), on the same batches in this run:

    stage2 packed host syncs per step: 1 (tolist @ reasonedit/training/step.py:107), collectives 0
    stage2 packed before/after: step 0.215 s reading every step (2 host syncs) / 0.214 s on the device (1): 1.00x

(a CPU waits for no queue, so the ratio there is about 1; on a GPU each sync drains the queue.)

tokens/s counts real tokens only (the packed rows' tokens, as the trainer's progress line does: stage 1
the reasoner row, stage 2 the generator row, stage 3 both). Model FLOPs (`reasonedit.training.flops`)
count real tokens only, for both layouts:

    matmuls:   sum over weights W of  k * W.numel() * tokens(W),   k = 6 trained, 4 frozen with
               gradients passing through (stage 1/3 language model, LM head), 2 forward only
               (stage 2's reasoner, the vision tower)
    attention: sum over layers of  a * d_attn * pairs,   a = 12 with backward, 4 forward only;
               pairs = L^2 per full-attention document (generator sample), L(L+1)/2 per causal one
               (reasoner sample), per window for the vision tower's windowed layers

MFU = model FLOPs / step time / the device's dense bf16 peak (looked up by CUDA device name, e.g.
H100 SXM 989.4 TFLOP/s; `--peak-tflops` to set it). On a CPU no peak is claimed: "MFU: n/a on CPU".
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reasonedit.config import ConfigError, load_config  # noqa: E402
from reasonedit.data.packing import PackedBatch  # noqa: E402
from reasonedit.data.segments import GeneratorSegment, IGNORE_INDEX, ReasonerSegment  # noqa: E402
from reasonedit.losses import flow_matching_loss, next_token_loss, sample_timesteps  # noqa: E402
from reasonedit.losses import timestep_weights  # noqa: E402
from reasonedit.stages import StageContext, stage_for  # noqa: E402
from reasonedit.training.distributed import World  # noqa: E402
from reasonedit.training.flops import (  # noqa: E402
    FlopCount, GeneratorDoc, ReasonerDoc, bf16_peak_tflops, generator_flops, reasoner_flops)
from reasonedit.training.step import Stepper  # noqa: E402

log = logging.getLogger("bench.train_step")

QWEN25_VL_7B_VOCAB = 152064  # Qwen2.5-VL-7B's embedding rows
STAGE_NAMES = {1: "reasoning", 2: "editing", 3: "unified"}


# -- setup -----------------------------------------------------------------------------------------

def experiment_config(model: str, image_size: int, overrides: list[str]):
    """The demo experiment with the chosen model preset (or YAML file), the image size and overrides."""
    preset = model
    if model.endswith((".yaml", ".yml")):
        path = Path(model).resolve()
        if not path.is_file():
            raise ConfigError(f"--model: model config file not found: {model}")
        preset = str(path)
    base = [f"model={preset}", "model.source=tiny", f"world.image_size={image_size}",
            f"batches.pixel_budget={image_size * image_size}", "data.splits=[train]"]
    return load_config(ROOT / "configs" / "experiment" / "shapes_tiny.yaml", base + list(overrides))[1]


class DeviceCodec(torch.nn.Module):
    """A codec whose encode moves the preprocessor's CPU pixels to the codec's own device first."""

    def __init__(self, codec: torch.nn.Module):
        super().__init__()
        self.codec = codec
        self.latent_channels, self.downsample = codec.latent_channels, codec.downsample

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        params = list(self.codec.parameters())
        device = params[0].device if params else pixels.device
        return self.codec.encode(pixels.to(device)).float()


def build_model(cfg, data: Path, device: torch.device, vocab: int):
    """A ReasonEditModel of the config's shapes with random weights, built directly on `device`."""
    from diffusers import AutoencoderKLQwenImage

    from reasonedit.data.corpus import dataset_texts
    from reasonedit.models.model import ReasonEditModel, build_generator
    from reasonedit.models.reasoner import Reasoner
    from reasonedit.models.vae import PatchCodec, QwenImageVAE

    m, r = cfg.model, cfg.model.reasoner
    with torch.device(device):
        reasoner = Reasoner.tiny(dataset_texts(data, split="train"), vocab_size=r.vocab_size, seed=cfg.seed,
                                 max_pixels=cfg.batches.pixel_budget, hidden_size=r.hidden_size,
                                 num_layers=r.num_layers, num_heads=r.num_heads, num_kv_heads=r.num_kv_heads,
                                 intermediate_size=r.intermediate_size, vision_depth=r.vision_depth,
                                 vision_hidden_size=r.vision_hidden_size, vision_heads=r.vision_heads,
                                 vision_intermediate_size=r.vision_intermediate_size)
        if vocab > reasoner.model.get_input_embeddings().num_embeddings:
            reasoner.model.resize_token_embeddings(vocab, mean_resizing=False)
        generator = build_generator(m, cfg.seed)
        if m.vae.kind == "patch":
            vae = PatchCodec(m.vae.patch_size)
        else:  # the real Qwen-Image VAE architecture, random weights
            vae = QwenImageVAE(AutoencoderKLQwenImage(z_dim=m.vae.latent_channels).eval())
    return ReasonEditModel(reasoner, generator, vae, m).to(device)


def synthesize_data(cfg, out: Path) -> Path:
    from reasonedit.shapes.world import ShapesWorld
    from reasonedit.shapes.synth import synthesize

    path = out / "data"
    synthesize(path, cfg.data, ShapesWorld(cfg.world))
    return path


# -- the two layouts of one step -------------------------------------------------------------------

def reasoner_docs(items) -> list[ReasonerDoc]:
    def grids(inputs) -> tuple:
        g = inputs.get("image_grid_thw")
        return tuple(tuple(int(x) for x in row) for row in g.tolist()) if g is not None else ()
    return [ReasonerDoc(int(d["input_ids"].shape[1]), grids(d)) for d in items]


def step_flops(stage: int, model, batch: PackedBatch) -> FlopCount:
    """Model FLOPs of one training step of `stage` over the batch's real tokens."""
    text = [s for s in batch.items if isinstance(s, ReasonerSegment)]
    gen = [s for s in batch.items if isinstance(s, GeneratorSegment)]
    gen_docs = [GeneratorDoc(s.text_tokens, s.target_tokens + s.source_tokens) for s in gen]
    qwen = model.reasoner.model
    if stage == 1:
        return reasoner_flops(qwen, reasoner_docs([s.inputs() for s in text]), gradients=True)
    if stage == 2:  # the frozen reasoner's condition states (no LM head, no gradients), then the generator
        return (reasoner_flops(qwen, reasoner_docs([s.condition for s in gen]), gradients=False, lm_head=False)
                + generator_flops(model.generator, gen_docs, gradients=True))
    docs = reasoner_docs([s.inputs() for s in text] + [s.condition for s in gen])
    return (reasoner_flops(qwen, docs, gradients=True)
            + generator_flops(model.generator, gen_docs, gradients=True))


def padded_reasoner_batch(docs: list[dict], pad_id: int, device: torch.device) -> dict:
    """Right-padded transformers inputs (with labels -100 on padding) for per-sample reasoner inputs."""
    from reasonedit.models.processor import collate

    samples = [{**d, "attention_mask": torch.ones_like(d["input_ids"])} for d in docs]
    batch = dict(collate(samples, pad_id=pad_id, padding_side="right"))
    length = batch["input_ids"].shape[1]
    labels = torch.full((len(docs), length), IGNORE_INDEX, dtype=torch.long)
    for i, d in enumerate(docs):
        if "labels" in d:
            labels[i, :d["labels"].shape[1]] = d["labels"][0]
    batch = {k: v.to(device) for k, v in batch.items()}
    return {**batch, "labels": labels.to(device), "use_cache": False}


def padded_states(hidden: torch.Tensor, batch: dict, rows: list[int], prefix: list[int]) -> list[torch.Tensor]:
    """Each condition row's last-layer states, system prefix and padding dropped."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [hidden[i, p:lengths[i]] for i, p in zip(rows, prefix)]


def padded_flow_matching(reference, segments, states, ctx: StageContext) -> dict:
    """The stage's flow-matching loss through diffusers' module on a padded batch of the segments."""
    from reasonedit.models.timesteps import noisy_target
    from reasonedit.models.generator import patchify

    fm = ctx.flow_matching
    s = sample_timesteps([seg.target_tokens for seg in segments], fm, ctx.generator)  # (B,), as the stage draws
    noise = [torch.randn(seg.target_latent.shape, generator=ctx.generator) for seg in segments]
    p = reference.config.patch_size
    images = [torch.cat([patchify(noisy_target(seg.target_latent, eps, float(t)), p)]
                        + [patchify(z, p) for z in seg.source_latents])
              for seg, eps, t in zip(segments, noise, s)]
    n_img, n_txt = max(x.shape[0] for x in images), max(st.shape[0] for st in states)
    dev = ctx.device
    tokens = torch.zeros(len(segments), n_img, images[0].shape[1], device=dev)
    mask = torch.zeros(len(segments), n_txt, dtype=torch.long, device=dev)
    rows = []
    for i, (x, st) in enumerate(zip(images, states)):
        tokens[i, :x.shape[0]] = x.to(dev)
        rows.append(torch.nn.functional.pad(st, (0, 0, 0, n_txt - st.shape[0])))
        mask[i, :st.shape[0]] = 1
    text = torch.stack(rows)  # keeps the states' graph in stage 3
    out = reference(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                    timestep=s.to(dev, torch.float32),
                    # a stand-in shape of the padded length: RoPE values do not change the cost
                    img_shapes=[[(1, 1, n_img)]] * len(segments)).sample  # (B, n_img, p * p * C)
    pred = torch.cat([out[i, :seg.target_tokens] for i, seg in enumerate(segments)])
    target = torch.cat([patchify(eps - seg.target_latent, p) for seg, eps in zip(segments, noise)]).to(dev)
    weights = None
    if fm.weighting != "none":
        weights = torch.cat([torch.full((seg.target_tokens,), float(w))
                             for seg, w in zip(segments, timestep_weights(s, fm.weighting))])
    return {"fm": flow_matching_loss(pred, target, weights)}


def padded_loss_sums(stage: int, model, reference, batch: PackedBatch, ctx: StageContext) -> dict:
    """What `Stage.loss_sums` computes, on padded batches through the stock modules."""
    reasoner, dev = model.reasoner, ctx.device
    pad_id = reasoner.tokenizer.pad_token_id
    text = [s for s in batch.items if isinstance(s, ReasonerSegment)]
    gen = [s for s in batch.items if isinstance(s, GeneratorSegment)]
    if stage == 1:
        inputs = padded_reasoner_batch([s.inputs() for s in text], pad_id, dev)
        labels = inputs.pop("labels")
        return {"ntp": next_token_loss(reasoner.model(**inputs).logits, labels)}
    if stage == 2:
        with torch.no_grad():
            inputs = padded_reasoner_batch([s.condition for s in gen], pad_id, dev)
            inputs.pop("labels")
            hidden = reasoner.model.model(**inputs).last_hidden_state
            states = [st.detach().float() for st in
                      padded_states(hidden, inputs, list(range(len(gen))), [s.prefix_tokens for s in gen])]
        return padded_flow_matching(reference, gen, states, ctx)
    docs = [s.inputs() for s in text] + [{**s.condition} for s in gen]
    inputs = padded_reasoner_batch(docs, pad_id, dev)
    labels = inputs.pop("labels")
    out = reasoner.model(**inputs, output_hidden_states=True)
    sums = {"ntp": next_token_loss(out.logits, labels)}
    if gen:
        states = padded_states(out.hidden_states[-1], inputs, list(range(len(text), len(docs))),
                               [s.prefix_tokens for s in gen])
        sums.update(padded_flow_matching(reference, gen, [st.float() for st in states], ctx))
    else:
        from reasonedit.losses import LossSum
        zero = sum(p.sum() for p in reference.parameters() if p.requires_grad) * 0.0
        sums["fm"] = LossSum(zero, torch.zeros(()))
    return sums


def shared_reference(generator):
    """diffusers' QwenImageTransformer2DModel holding the very same Parameter objects as `generator`."""
    from diffusers import QwenImageTransformer2DModel

    from reasonedit.models.generator_weights import diffusers_config

    # built where the generator lives (its RoPE tables are plain attributes), then its weights swapped out
    with torch.device(next(generator.parameters()).device):
        reference = QwenImageTransformer2DModel(**diffusers_config(generator.config))
    reference.load_state_dict(generator.state_dict(keep_vars=True), strict=True, assign=True)
    return reference.train()


# -- timing ----------------------------------------------------------------------------------------

@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    def median_tokens_per_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))

    def median_flops_per_s(self) -> float:
        return statistics.median(f / s for f, s in zip(self.flops, self.seconds))


def run_steps(stepper: Stepper, batches: list[PackedBatch], warmup: int, device: torch.device,
              flops: list[float]) -> Timings:
    """Train on `batches` one step each, as the trainer does (`Stepper.step`); time all but the first `warmup`."""
    out = Timings()
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        stepper.step([batch], i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.seconds.append(time.perf_counter() - started)
            out.tokens.append(sum(batch.tokens))
            out.flops.append(flops[i])
    return out


def print_attention_calls(stepper: Stepper, batch: PackedBatch, device: torch.device, model, title: str) -> None:
    """Run one more step on `batch`, counting the attention function's calls and the vision tower's forwards."""
    from reasonedit.models.reasoner import attention_calls

    visual = model.reasoner.model.model.visual
    forwards = []
    hook = visual.register_forward_hook(lambda *_: forwards.append(1))
    try:
        with attention_calls() as calls:
            run_steps(stepper, [batch], 0, device, [0.0])
    finally:
        hook.remove()
    vision = (f"{calls['vision']} ({len(forwards)} forward{'s' if len(forwards) != 1 else ''} x "
              f"{len(visual.blocks)} layers)" if forwards else f"{calls['vision']} (no forward)")
    print(f"{title} attention calls per step: vision tower {vision}, language model {calls['language']}, "
          f"all {sum(calls.values())}", flush=True)


class ReadingEveryStep:
    """The step as it was before its figures stayed on the device: counts read back, figures read every step."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def step(self, micro, at):
        outcome = self.stepper.step(micro, at)
        outcome.figures().tolist()  # what a log line every step reads
        return outcome


def print_before_after(stepper: Stepper, batches: list[PackedBatch], args, device, title: str) -> None:
    """Host syncs per step, and the packed step time of the old every-step reads over now, as a ratio: the two
    steppers take turns on each batch, so both see the same load on the machine; the first turn of each is
    counted by `HostSyncs` (this file's own reads included)."""
    from reasonedit.testing.syncs import DEFAULT_ROOTS, HostSyncs

    old = ReadingEveryStep(Stepper(stepper.forward, stepper.stage, stepper.world, stepper.optimizer,
                                   params=stepper.params, grad_clip=stepper.grad_clip, ema=stepper.ema,
                                   flow_matching=stepper.flow_matching, seed=stepper.seed, host_counts=True))
    before, after = Timings(), Timings()
    counted: dict[str, HostSyncs] = {}
    for i, batch in enumerate(batches):
        for key, which, out in (("before", old, before), ("after", stepper, after)):
            if i == 0:
                with HostSyncs(roots=(*DEFAULT_ROOTS, Path(__file__).resolve())) as counted[key]:
                    timed = run_steps(which, [batch], 0, device, [0.0])
            else:
                timed = run_steps(which, [batch], 0, device, [0.0])
            if i >= args.warmup or len(batches) == 1:
                out.seconds += timed.seconds
    reads, old_reads = counted["after"].reads, counted["before"].reads
    where = ", ".join(reads)
    print(f"{title} host syncs per step: {len(reads)}{f' ({where})' if where else ''}, collectives "
          f"{len(counted['after'].collectives)}", flush=True)
    b, a = statistics.median(before.seconds), statistics.median(after.seconds)
    print(f"{title} before/after: step {b:.3f} s reading every step ({len(old_reads)} host syncs) / {a:.3f} s on "
          f"the device ({len(reads)}): {b / a:.2f}x", flush=True)


def profile_steps(stepper: Stepper, batches: list[PackedBatch], device: torch.device, title: str) -> None:
    """Run `batches` again under torch.profiler; print where the time goes (after the timed steps, so the
    profiler's overhead never enters the figures)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run_steps(stepper, batches, 0, device, [0.0] * len(batches))
    wall = time.perf_counter() - started
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / 1e6
    print(f"{title} profile over {len(batches)} steps: wall {wall:.3f} s, "
          + (f"GPU kernels {busy:.3f} s ({busy / wall:.0%} busy)" if device.type == "cuda" else
             f"operators {busy:.3f} s of CPU time"), flush=True)
    print(events.table(sort_by=key, row_limit=18, max_name_column_width=70), flush=True)


def bench_stage(number: int, cfg, model, data: Path, args, device: torch.device, peak: float | None) -> None:
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.data.segments import ConditionDropout
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.training.data import BatchStream, stage_loader
    from reasonedit.training.ema import GeneratorEMA
    from reasonedit.training.trainer import StageModule

    stage = stage_for(number, cfg)
    full = model
    if number == 1:  # stage 1 never loads the generator
        model = ReasonEditModel(full.reasoner, None, None, full.config)
    elif full.reasoner.peft_model is None:  # stages 2 and 3 start from stage 1's reasoner, LoRA included
        full.reasoner.add_lora(cfg.model.reasoner.lora)
    stage.prepare(model)
    model.train()  # as the trainer does, after prepare
    module = StageModule(model, stage)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.config.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    ema = None
    if cfg.train.ema_decay > 0 and model.generator is not None:
        ema = GeneratorEMA({n: p for n, p in model.generator.named_parameters() if p.requires_grad},
                           cfg.train.ema_decay)

    b = cfg.batches
    pre = Preprocessor(full.reasoner.processor, DeviceCodec(full.vae), PreprocessConfig(
        buckets=buckets_for(full, b.pixel_budget), dropout=ConditionDropout(b.text_dropout, b.image_dropout),
        seed=cfg.seed))
    stream = BatchStream(stage_loader(data, stage.mix, cfg.seed, b.shuffle_buffer), stage.packer(b.window),
                         lambda sample: stage.segments(pre, sample.record))
    started = time.perf_counter()
    batches = [stream.next() for _ in range(args.warmup + args.steps)]
    counts = [step_flops(number, model, batch) for batch in batches]
    flops = [c.total for c in counts]
    log.info("stage%d: %d batches in %.1f s (packing utilisation %.3f)", number, len(batches),
             time.perf_counter() - started, stream.packer.stats.utilisation)
    timed_count = sum(counts[args.warmup:], FlopCount())
    shares = ", ".join(f"{part} {v / timed_count.total:.0%}" for part, v in timed_count.parts.items() if v > 0)
    print(f"stage{number} model FLOPs by part: {shares}", flush=True)

    name = f"stage{number}"
    # no schedule: the lr stays at the stage's (a step's cost does not depend on it)
    step = dict(params=params, grad_clip=cfg.train.grad_clip, ema=ema, flow_matching=cfg.flow_matching,
                seed=cfg.seed)
    packed_stepper = Stepper(module, stage, World(device=device), optimizer, **step)
    packed = run_steps(packed_stepper, batches, args.warmup, device, flops)
    report(name, "packed", packed, peak)
    print_attention_calls(packed_stepper, batches[-1], device, model, f"{name} packed")
    print_before_after(packed_stepper, batches, args, device, f"{name} packed")
    if args.profile:
        profile_steps(packed_stepper, batches[-args.profile:], device, f"{name} packed")
    if args.no_padded:
        return
    reference = shared_reference(model.generator) if model.generator is not None else None
    padded_stepper = Stepper(lambda batch, ctx: padded_loss_sums(number, model, reference, batch, ctx), stage,
                             World(device=device), optimizer, **step)
    padded = run_steps(padded_stepper, batches, args.warmup, device, flops)
    report(name, "padded", padded, peak)
    print_attention_calls(padded_stepper, batches[-1], device, model, f"{name} padded")
    timed = batches[args.warmup:]
    real = sum(n for batch in timed for length in batch.lengths for n in length)
    padded_tokens = 0  # each padded batch holds the items with tokens in that row, padded to the longest
    for batch in timed:
        for d in range(len(batch.budget)):
            lengths = [length[d] for length in batch.lengths if length[d] > 0]
            padded_tokens += len(lengths) * max(lengths, default=0)
    print(f"{name} packed/padded: {packed.median_tokens_per_s() / padded.median_tokens_per_s():.2f}x tokens/s "
          f"on the same {len(timed)} batches (padded batches are {1 - real / padded_tokens:.1%} padding)",
          flush=True)


def report(name: str, layout: str, t: Timings, peak: float | None) -> None:
    flops = statistics.median(t.flops)
    unit, scale = ("TFLOP", 1e12) if flops >= 1e12 else ("GFLOP", 1e9)
    if peak is None:
        utilisation = "MFU: n/a on CPU"
    else:
        utilisation = f"MFU {t.median_flops_per_s() / (peak * 1e12):.1%} of {peak:g} TFLOP/s"
    print(f"{name} {layout}: {t.median_tokens_per_s():,.0f} tokens/s | step {statistics.median(t.seconds):.3f} s "
          f"(median of {len(t.seconds)}) | {flops / scale:.3g} {unit}/step | {utilisation}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a model preset (tiny, qwen-image-edit) or a model YAML file")
    ap.add_argument("--stages", default="1,2,3", help="comma-separated stage numbers")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per stage and layout")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--records", type=int, default=48, help="synthetic records of each kind")
    ap.add_argument("--image-size", type=int, default=224, help="synthetic image side (and bucket pixel budget)")
    ap.add_argument("--vocab", type=int, default=None, help="pad the reasoner's embeddings to N rows "
                    f"(default {QWEN25_VL_7B_VOCAB} for qwen-image-edit, else the tokenizer's size)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s "
                    "(default: looked up by CUDA device name)")
    ap.add_argument("--no-padded", action="store_true", help="time packed rows only")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, run the last N packed "
                    "steps of each stage under torch.profiler and print the top operators")
    ap.add_argument("overrides", nargs="*", help="experiment config overrides, key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("reasonedit", "httpx", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        print(f"train_step.py: error: --stages {args.stages!r}: expected numbers like 1,2,3", file=sys.stderr)
        return 1
    if not stages or any(s not in STAGE_NAMES for s in stages):
        print(f"train_step.py: error: --stages {args.stages!r}: choose among 1, 2, 3", file=sys.stderr)
        return 1
    if args.steps < 1 or args.warmup < 0 or args.records < 1 or not 0 <= args.profile <= args.steps:
        print("train_step.py: error: --steps must be >= 1, --warmup >= 0, --records >= 1 and --profile within "
              "0..--steps", file=sys.stderr)
        return 1
    try:
        cfg = experiment_config(args.model, args.image_size, [*args.overrides, f"data.n={args.records}"])
    except (ConfigError, ValueError) as e:
        print(f"train_step.py: error: {e}", file=sys.stderr)
        return 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_step.py: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or bf16_peak_tflops(name)
        if peak is None:
            print(f"train_step.py: error: no bf16 peak known for {name!r}; pass --peak-tflops", file=sys.stderr)
            return 1
        where = f"{name}, dense bf16 peak {peak:g} TFLOP/s" + (" (given)" if args.peak_tflops else "")
    else:
        peak = None
        where = f"cpu, {torch.get_num_threads()} threads, float32 (no peak claimed)"
    vocab = args.vocab if args.vocab is not None else (QWEN25_VL_7B_VOCAB if cfg.model.name == "qwen-image-edit"
                                                       else 0)

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        started = time.perf_counter()
        data = synthesize_data(cfg, Path(tmp))
        model = build_model(cfg, data, device, vocab)
        r, g = model.reasoner.model.config.text_config, model.generator.config
        sizes = {k: sum(p.numel() for p in part.parameters()) / 1e6
                 for k, part in (("reasoner", model.reasoner.model), ("generator", model.generator))}
        print(f"device: {where}; torch {torch.__version__}", flush=True)
        print(f"model: {cfg.model.name} shapes, random weights: reasoner {r.num_hidden_layers} x {r.hidden_size} "
              f"(vocab {r.vocab_size}, {sizes['reasoner']:,.0f}M params), generator {g.num_layers} x "
              f"{g.num_attention_heads * g.attention_head_dim} ({sizes['generator']:,.0f}M params); "
              f"images {args.image_size}px; built in {time.perf_counter() - started:.1f} s", flush=True)
        failed: list[int] = []
        for number in stages:
            s = getattr(cfg, f"stage{number}")
            budget = {1: f"reasoner {s.reasoner_budget}", 2: f"generator {s.generator_budget}",
                      3: f"reasoner {s.reasoner_budget} + generator {s.generator_budget}"}[number]
            print(f"stage{number} {STAGE_NAMES[number]}: token budget {budget}; warm-up {args.warmup}, timed "
                  f"{args.steps}", flush=True)
            try:
                bench_stage(number, cfg, model, data, args, device, peak)
            except Exception as e:  # a failing stage is reported; the others still run
                logging.getLogger("bench.train_step").exception("stage%d failed", number)
                print(f"stage{number} failed: {type(e).__name__}: {e}", flush=True)
                failed.append(number)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
