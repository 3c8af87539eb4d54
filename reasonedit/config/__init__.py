"""Experiment configs: typed dataclass schemas merged with YAML files and `key=value` overrides.

A YAML file may start with `defaults:`, a list of `group: name` entries that pull in
`configs/<group>/<name>.yaml` under that key (`- model: tiny`). On the command line,
`model=qwen-image-edit` swaps a whole group; `world.grid=5` sets one value. Every value remembers
the file or override it came from, so an error names both the key and its source.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..paths import relative_name_problem
from ..publish import atomic_write_text
from .flow import FlowMatchingConfig
from .model import RUN_DTYPES, ModelConfig
from .rl import GRPOConfig
from .synth import KINDS as RECORD_KINDS
from .synth import SynthConfig
from .world import QUESTION_KINDS, WorldConfig

GROUPS = ("model",)
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package (`configs/` in a checkout)
# the steps of `reasonedit run`, in the order they run
RUN_STEPS = ("data", "models", "vae", "pretrain", "batches", "preview", "stage1", "stage2", "stage3", "rl", "edit",
             "eval")
# what a config without `steps:` runs: all of them but the optional GRPO stage (rl), which a config asks for by name
DEFAULT_STEPS = tuple(s for s in RUN_STEPS if s != "rl")
PARALLEL = ("auto", "none", "ddp", "fsdp", "deepspeed")
# the think -> edit -> reflect loop's rules (reasonedit.inference.loop): ours (best round, a reflect after every
# edit, seed + round - 1) or EditThinker's client's (last round, none after the last edit, one seed)
LOOPS = ("reasonedit", "editthinker")


class ConfigError(ValueError):
    """A config that cannot be used: names the key and the file or override it came from."""


@dataclass
class PreviewConfig:
    rows: int = 3  # samples of each kind on the contact sheet
    split: str = "train"


@dataclass
class EditStepConfig:
    """The edit step: think -> edit -> reflect on held-out scenes with the run's latest model; a trace each."""

    samples: int = 2  # of each instruction kind (concrete, abstract), from the test split
    rounds: int = 3
    sampling_steps: int = 16
    guidance: float = 4.0
    seed: int = 0
    loop: str = "reasonedit"  # the loop's rules: reasonedit | editthinker (see LOOPS)
    device: str = "auto"  # where the model runs: auto (CUDA when there is one), cpu, cuda, cuda:N
    dtype: str = "auto"  # what it runs in: auto (bfloat16 on CUDA, as saved on a CPU), float32, bfloat16, float16

    def validate(self) -> None:
        for key in ("samples", "rounds", "sampling_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"edit.{key}: must be at least 1, got {getattr(self, key)}")
        check_loop("edit.loop", self.loop)
        check_device("edit.device", self.device)
        check_dtype("edit.dtype", self.dtype)


def check_device(key: str, device: str) -> None:
    """A device name torch will take: auto, cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        raise ValueError(f"{key}: {device!r}; expected auto, cpu, cuda, cuda:N or mps")


def check_loop(key: str, loop: str) -> None:
    if loop not in LOOPS:
        raise ValueError(f"{key}: {loop!r}; expected one of {list(LOOPS)}")


def check_dtype(key: str, dtype: str) -> None:
    if dtype not in RUN_DTYPES:
        raise ValueError(f"{key}: {dtype!r}; expected one of {list(RUN_DTYPES)}")


EVAL_MODES = ("base", "think", "think_reflect")  # how an eval runs each sample: edit it; think, then edit; think, edit, reflect


@dataclass
class EvalStepConfig:
    """The eval step: the shapes ablation (success and mean oracle score per mode) of the run's latest model."""

    modes: tuple[str, ...] = EVAL_MODES
    limit: int = 12  # samples of each instruction kind
    rounds: int = 2
    sampling_steps: int = 16
    guidance: float = 4.0
    seed: int = 0
    heldout: int = 24  # val records of each kind for the held-out figures during training (train.eval_every)
    # editors the ablation runs: model (the run's generator) and/or shapes (the exact shapes editor, which
    # isolates the reasoner), the latter with this share of injected errors
    editors: tuple[str, ...] = ("model",)
    shapes_error_rate: float = 0.3
    loop: str = "reasonedit"  # think_reflect's loop rules: reasonedit | editthinker (see LOOPS)
    device: str = "auto"  # where the model runs: auto (CUDA when there is one), cpu, cuda, cuda:N
    dtype: str = "auto"  # what it runs in: auto (bfloat16 on CUDA, as saved on a CPU), float32, bfloat16, float16

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in EVAL_MODES]
        if unknown or not self.modes:
            raise ValueError(f"eval.modes: {unknown or 'empty'}; choose from {list(EVAL_MODES)}")
        for key in ("limit", "rounds", "sampling_steps", "heldout"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}: must be at least 1, got {getattr(self, key)}")
        bad = [e for e in self.editors if e not in ("model", "shapes")]
        if bad or not self.editors:
            raise ValueError(f"eval.editors: {bad or 'empty'}; choose from ['model', 'shapes']")
        if not 0.0 <= self.shapes_error_rate <= 1.0:
            raise ValueError(f"eval.shapes_error_rate: must lie in [0, 1], got {self.shapes_error_rate}")
        check_loop("eval.loop", self.loop)
        check_device("eval.device", self.device)
        check_dtype("eval.dtype", self.dtype)


