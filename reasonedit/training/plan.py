"""`reasonedit plan`: the memory one GPU needs for a stage, by part, before anything is launched.

The models are built on the meta device from the experiment's `model` section (no weights, no memory), and the
stage's rule for what trains is applied to them, so the counts are the trainer's own:

- parameters: every parameter the stage loads, in the dtype it is stored in (`model.dtype`);
- gradients: the trainable ones, in the same dtype;
- optimizer: AdamW's two moments per trainable parameter in its dtype, plus one 4-byte step count per trainable
  tensor (DeepSpeed: a float32 master copy and float32 moments, ZeRO's 12 bytes per trainable parameter);
- EMA: a float32 copy of the generator's trainable parameters (stages 2 and 3, `train.ema_decay` > 0);
- gathered blocks (fsdp2, zero3; an estimate): the largest transformer block's parameters, gathered whole while it
  computes, twice (the next one is prefetched);
- with `train.cpu_offload` (fsdp2): the sharded parameters, gradients and optimizer state are host memory, shown
  apart and not counted in the GPU's total;
- activations: an estimate per token at the stage's row budgets (one micro-batch live at a time): per layer the
  block's saved tensors, about 9 x hidden + 4 x ffn elements per token, or with activation checkpointing one
  hidden vector per layer plus one block's worth.

What each parallel layout divides by the rank count G: ddp nothing; zero2 gradients and optimizer; fsdp2 and
zero3 parameters, gradients, optimizer and EMA. FSDP2 shards every parameter of the wrapped module, frozen ones
too, except the VAE, which encodes in preprocessing outside the wrapped forward. ZeRO-3 keeps a part that trains
nothing whole on every rank (stage 2's reasoner, the VAE) and holds each tensor of at most the JSON's
stage3_param_persistence_threshold elements whole besides its partition. The activation figure is an estimate to check against `torch.cuda.max_memory_allocated` on a GPU; the
others are the bytes the trainer holds (`held_bytes`, logged by every rank at its first step).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from reasonedit.config import ExperimentConfig

PARALLELS = ("ddp", "fsdp2", "zero2", "zero3")
HOST = " (host)"  # a row held in host memory (FSDP2's train.cpu_offload), not on the GPU
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAGE_COMPONENTS = {0: ("reasoner",), 1: ("reasoner",), 2: ("reasoner", "generator", "vae"),
                    3: ("reasoner", "generator", "vae")}
GIB = 1024 ** 3


@dataclass
class ModelCounts:
    """Parameter counts of the parts a stage loads, and how many of them (and in how many tensors) train."""

    loaded: dict[str, int]  # component -> parameters
    trainable: dict[str, int]  # component -> trainable parameters (LoRA counted under the reasoner)
    trainable_tensors: int
    layers: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # component -> (layers, hidden, ffn)
    # component -> (elements, trains) of each of its tensors: ZeRO-3 partitions a tensor only above a size
    tensors: dict[str, list[tuple[int, bool]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.loaded.values())

    @property
    def trainable_total(self) -> int:
        return sum(self.trainable.values())


@dataclass
class Plan:
    stage: int
    gpus: int
    parallel: str
    dtype: str
    counts: ModelCounts
    rows: list[tuple[str, int, str]]  # (part, bytes per GPU, how it was counted)

    @property
    def total(self) -> int:
        """Bytes per GPU (the rows held in host memory, `HOST`, not counted)."""
        return sum(b for part, b, _ in self.rows if not part.endswith(HOST))

    @property
    def host_total(self) -> int:
        return sum(b for part, b, _ in self.rows if part.endswith(HOST))

    def table(self, gpu_memory_gib: float | None = None) -> str:
        lines = [f"stage {self.stage} on {self.gpus} GPU(s), {self.parallel}, weights in {self.dtype}: "
                 f"{self.counts.total:,} parameters loaded, {self.counts.trainable_total:,} trainable",
                 "| part | per GPU | how |", "| --- | ---: | --- |"]
        lines += [f"| {part} | {b / GIB:.2f} GiB | {how} |" for part, b, how in self.rows]
        lines.append(f"| total | {self.total / GIB:.2f} GiB | on the GPU |")
        if self.host_total:
            lines.append(f"| host memory per rank | {self.host_total / GIB:.2f} GiB | train.cpu_offload |")
        if gpu_memory_gib is not None:
            verdict = "fits" if self.total <= gpu_memory_gib * GIB else "does NOT fit"
            lines.append(f"{verdict} in {gpu_memory_gib:g} GiB per GPU "
                         f"({100 * self.total / (gpu_memory_gib * GIB):.0f} % of it)")
        return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _special_tokens():
    """A small tokenizer with Qwen's special tokens: the meta reasoner's config reads only their ids."""
    from reasonedit.models.prompts import template_texts
    from reasonedit.models.tokenizer import build_tokenizer
    return build_tokenizer(template_texts(), vocab_size=512)


def _meta_reasoner(cfg: ExperimentConfig) -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from reasonedit.models.tiny import tiny_reasoner_config

    r = cfg.model.reasoner
    config = tiny_reasoner_config(_special_tokens(), hidden_size=r.hidden_size, num_layers=r.num_layers,
                                  num_heads=r.num_heads, num_kv_heads=r.num_kv_heads,
                                  intermediate_size=r.intermediate_size, vision_depth=r.vision_depth,
                                  vision_hidden_size=r.vision_hidden_size, vision_heads=r.vision_heads,
                                  vision_intermediate_size=r.vision_intermediate_size)
    config.text_config.vocab_size = r.vocab_size  # the weights' vocabulary (Qwen2.5-VL: 152064)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def _lora_tensors(reasoner: torch.nn.Module, cfg: ExperimentConfig) -> list[int]:
    """The elements of each tensor of the LoRA adapter `Reasoner.add_lora` puts on the language model's attention
    (A: rank x in, B: out x rank per adapted projection)."""
    from reasonedit.models.reasoner import LM_ATTENTION_PREFIX

    lora = cfg.model.reasoner.lora
    pattern = re.compile(LM_ATTENTION_PREFIX + "(" + "|".join(re.escape(t) for t in lora.targets) + ")$")
    out = []
    for name, module in reasoner.named_modules():
        if pattern.search(name) and isinstance(module, torch.nn.Linear):
            out += [lora.rank * module.in_features, module.out_features * lora.rank]
    return out


def count_stage(cfg: ExperimentConfig, stage: int, adapter: bool | None = None) -> ModelCounts:
    """What stage `stage` loads and trains, counted on meta-device models of the configured sizes. `adapter`:
    whether the start model's reasoner carries stage 1's LoRA adapter (None: from stage 2 on, as in the recipe)."""
    from reasonedit.models.model import build_generator

    if stage not in STAGE_COMPONENTS:
        raise ValueError(f"--stage {stage}: choose 0 (pretrain), 1, 2 or 3")
    components = STAGE_COMPONENTS[stage]
    reasoner = _meta_reasoner(cfg)
    r, g = cfg.model.reasoner, cfg.model.generator
    layers = {"reasoner": (r.num_layers, r.hidden_size, r.intermediate_size)}
    sizes = {"reasoner": [(p.numel(), stage == 0) for p in reasoner.parameters()]}  # stage 0: a full fine-tune
    if stage in (1, 3) or (stage == 2 and (adapter if adapter is not None else True)):
        sizes["reasoner"] += [(n, stage != 2) for n in _lora_tensors(reasoner, cfg)]  # stage 2: the adapter frozen
    if "generator" in components:
        with torch.device("meta"):
            generator = build_generator(cfg.model)
        sizes["generator"] = [(p.numel(), True) for p in generator.parameters()]
        width = g.num_attention_heads * g.attention_head_dim
        layers["generator"] = (g.num_layers, width, 4 * width)
    if "vae" in components:
        sizes["vae"] = [(_vae_params(cfg), False)]
    loaded = {c: sum(n for n, _ in t) for c, t in sizes.items()}
    trainable = {c: sum(n for n, trains in t if trains) for c, t in sizes.items() if c != "vae"}
    tensors = sum(1 for t in sizes.values() for _, trains in t if trains)
    return ModelCounts(loaded, trainable, tensors, layers, sizes)


def zero3_persistence_threshold(cfg: ExperimentConfig) -> int:
    """The ZeRO-3 JSON's stage3_param_persistence_threshold (DeepSpeed's default 1e5): a tensor of at most that
    many elements stays gathered between steps, its whole data held besides its partition."""
    import copy
    import json

    from .zero import json_path
    tc = copy.copy(cfg.train)
    tc.zero_stage = 3
    doc = json.loads(json_path(tc).read_text())
    return int((doc.get("zero_optimization") or {}).get("stage3_param_persistence_threshold", 100_000))


def _zero3_rows(counts: ModelCounts, gpus: int, width: int, threshold: int, ema: bool) -> list[tuple[str, int, str]]:
    """ZeRO-3's bytes per rank: a part that trains nothing stays whole (`zero.keep_frozen_whole`); in the others
    each tensor is split into `gpus` padded partitions, and one of at most `threshold` elements is also held
    whole (persistent, gathered once). Gradients, master weights and moments: the partitions."""
    def part(n: int) -> int:
        return -(-n // gpus)

    partitioned = {c for c, t in counts.tensors.items() if any(trains for _, trains in t)}
    params = sum(part(n) + (n if n <= threshold else 0) if c in partitioned else n
                 for c, t in counts.tensors.items() for n, _ in t)
    persistent = sum(n for c in partitioned for n, _ in counts.tensors[c] if n <= threshold)
    trains = sum(part(n) for t in counts.tensors.values() for n, tr in t if tr)
    whole = sorted(set(counts.tensors) - partitioned)
    rows = [("parameters", params * width, f"{counts.total:,} x {width} B / {gpus}"
             + (f", {', '.join(whole)} whole (trains nothing)" if whole else "")
             + f", + {persistent:,} in tensors of <= {threshold:,} kept gathered"),
            ("gradients", trains * 4, f"{counts.trainable_total:,} trainable x 4 B / {gpus}"),
            ("optimizer", trains * 12, f"float32 master + 2 moments: 12 B each / {gpus}")]
    if ema:
        rows.append(("EMA", sum(part(n) for n, tr in counts.tensors.get("generator", []) if tr) * 4,
                     f"generator's trainable x 4 B / {gpus}"))
    return rows


def _vae_params(cfg: ExperimentConfig) -> int:
    v = cfg.model.vae
    if v.kind == "patch":
        return 0
    from diffusers import AutoencoderKLQwenImage
    kwargs: dict[str, Any] = {"z_dim": v.latent_channels, "base_dim": v.base_dim, "num_res_blocks": v.num_res_blocks}
    if v.dim_mult:
        kwargs["dim_mult"] = list(v.dim_mult)
    if v.temperal_downsample:
        kwargs["temperal_downsample"] = list(v.temperal_downsample)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLQwenImage(**kwargs).parameters())


def _tokens(cfg: ExperimentConfig, stage: int) -> dict[str, int]:
    """Tokens of one micro-batch that keep activations for the backward, per model."""
    sc = cfg.pretrain if stage == 0 else getattr(cfg, f"stage{stage}")
    if stage in (0, 1):
        return {"reasoner": sc.reasoner_budget}
    if stage == 2:  # the frozen reasoner runs without a graph
        return {"generator": sc.generator_budget}
    return {"reasoner": sc.reasoner_budget, "generator": sc.generator_budget}


def plan_stage(cfg: ExperimentConfig, stage: int, gpus: int, parallel: str, adapter: bool | None = None) -> Plan:
    if parallel not in PARALLELS:
        raise ValueError(f"--parallel {parallel!r}: choose from {list(PARALLELS)}")
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: must be at least 1")
    counts = count_stage(cfg, stage, adapter)
    width = DTYPE_BYTES[cfg.model.dtype]
    deepspeed = parallel.startswith("zero")
    shard_params = parallel in ("fsdp2", "zero3")
    shard_states = parallel != "ddp"
    div = lambda n, sharded: -(-n // gpus) if sharded else n  # noqa: E731  (an uneven shard rounds up)
    whole = counts.loaded.get("vae", 0) if parallel == "fsdp2" else 0  # FSDP2 leaves the VAE whole on every rank
    with_ema = cfg.train.ema_decay > 0 and "generator" in counts.trainable and stage in (2, 3)
    if parallel == "zero3":
        rows = _zero3_rows(counts, gpus, width, zero3_persistence_threshold(cfg), with_ema) + [
            _gathered_row(counts, width)]
        return Plan(stage, gpus, parallel, cfg.model.dtype, counts, rows + _activation_rows(cfg, stage, counts, width))
    rows = [("parameters", div((counts.total - whole) * width, shard_params) + whole * width,
             f"{counts.total:,} x {width} B" + (f" / {gpus}" if shard_params else "")
             + (f", the VAE's {whole:,} whole" if whole else ""))]
    grads = counts.trainable_total * (4 if deepspeed else width)
    rows.append(("gradients", div(grads, shard_states), f"{counts.trainable_total:,} trainable x "
                 f"{4 if deepspeed else width} B" + (f" / {gpus}" if shard_states else "")))
    if deepspeed:
        opt, how = counts.trainable_total * 12, "float32 master + 2 moments: 12 B each"
        rows.append(("optimizer", div(opt, shard_states), how + (f" / {gpus}" if shard_states else "")))
    else:  # AdamW's step counts are one float32 scalar per tensor, on every rank
        opt = div(counts.trainable_total * 2 * width, shard_states) + 4 * counts.trainable_tensors
        rows.append(("optimizer", opt, f"2 moments x {width} B each" + (f" / {gpus}" if shard_states else "")
                     + f", + 4 B step per tensor ({counts.trainable_tensors:,})"))
    if with_ema:
        ema = counts.trainable["generator"] * 4
        rows.append(("EMA", div(ema, shard_params), "generator's trainable x 4 B"
                     + (f" / {gpus}" if shard_params else "")))
    if parallel == "fsdp2" and cfg.train.cpu_offload:
        rows = _offloaded(rows, counts, width, whole)
    if shard_params:
        rows.append(_gathered_row(counts, width))
    return Plan(stage, gpus, parallel, cfg.model.dtype, counts, rows + _activation_rows(cfg, stage, counts, width))


def _offloaded(rows: list[tuple[str, int, str]], counts: ModelCounts, width: int, whole: int
               ) -> list[tuple[str, int, str]]:
    """FSDP2 with CPUOffloadPolicy: the sharded parameters, their gradients and the optimizer state live in host
    memory; the GPU holds the VAE (left whole) besides the gathered blocks and the activations."""
    out = []
    for part, b, how in rows:
        if part == "parameters":
            out.append(("parameters" + HOST, b - whole * width, how))
            if whole:
                out.append(("VAE", whole * width, "whole on every rank, on the GPU"))
        elif part in ("gradients", "optimizer"):
            out.append((part + HOST, b, how))
        else:
            out.append((part, b, how))
    return out


def _gathered_row(counts: ModelCounts, width: int) -> tuple[str, int, str]:
    """What a sharding layout gathers while it computes: the largest transformer block's parameters, twice (the
    one computing and the one prefetched)."""
    block = max(counts.loaded.get(c, 0) // max(1, layers[0]) for c, layers in counts.layers.items())
    return ("gathered blocks (estimate)", 2 * block * width,
            f"the largest block's ~{block:,} parameters x {width} B, computing and prefetched")


def _activation_rows(cfg: ExperimentConfig, stage: int, counts: ModelCounts, width: int) -> list[tuple[str, int, str]]:
    act, parts = 0, []
    for model, tokens in _tokens(cfg, stage).items():
        n_layers, hidden, ffn = counts.layers[model]
        per_layer = 9 * hidden + 4 * ffn
        per_token = (n_layers * hidden + per_layer) if cfg.train.activation_checkpointing else n_layers * per_layer
        act += tokens * per_token * width
        parts.append(f"{model} {tokens:,} tokens")
    return [("activations (estimate)", act, ", ".join(parts) + (" with" if cfg.train.activation_checkpointing
                                                                else " without") + " checkpointing")]


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """The bytes this rank holds in parameters, gradients and optimizer state (a sharded tensor counts its local
    shard): what `plan_stage` predicts, measured."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def size(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    params = list(module.parameters())
    out = {"parameters": sum(size(p) for p in params),
           "gradients": sum(size(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None and hasattr(optimizer, "state"):
        for state in optimizer.state.values():
            out["optimizer"] += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor))
    return out


def _size(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def deepspeed_held_bytes(engine, gradients: int) -> dict[str, int]:
    """`held_bytes` of a DeepSpeed rank, with `gradients` measured where they exist (the float32 partitions'
    gradients, as its optimizer steps on them; `DeepSpeedStepper`): its parameter
    partitions (ZeRO-3: each parameter's `ds_tensor`, the whole data of those it keeps gathered, and the frozen
    parts it keeps whole; ZeRO-2: whole parameters) and the optimizer: the float32 master partitions and AdamW's moments over them."""
    opt = engine.optimizer
    # a ZeRO-3 parameter: its partition, and its whole data too while gathered (a persistent one stays gathered)
    params = {id(p): (_size(p.ds_tensor) + _size(p.data)) if hasattr(p, "ds_tensor") else _size(p)
              for p in engine.module.parameters()}
    for m in engine.module.modules():  # the frozen parts `zero.keep_frozen_whole` took out of the module tree
        for k, v in vars(m).items():
            if isinstance(v, torch.nn.Module) and k not in m._modules:
                params.update({id(p): _size(p) for p in v.parameters() if id(p) not in params})
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or
                   getattr(opt, "single_partition_of_fp32_groups", None) or [])
    inner = getattr(opt, "optimizer", opt)
    moments = sum(_size(v) for state in getattr(inner, "state", {}).values() for v in state.values())
    return {"parameters": sum(params.values()), "gradients": gradients,
            "optimizer": sum(_size(m) for m in masters) + moments}


def plans(cfg: ExperimentConfig, stages: Sequence[int], gpus: int | None, parallel: str) -> list[Plan]:
    """One plan per stage, on `gpus` GPUs or the stage's own `gpus` (the paper's counts in paper.yaml)."""
    out = []
    for n in stages:
        sc = cfg.pretrain if n == 0 else getattr(cfg, f"stage{n}")
        out.append(plan_stage(cfg, n, gpus or sc.gpus, parallel))
    return out


__all__ = ["GIB", "ModelCounts", "PARALLELS", "Plan", "count_stage", "deepspeed_held_bytes", "held_bytes", "plan_stage",
           "plans"]