@dataclass
class BatchesConfig:
    """How the batches step streams, preprocesses and packs the train split: a packing report, not training
    (each stage packs with its own `stageN.reasoner_budget` / `stageN.generator_budget`)."""

    reasoner_budget: int = 4096  # tokens per packed reasoner row of the report (a multiple of 128)
    generator_budget: int = 2048  # tokens per packed generator row of the report
    window: int = 64  # samples the packer looks ahead over
    pixel_budget: int = 224 * 224  # size buckets' pixel budget
    text_dropout: float = 0.1  # classifier-free guidance: drop the instruction
    image_dropout: float = 0.05  # ... or the source image
    shuffle_buffer: int = 100

    def validate(self) -> None:
        for key in ("reasoner_budget", "generator_budget"):
            if getattr(self, key) <= 0 or getattr(self, key) % 128:
                raise ValueError(f"batches.{key}: must be a positive multiple of 128, got {getattr(self, key)}")
        for key in ("text_dropout", "image_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"batches.{key}: must lie in [0, 1), got {getattr(self, key)}")
        if self.window <= 0 or self.shuffle_buffer <= 0 or self.pixel_budget <= 0:
            raise ValueError("batches.window: window, shuffle_buffer and pixel_budget must be positive")


@dataclass
class DataSourceConfig:
    """One dataset a stage trains on: a dataset directory (synthesised or imported) and its weight among the
    stage's datasets that hold the same record kind."""

    path: str = ""
    weight: float = 1.0


@dataclass
class StageConfig:
    """One training stage: its optimiser schedule, data mix and token budgets.

    `steps` and `gpus` express the paper's scale (50k / 28k / 12k steps on 32 / 128 / 128 GPUs);
    `gpus` is what the run is planned for and is checked against nothing but documentation."""

    lr: float = 1e-4
    steps: int = 100
    gpus: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1  # micro-batches per optimiser step on each rank
    mix: dict[str, float] = field(default_factory=dict)  # record kind -> weight; empty: the stage's default
    # the datasets the stage reads its train split from; empty: the run's own (output_dir/data). A record kind's
    # share (mix) is split over the datasets that hold it, in proportion to their weights
    data: list[DataSourceConfig] = field(default_factory=list)
    reasoner_budget: int = 4096  # tokens per packed reasoner row
    generator_budget: int = 2048  # tokens per packed generator row
    ntp_weight: float = 0.1  # stage 3: L = L_FM + ntp_weight * L_NTP
    # stage 2 (its reasoner is frozen, so a stored state is the state): each sample's condition states computed once
    # and read back from a ConditionCache (output_dir/<stage>/condition_cache); stages that train the reasoner ignore it
    condition_cache: bool = True
    # stages 2 and 3: read the frozen VAE's latents from a LatentCache (output_dir/latent_cache, shared by the
    # stages): each image is encoded once, not once per epoch; the latents are the same to the last bit
    latent_cache: bool = False
    questions_per_image: int = 3  # pretrain: scene questions of distinct kinds asked of each image a record carries
    reading_scenes: int = 48  # pretrain: held-out scenes its reading accuracy is measured on at the end; 0: none

    def validate(self, name: str) -> None:
        if not self.lr > 0:
            raise ValueError(f"{name}.lr: must be positive, got {self.lr}")
        for key in ("steps", "gpus", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"{name}.{key}: must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"{name}.warmup_steps: must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{name}.min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio}")
        for key in ("reasoner_budget", "generator_budget"):
            if getattr(self, key) <= 0 or getattr(self, key) % 128:
                raise ValueError(f"{name}.{key}: must be a positive multiple of 128, got {getattr(self, key)}")
        bad = [k for k in self.mix if k not in RECORD_KINDS]
        if bad:
            raise ValueError(f"{name}.mix: unknown record kinds {bad}; choose from {list(RECORD_KINDS)}")
        if any(not w > 0 for w in self.mix.values()):
            raise ValueError(f"{name}.mix: weights must be positive, got {dict(self.mix)}")
        for i, source in enumerate(self.data):
            if not source.path:
                raise ValueError(f"{name}.data[{i}].path: empty; name a dataset directory")
            if not source.weight > 0:
                raise ValueError(f"{name}.data[{i}].weight: must be positive, got {source.weight}")
        if self.ntp_weight < 0:
            raise ValueError(f"{name}.ntp_weight: must be non-negative, got {self.ntp_weight}")
        if not 0 <= self.questions_per_image <= len(QUESTION_KINDS):
            raise ValueError(f"{name}.questions_per_image: must lie in [0, {len(QUESTION_KINDS)}] (the question "
                             f"kinds {list(QUESTION_KINDS)}), got {self.questions_per_image}")
        if self.reading_scenes < 0:
            raise ValueError(f"{name}.reading_scenes: must be non-negative, got {self.reading_scenes}")
        if self.latent_cache and name not in ("stage2", "stage3"):
            raise ValueError(f"{name}.latent_cache: only stage2 and stage3 train the generator on VAE latents")


RL_ROLES = ("think", "describe", "score", "decide")  # the reasoner replies the GRPO stage samples and rewards
# what executes a think reply for its reward (the oracle scores the result): the exact shapes editor, the start
# model's own generator, or an editing service's http(s) URL
RL_EDITORS = ("shapes", "model")
# what the KL holds the policy to, always "the reasoner with its adapter disabled": start: the start model's adapter
# is merged into the base and a fresh one trained, so the reference is the start (SFT) model itself; base: the start
# model's adapter trains on, and the reference is the model before any adapter
RL_REFERENCES = ("start", "base")
# what scores the image a think reply was executed into: the shapes oracle against the record's target scene, or an
# OpenAI-compatible vision judge (rl.judge_url) asked how well it carries out the record's instruction
RL_REWARDS = ("oracle", "judge")


@dataclass
class RLConfig(GRPOConfig, StageConfig):
    """The GRPO stage (`rl`): a stage's schedule, data and budget keys, GRPO's (`GRPOConfig`), and its rewards.

    Each record's prompt (think: a thinking pair's abstract request; decide: a reflection sample's decision)
    is answered `group_size` times; a reply's reward is its task reward plus `format_weight` when it parses.
    think: the editor executes the reply and the oracle scores the result against the record's target, /10;
    decide: 1 when the parsed decision is the record's. Micro-batches hold as many prompts as `reasoner_budget`
    packs (prompt and reference answer tokens)."""

    roles: tuple[str, ...] = RL_ROLES
    format_weight: float = 0.1
    editor: str = "shapes"  # see RL_EDITORS, or an editing service's URL
    error_rate: float = 0.0  # the shapes editor's share of requests executed wrongly on purpose
    reference: str = "start"  # see RL_REFERENCES
    reward: str = "oracle"  # see RL_REWARDS: what scores an executed think reply (the other roles: the record)
    # rl.reward=judge: the judge's chat-completions base URL (".../v1"); its model ("" : REASONEDIT_JUDGE_MODEL, else
    # OPENAI_MODEL); its key is read from REASONEDIT_JUDGE_API_KEY (else OPENAI_API_KEY), never from a config file
    judge_url: str = ""
    judge_model: str = ""
    judge_timeout: float = 60.0  # seconds per request
    judge_retries: int = 2  # attempts after the first (timeouts, 429, 5xx), with backoff
    judge_concurrency: int = 8  # requests in flight at once
    # after training, `reasonedit run` compares the start (SFT) model's reasoner with the trained one on this many
    # test samples of each kind (`reasonedit.eval.rl_gain`; 0 skips), the shapes editor wrong on `heldout_error_rate`
    heldout: int = 400
    heldout_error_rate: float = 0.3
    heldout_rounds: int = 3

    def validate(self, name: str = "rl") -> None:
        StageConfig.validate(self, name)
        GRPOConfig.validate(self)  # its messages name `rl.<key>`
        bad = [r for r in self.roles if r not in RL_ROLES]
        if bad or not self.roles:
            raise ValueError(f"{name}.roles: {bad or 'empty'}; choose from {list(RL_ROLES)}")
        if self.format_weight < 0:
            raise ValueError(f"{name}.format_weight: must be non-negative, got {self.format_weight}")
        if self.editor not in RL_EDITORS and not self.editor.startswith(("http://", "https://")):
            raise ValueError(f"{name}.editor: {self.editor!r}; choose from {list(RL_EDITORS)} or an http(s) URL of "
                             "an editing service")
        if self.error_rate and self.editor != "shapes":
            raise ValueError(f"{name}.error_rate: {self.error_rate}; only the shapes editor makes errors on purpose")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"{name}.error_rate: must lie in [0, 1], got {self.error_rate}")
        if self.reference not in RL_REFERENCES:
            raise ValueError(f"{name}.reference: {self.reference!r}; choose from {list(RL_REFERENCES)}")
        if self.reward not in RL_REWARDS:
            raise ValueError(f"{name}.reward: {self.reward!r}; choose from {list(RL_REWARDS)}")
        if self.reward == "judge" and not self.judge_url.startswith(("http://", "https://")):
            raise ValueError(f"{name}.judge_url: {self.judge_url!r}; {name}.reward=judge asks an OpenAI-compatible "
                             f"vision judge: give its http(s) base URL (the part before /chat/completions)")
        if not self.judge_timeout > 0:
            raise ValueError(f"{name}.judge_timeout: must be positive seconds, got {self.judge_timeout}")
        if self.judge_retries < 0:
            raise ValueError(f"{name}.judge_retries: must be 0 or more, got {self.judge_retries}")
        if self.judge_concurrency < 1:
            raise ValueError(f"{name}.judge_concurrency: must be at least 1, got {self.judge_concurrency}")
        if self.heldout < 0:
            raise ValueError(f"{name}.heldout: must be a number of samples >= 0 (0 skips), got {self.heldout}")
        if not 0.0 <= self.heldout_error_rate <= 1.0:
            raise ValueError(f"{name}.heldout_error_rate: must lie in [0, 1], got {self.heldout_error_rate}")
        if self.heldout_rounds < 1:
            raise ValueError(f"{name}.heldout_rounds: must be at least 1, got {self.heldout_rounds}")


@dataclass
class TrainConfig:
    """The trainer runtime, shared by the three stages."""

    parallel: str = "auto"  # auto (ddp when launched on several ranks) | none | ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: 2 or 3, picks launch/deepspeed/zero{2,3}.json when no JSON is given
    deepspeed_config: str = ""  # deepspeed only: the DeepSpeed JSON (its zero_optimization.stage wins)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    activation_checkpointing: bool = False
    ema_decay: float = 0.999  # EMA of the generator; 0 disables it
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end (and on SIGTERM)
    eval_every: int = 0  # steps between held-out evaluations (shapes runs: the learning curves); 0: none
    keep_last: int = 2  # checkpoints kept
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    wandb: bool = False  # offline when no WANDB_API_KEY is set
    tensorboard: bool = False
    # loader worker processes per rank (per data stream): each reads, decodes and preprocesses (tokenises, resizes)
    # its records; the VAE encodes in the main process, on its device. 0: all of it in the main process
    num_workers: int = 0
    # 0: every rank reads, preprocesses and encodes every record and keeps every world_size-th batch; S > 0: the data
    # is split into S streams (a multiple of the ranks), each rank reading only its own (training/data.py)
    data_streams: int = 0
    # FSDP2 (train.parallel=fsdp): auto: bf16 parameters for the forward and backward, gradients reduced in float32,
    # on CUDA (a CPU keeps float32); bf16: always; none: the parameters' own dtype throughout
    fsdp_mixed_precision: str = "auto"
    cpu_offload: bool = False  # FSDP2: sharded parameters, gradients and optimizer state in host memory
    allow_config_change: bool = False  # resume a checkpoint written with other run-defining values (lr, steps...)
    # each transformer block of the generator and the reasoner's language model compiled (dynamic shapes) and fused
    # AdamW: auto (on CUDA outside DeepSpeed) | true | false (training/compiled.py)
    compile: str = "auto"
    # the generator EMA's dtype: float32 (a 1 - ema_decay step is below bf16's resolution: 0.999 would freeze a
    # bf16 EMA) | bfloat16 (half the memory, for decays far from 1)
    ema_dtype: str = "float32"

    def validate(self) -> None:
        if str(self.compile).lower() not in ("auto", "true", "false"):
            raise ValueError(f"train.compile: {self.compile!r}; choose auto, true or false")
        if self.ema_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.ema_dtype: {self.ema_dtype!r}; choose float32 or bfloat16")
        if self.parallel not in PARALLEL:
            raise ValueError(f"train.parallel: {self.parallel!r}; choose from {list(PARALLEL)}")
        if self.fsdp_mixed_precision not in ("auto", "bf16", "none"):
            raise ValueError(f"train.fsdp_mixed_precision: {self.fsdp_mixed_precision!r}; choose auto, bf16 or none")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"train.zero_stage: 2 or 3, got {self.zero_stage}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        for key in ("checkpoint_every", "eval_every", "grad_clip", "weight_decay", "num_workers", "data_streams"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be non-negative, got {getattr(self, key)}")
        for key in ("keep_last", "log_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be at least 1, got {getattr(self, key)}")


@dataclass
class VAETrainConfig:
    """The vae step (tiny presets with model.vae.kind=qwen_image): train the VAE on world renders drawn fresh each
    step, then read held-out scenes back through it with the exact oracle."""

    steps: int = 1600  # the demo world (64 px): 200/200 held-out scenes read back exactly (seed 0), 195/200 (seed 1)
    batch: int = 4  # renders per step: small batches learn more per second on a CPU than large ones
    lr: float = 1e-3  # Adam
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 0
    mse_weight: float = 1.0  # pixel MSE in [-1, 1] units
    l1_weight: float = 0.0  # pixel L1
    kl_weight: float = 1e-6  # KL of the posterior to N(0, 1), per latent element
    ink_weight: float = 5.0  # extra pixel weight where a render differs from its dominant (background) colour
    # ... and within this many pixels of such a pixel: weighting both sides of each shape's edge alike, rather than
    # its inside alone, keeps the weight from pushing edges outwards (small squares decoded as circles)
    ink_outline: int = 1
    palette_weight: float = 0.0  # cross-entropy that each pixel's nearest palette colour is the render's
    palette_temperature: float = 0.05  # its logits: -squared distance to each palette colour / temperature
    # each step also renders every scene with one cell redrawn, and penalises the change of the posterior means
    # outside that cell (relative to their spread): edits stay local in latent space, so a generator that copies
    # the source's tokens is right wherever the edit leaves the scene alone
    locality_weight: float = 0.0
    max_shapes: int = 0  # training scenes hold world.min_shapes..max_shapes shapes; 0: up to one in every cell
    stats_scenes: int = 256  # train renders the latent normalisation (latents_mean, latents_std) is measured on
    eval_split: str = "val"  # held-out scenes for the oracle read-back: val or test
    eval_scenes: int = 200
    log_every: int = 25

    def validate(self) -> None:
        for key in ("steps", "batch", "stats_scenes", "eval_scenes", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"vae_train.{key}: must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"vae_train.lr: must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"vae_train.warmup_steps: must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"vae_train.min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio}")
        if not self.palette_temperature > 0:
            raise ValueError(f"vae_train.palette_temperature: must be positive, got {self.palette_temperature}")
        for key in ("grad_clip", "mse_weight", "l1_weight", "kl_weight", "ink_weight", "palette_weight", "max_shapes",
                    "ink_outline", "locality_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"vae_train.{key}: must be non-negative, got {getattr(self, key)}")
        if self.mse_weight == 0 and self.l1_weight == 0:
            raise ValueError("vae_train.mse_weight: mse_weight and l1_weight are both 0: nothing to reconstruct")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"vae_train.eval_split: {self.eval_split!r}; choose from ['val', 'test']")


def _stage(lr: float, steps: int, gpus: int, **kw: Any) -> Any:
    return field(default_factory=lambda: StageConfig(lr=lr, steps=steps, gpus=gpus, **kw))


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/${name}"
    seed: int = 0
    steps: tuple[str, ...] = DEFAULT_STEPS
    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: SynthConfig = field(default_factory=SynthConfig)
    batches: BatchesConfig = field(default_factory=BatchesConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    edit: EditStepConfig = field(default_factory=EditStepConfig)
    eval: EvalStepConfig = field(default_factory=EvalStepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    vae_train: VAETrainConfig = field(default_factory=VAETrainConfig)
    # the paper's defaults: lr 1e-4 / 1e-5 / 6e-6, 50k / 28k / 12k steps on 32 / 128 / 128 GPUs
    # tiny presets only: a full fine-tune of the tiny reasoner on reading the world, standing in for Qwen2.5-VL's
    # pretraining (real presets skip it)
    pretrain: StageConfig = _stage(2e-3, 400, 1, warmup_steps=20)
    stage1: StageConfig = _stage(1e-4, 50_000, 32, warmup_steps=500)
    stage2: StageConfig = _stage(1e-5, 28_000, 128, warmup_steps=500)
    stage3: StageConfig = _stage(6e-6, 12_000, 128, warmup_steps=200)
    # after the three stages, optional: GRPO on the reasoner's LoRA with an editor in the loop
    rl: RLConfig = field(default_factory=lambda: RLConfig(lr=1e-5, steps=1_000, gpus=8, warmup_steps=20,
                                                          reasoner_budget=8192))

    def validate(self) -> None:
        problem = relative_name_problem(self.name)
        if problem is not None:  # it names the run's folder (output_dir: runs/${name}) and its wandb runs
            raise ValueError(f"name: {self.name!r} cannot name the run's folder: {problem}; use a plain name "
                             "(letters, digits, '_', '-', '.'), or sweep/run")
        self.model.validate()
        self.train.validate()
        self.flow_matching.validate()
        for name in ("pretrain", "stage1", "stage2", "stage3", "rl"):
            getattr(self, name).validate(name)
        self.batches.validate()
        self.vae_train.validate()
        self.world.validate()
        self.data.validate()
        unknown = [s for s in self.steps if s not in RUN_STEPS]
        if unknown:
            raise ValueError(f"steps: unknown {unknown}; choose from {list(RUN_STEPS)}")
        self.edit.validate()
        self.eval.validate()
        if self.preview.rows <= 0:
            raise ValueError(f"preview.rows: must be positive, got {self.preview.rows}")
        if self.preview.split not in self.data.splits:
            raise ValueError(f"preview.split: {self.preview.split!r} is not among data.splits {list(self.data.splits)}")


def _flatten(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys = []
        for k, v in node.items():
            keys += _flatten(v, f"{prefix}{k}.") or [f"{prefix}{k}"]
        return keys
    return []


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; every failure is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(doc).__name__}")
    return doc


def _group_file(group: str, name: str, root: Path, origin: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        return (root / name) if not Path(name).is_absolute() else Path(name)
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (root / group).glob("*.yaml"))
        raise ConfigError(f"{origin}: no {group} preset {name!r} in {root / group}; have {have}")
    return path


class ConfigLoader:
    """Merges sources onto the schema one at a time, recording where each key was set."""

    def __init__(self, schema: type = ExperimentConfig, root: Path | None = None):
        self.schema, self.root = schema, root
        self.cfg: DictConfig = OmegaConf.structured(schema)
        self.origin: dict[str, str] = {}

    def merge(self, data: dict, label: str) -> None:
        try:
            self.cfg = OmegaConf.merge(self.cfg, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{label}: {_explain(e, self.cfg)}") from None
        for key in _flatten(data):
            self.origin[key] = label

    def merge_file(self, path: Path, under: str | None = None) -> None:
        doc = read_yaml_mapping(path)
        root = self.root or path.resolve().parent.parent
        if under is None and self.root is None:
            self.root = root  # group presets named later (on the command line) come from here too
        for entry in doc.pop("defaults", []) or []:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"{path}: each `defaults` entry must be `group: name`, got {entry!r}")
            (group, name), = entry.items()
            if group not in GROUPS:
                raise ConfigError(f"{path}: unknown defaults group {group!r}; choose from {list(GROUPS)}")
            self.merge_file(_group_file(group, str(name), root, str(path)), under=group)
        self.merge({under: doc} if under else doc, str(path))

    def merge_override(self, text: str) -> None:
        # a control character (a newline) in the override would break the one-line error message: shown escaped
        label = f"command-line override `{text}`" if text.isprintable() else f"command-line override {text!r}"
        if "=" not in text:
            raise ConfigError(f"{label}: expected key=value")
        key, value = text.split("=", 1)
        if key in GROUPS and value and not value.startswith(("{", "[")):
            # a swapped group starts again from the schema, not from the preset it replaces
            self.cfg[key] = OmegaConf.structured(self.schema)[key]
            self.origin = {k: v for k, v in self.origin.items() if not k.startswith(key + ".")}
            self.merge_file(_group_file(key, value, self.root or PACKAGE_CONFIGS, label), under=key)
            return
        try:
            parsed = OmegaConf.from_dotlist([text])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{label}: {e}") from None
        except yaml.YAMLError as e:  # the value is read as YAML, which refuses control characters such as NUL
            raise ConfigError(f"{label}: {str(e).splitlines()[0]}") from None
        if value.lstrip().startswith("{"):
            node = OmegaConf.select(self.cfg, key, default=None)
            if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
                # a mapping field (a stage's mix): the override is the whole new value, not keys merged into the
                # file's (stage2.mix={text_to_image: 1} over a file's {edit_pair: 1} must not train on both)
                OmegaConf.update(self.cfg, key, {}, merge=False)
        self.merge(OmegaConf.to_container(parsed), label)

    def source_of(self, key: str) -> str:
        """The file or override that set `key` (or one of its parents), else the schema default."""
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            hits = [v for k, v in self.origin.items() if k == prefix or k.startswith(prefix + ".")]
            if hits:
                return hits[-1]
        return "the built-in default"

    def build(self) -> tuple[DictConfig, Any]:
        try:
            OmegaConf.resolve(self.cfg)
            obj = OmegaConf.to_object(self.cfg)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or ""
            raise ConfigError(f"{self.source_of(key)}: {_explain(e, self.cfg)}") from None
        try:
            obj.validate()
        except ValueError as e:
            key = str(e).split(":", 1)[0].strip()
            raise ConfigError(f"{self.source_of(key)}: {e}") from None
        return self.cfg, obj


def _explain(e: OmegaConfBaseException, cfg: DictConfig) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ == "ConfigKeyError" and key:
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(cfg, parent) if parent else cfg
            close = difflib.get_close_matches(leaf, list(node.keys()), n=1) if isinstance(node, DictConfig) else []
        except OmegaConfBaseException:
            close = []
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    if key:
        return f"key '{key}': {first}"
    return first


def experiment_file(path: str | Path) -> Path:
    """`path` when it is a file; else a packaged experiment named by it (`shapes_demo` or `shapes_demo.yaml`,
    from any folder, an installed package included); else a ConfigError listing the packaged ones."""
    path = Path(path)
    if path.is_file() or len(path.parts) != 1:
        return path
    packaged = PACKAGE_CONFIGS / "experiment" / (path.name if path.suffix in (".yaml", ".yml") else f"{path}.yaml")
    if packaged.is_file():
        return packaged
    have = sorted(p.stem for p in (PACKAGE_CONFIGS / "experiment").glob("*.yaml"))
    raise ConfigError(f"config file not found: {path} (nor a packaged experiment of that name; packaged: {have})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                root: str | Path | None = None) -> tuple[DictConfig, ExperimentConfig]:
    """The merged, resolved and validated config: as an omegaconf tree and as dataclasses. `path` is an
    experiment YAML or the name of a packaged one (see `experiment_file`)."""
    loader = ConfigLoader(ExperimentConfig, Path(root) if root else None)
    if path is not None:
        loader.merge_file(experiment_file(path))
    for text in overrides:
        loader.merge_override(text)
    return loader.build()


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


__all__ = ["DEFAULT_STEPS", "EVAL_MODES", "LOOPS", "RL_EDITORS", "RL_REFERENCES", "RL_REWARDS", "RL_ROLES", "ConfigError", "ConfigLoader",
           "DataSourceConfig", "ExperimentConfig", "RLConfig",
           "PACKAGE_CONFIGS", "PreviewConfig", "RUN_STEPS", "StageConfig", "TrainConfig", "VAETrainConfig", "experiment_file",
           "load_config", "save_config"]
