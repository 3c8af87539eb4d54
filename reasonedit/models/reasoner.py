"""The Qwen2.5-VL reasoner: condition states for the generator, generation, LoRA, and packed rows.

Packed rows run through the stock transformers module. The language model's attention implementation is
`reasonedit_packed`, registered with transformers' `AttentionInterface`: plain sdpa, unless the
forward carries a `packed_attention` kwarg (a `PackedAttention` over the row's `TokenLayout`), in
which case its causal attention uses that one document-causal mask. Position ids of a packed row are
the model's own 3-axis `get_rope_index` per sample, concatenated.

The vision tower runs `reasonedit_packed_vision_flash` (`packed_vision_attention_forward`): one call per
layer over all images' windows (windowed layers) or whole images (full-attention layers), the
boundaries turned into a block-diagonal `PackedAttention` (flex on CUDA, per-document sdpa on CPU).
`set_attention(model, packed_vision=False)` restores the stock per-window calls.

Directory layout of `save_pretrained(dir)`:
    dir/            the base model in Hugging Face format (config.json, model.safetensors), the
                    tokenizer and preprocessor_config.json; loadable by plain transformers
    dir/lora/       when LoRA is present: the adapter in peft format (adapter_config.json,
                    adapter_model.safetensors); `PeftModel.from_pretrained(base, dir/lora)` loads it
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from transformers import (
    AttentionInterface,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from reasonedit.models import prompts
from reasonedit.models.attention import PackedAttention, Span, TokenLayout
from reasonedit.config.model import LoraConfig
from reasonedit.models.processor import (
    Image,
    Messages,
    ReasonerProcessor,
    build_image_processor,
    collate,
)
from reasonedit.models.tiny import VOCAB_MULTIPLE, init_tiny_reasoner, load_reasoner
from reasonedit.models.tokenizer import DECISION_TOKENS, add_decision_tokens, single_token_id

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "reasonedit_packed"  # the attention implementation name the language model runs with
# The vision tower's. "flash" in the name is what sends Qwen2.5-VL's vision attention down its varlen path (see
# packed_vision_attention_forward); it names no flash-attn kernel.
VISION_ATTENTION = "reasonedit_packed_vision_flash"
PACKED_KWARG = "packed_attention"  # forward kwarg carrying the row's PackedAttention
LORA_DIR = "lora"
LM_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LM_ATTENTION_PREFIX = r"model\.language_model\.layers\.\d+\.self_attn\."
TEMPLATE_REPEATS = 5  # copies of the fixed prompt texts in a tiny tokenizer's training corpus


# ---------------------------------------------------------------------------------------------------
# The attention function


def _unit_scaled(query: torch.Tensor, dropout: float, scaling: Optional[float], what: str) -> torch.Tensor:
    """`query` rescaled so that `PackedAttention`'s 1/sqrt(D) gives the module's own `scaling`; attention dropout,
    which neither packed function implements (the reasoner runs without it), is refused by name."""
    if dropout > 0.0:
        raise NotImplementedError(f"{what} has no attention dropout; got dropout={dropout}")
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
        return query * (scaling * head_dim**0.5)
    return query


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa, except the LM's causal attention in a packed forward, which uses the row's document mask."""
    packed: Optional[PackedAttention] = kwargs.pop(PACKED_KWARG, None)
    causal = getattr(module, "is_causal", False)
    _count_call("language" if causal else "vision")
    # With packed_vision=False the vision tower calls this per window: bidirectional, never the text mask.
    if packed is None or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # (1, H, L, D) queries; (1, H_kv, L, D) keys and values
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(
            f"packed attention takes one row and no KV cache; got query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    query = _unit_scaled(query, dropout, scaling, "packed attention")
    groups = query.shape[1] // key.shape[1]
    out = packed(query, repeat_kv(key, groups), repeat_kv(value, groups))  # (1, H, L, D)
    return out.transpose(1, 2).contiguous(), None  # (1, L, H, D), as transformers expects


def packed_vision_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One vision layer's attention over every image at once: block-diagonal over `cu_seq_lens_q`.

    What this relies on (transformers 5.23, models/qwen2_5_vl/modeling_qwen2_5_vl.py): the tower's
    `Qwen2_5_VLVisionAttention.forward` (lines 296-313) calls the attention function once over the whole
    (1, H, L, D) sequence, with the boundaries as `cu_seq_lens_q` / `cu_seq_lens_k`, when
    `is_flash_attention_requested(config)` holds, which is `"flash" in config._attn_implementation`
    (utils/generic.py line 306); otherwise it splits q, k, v per window and calls it once per window
    (lines 314-335). `Qwen2_5_VisionTransformerPretrainedModel.forward` (lines 465-480) hands every layer one
    of two tensors, `cu_window_seqlens` (windowed layers) or `cu_seqlens` (`fullatt_block_indexes`), over
    tokens already permuted window by window, so each mask is built once per forward (`_VisionMasks`).
    """
    text: Optional[PackedAttention] = kwargs.pop(PACKED_KWARG, None)  # the language model's row, if packed
    _count_call("vision")
    if cu_seq_lens_q is None:
        raise ValueError(f"{VISION_ATTENTION} is the vision tower's varlen attention and needs cu_seq_lens_q; "
                         f"module {type(module).__name__} called it without")
    if query.shape[0] != 1 or key.shape[1] != query.shape[1]:
        raise ValueError(f"packed vision attention takes one row and as many key as query heads; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    query = _unit_scaled(query, dropout, scaling, "packed vision attention")
    attention = _VISION_MASKS.get(cu_seq_lens_q, query.shape[2], text.backend if text is not None else "auto")
    out = attention(query, key, value)  # (1, H, L, D)
    return out.transpose(1, 2).contiguous(), None  # (1, L, H, D), as transformers expects


class _VisionMasks:
    """The vision tower's `PackedAttention` per boundaries tensor, matched by identity: the tower passes the same
    two tensors to all its layers in a forward. Holds the last few (and so keeps them alive: ids are not reused)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[torch.Tensor, int, str, PackedAttention]] = []

    def get(self, cu_seqlens: torch.Tensor, length: int, backend: str) -> PackedAttention:
        for bounds, n, b, attention in self.entries:
            if bounds is cu_seqlens and n == length and b == backend:
                return attention
        attention = PackedAttention(TokenLayout.from_cu_seqlens(cu_seqlens, length, full=True), backend)
        self.entries = [(cu_seqlens, length, backend, attention)] + self.entries[: self.size - 1]
        return attention


_VISION_MASKS = _VisionMasks()
# the open `attention_calls` counter of this context, if any
_CALLS: contextvars.ContextVar[Optional[Counter]] = contextvars.ContextVar("reasonedit_attention_calls", default=None)


def _count_call(part: str) -> None:
    calls = _CALLS.get()
    if calls is not None:
        calls[part] += 1


@contextlib.contextmanager
def attention_calls() -> Iterator[Counter]:
    """Count the calls of the registered attention functions in this block: `calls["vision"]`,
    `calls["language"]` (recomputation under activation checkpointing included; the running thread only)."""
    calls: Counter = Counter()
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def register_packed_attention() -> None:
    """Register `reasonedit_packed` (its masks are sdpa's) and the vision tower's attention (idempotent)."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    AttentionInterface.register(VISION_ATTENTION, packed_vision_attention_forward)


def set_attention(model: Qwen2_5_VLForConditionalGeneration, *, packed_vision: bool = True) -> None:
    """Run `model` through our attention: the language model through `reasonedit_packed`; the vision tower one call
    per layer (`packed_vision`, equal to the stock tower to float rounding) or, without, per window as stock."""
    register_packed_attention()
    vision = VISION_ATTENTION if packed_vision else PACKED_ATTENTION
    model.set_attn_implementation({"": PACKED_ATTENTION, "text_config": PACKED_ATTENTION, "vision_config": vision})


# ---------------------------------------------------------------------------------------------------
# Packed inputs


@dataclass
class PackedReasonerInputs:
    """Several samples in one row: ids, 3-axis positions per sample, images in sample order, layout."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (3, 1, L): each sample's own get_rope_index, concatenated
    mm_token_type_ids: torch.Tensor  # (1, L)
    layout: TokenLayout  # document-causal: one causal span per sample
    lengths: list[int]
    pixel_values: Optional[torch.Tensor] = None  # (sum of patches, 3 * 2 * 14 * 14)
    image_grid_thw: Optional[torch.Tensor] = None  # (n_images, 3)
    labels: Optional[torch.Tensor] = None  # (1, L), -100 on each sample's first token

    def split(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample pieces of a (1, L, ...) tensor over this row."""
        return list(torch.split(row[0], self.lengths))

    def to(self, device: torch.device | str) -> "PackedReasonerInputs":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)
        layout = TokenLayout(self.layout.doc.to(device), self.layout.span.to(device), self.layout.full.to(device))
        return PackedReasonerInputs(move(self.input_ids), move(self.position_ids), move(self.mm_token_type_ids),
                                    layout, list(self.lengths), move(self.pixel_values), move(self.image_grid_thw),
                                    move(self.labels))


def pack_reasoner_inputs(
    samples: Sequence[Mapping[str, torch.Tensor]], model: Qwen2_5_VLForConditionalGeneration
) -> PackedReasonerInputs:
    """Concatenate per-sample processor outputs (each (1, T_i), unpadded) into one packed row.

    `model` supplies `get_rope_index`, so each sample gets exactly the 3-axis positions it would get alone.
    """
    if not samples:
        raise ValueError("pack_reasoner_inputs: no samples")
    ids, types, positions, pixels, grids, labels, lengths = [], [], [], [], [], [], []
    for i, s in enumerate(samples):
        if s["input_ids"].shape[0] != 1:
            raise ValueError(f"sample {i}: expected one sequence (1, T), got input_ids {tuple(s['input_ids'].shape)}")
        if "attention_mask" in s and not bool(s["attention_mask"].all()):
            raise ValueError(f"sample {i} is padded; pack unpadded samples (ReasonerProcessor.encode_one)")
        if "mm_token_type_ids" not in s:
            raise ValueError(f"sample {i} has no mm_token_type_ids; without them image tokens get 1-D positions")
        grid = s.get("image_grid_thw")
        with torch.no_grad():
            pos, _ = model.model.get_rope_index(s["input_ids"], s["mm_token_type_ids"], image_grid_thw=grid)
        ids.append(s["input_ids"])
        types.append(s["mm_token_type_ids"])
        positions.append(pos)  # (3, 1, T_i)
        lengths.append(int(s["input_ids"].shape[1]))
        if grid is not None:
            pixels.append(s["pixel_values"])
            grids.append(grid)
        if "labels" in s:
            label = s["labels"].clone()
            label[:, 0] = -100  # alone, a first token is never predicted; packed, it must not be either
            labels.append(label)
    if labels and len(labels) != len(samples):
        raise ValueError("pack_reasoner_inputs: some samples have labels and some do not")
    layout = TokenLayout.from_spans([Span(doc=i, length=n, full=False) for i, n in enumerate(lengths)],
                                       device=samples[0]["input_ids"].device)
    return PackedReasonerInputs(
        input_ids=torch.cat(ids, dim=1),
        position_ids=torch.cat(positions, dim=2),
        mm_token_type_ids=torch.cat(types, dim=1),
        layout=layout,
        lengths=lengths,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        labels=torch.cat(labels, dim=1) if labels else None,
    )


# ---------------------------------------------------------------------------------------------------
# The reasoner


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft 0.21 asks transformers 5.23 for a deprecated property; the warning is theirs, not the user's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class Reasoner(torch.nn.Module):
    """A Qwen2.5-VL model with its processor, running through the `reasonedit_packed` attention.

    A module whose one child is `model`, the transformers module (LoRA layers, when added, sit inside it), so
    `.to()`, `.train()` and `.parameters()` are nn.Module's; `peft_model` is the peft wrapper used to save and
    load the adapter, or None, kept out of the module tree (its parameters are `model`'s).
    """

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, processor: ReasonerProcessor):
        super().__init__()
        set_attention(model)
        self.model = model
        self.processor = processor
        self._set_peft(None)
        self.condition_template = prompts.OWN_TEMPLATE
        if len(processor.tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"tokenizer has {len(processor.tokenizer)} tokens but the model embeds "
                f"{model.get_input_embeddings().num_embeddings}; resize the embeddings first"
            )

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None, lora_trainable: bool = False
    ) -> "Reasoner":
        """Load a reasoner directory (local only), with its `lora/` adapter when present."""
        path = Path(path)
        model_kwargs = {"dtype": dtype} if dtype is not None else {}
        model, tokenizer = load_reasoner(path, **model_kwargs)
        vision = model.config.vision_config
        processor = ReasonerProcessor.from_pretrained(
            path, tokenizer, patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )
        reasoner = cls(model, processor)
        adapter = path / LORA_DIR
        if (adapter / "adapter_config.json").is_file():
            from peft import PeftModel

            with _quiet_peft():
                reasoner._set_peft(PeftModel.from_pretrained(model, adapter, is_trainable=lora_trainable,
                                                             local_files_only=True))
            logger.info("loaded LoRA adapter from %s (trainable=%s)", adapter, lora_trainable)
        elif adapter.exists():
            raise FileNotFoundError(f"{adapter} exists but has no adapter_config.json; remove it or save again")
        model.eval()
        return reasoner

    @classmethod
    def tiny(
        cls, texts: Iterable[str], *, vocab_size: int = 1024, seed: int = 0, min_pixels: int = 56 * 56,
        max_pixels: int = 224 * 224, **sizes: int,
    ) -> "Reasoner":
        """A random tiny reasoner whose tokenizer is trained on `texts` plus the fixed prompt texts."""
        # every conversation carries the fixed prompt texts: repeated, they clear the BPE's min_frequency and are
        # merged into words (the condition prompt 114 -> 56 tokens, a pretrain question 104 -> 70)
        corpus = list(texts) + prompts.template_texts() * TEMPLATE_REPEATS
        model, tokenizer = init_tiny_reasoner(corpus, vocab_size=vocab_size, seed=seed, **sizes)
        vision = model.config.vision_config
        image_processor = build_image_processor(
            min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
        )
        return cls(model, ReasonerProcessor(tokenizer, image_processor))

    # -- properties -----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def condition_template(self) -> prompts.ConditionTemplate:
        """The condition prompt's template (ours; a diffusers folder's model sets its pipeline's)."""
        return self._condition_template

    @condition_template.setter
    def condition_template(self, template: prompts.ConditionTemplate) -> None:
        self._condition_template = template
        self._prefix_ids = prompts.condition_prefix_ids(self.processor.tokenizer, template)

    @property
    def condition_prefix_length(self) -> int:
        """Tokens of the fixed condition prefix dropped from the states (64 with Qwen's prompt and tokenizer)."""
        return len(self._prefix_ids)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    # -- tokens and adapters --------------------------------------------------------------------

    def add_decision_tokens(self) -> int:
        """Add the missing decision tokens; grow the embeddings if they do not fit. Returns how many were added.

        New rows (input embedding and LM head) start as the mean of the existing tokens' rows.
        """
        if self.peft_model is not None:
            raise RuntimeError("add decision tokens before add_lora: the adapter is built over the vocabulary")
        known = len(self.tokenizer)
        added = add_decision_tokens(self.tokenizer)
        if not added:
            return 0
        new_ids = [single_token_id(self.tokenizer, t) for t in DECISION_TOKENS]
        new_ids = [i for i in new_ids if i >= known]
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE,
                                               mean_resizing=False)
        with torch.no_grad():
            for weight in (self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight):
                weight[new_ids] = weight[:known].mean(dim=0, keepdim=True)
        logger.info("decision tokens at ids %s; embeddings %d rows", new_ids,
                    self.model.get_input_embeddings().num_embeddings)
        return added

    def add_lora(self, config: LoraConfig) -> None:
        """LoRA on the language model's attention projections only; everything else frozen."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if self.peft_model is not None:
            raise RuntimeError("the reasoner already has a LoRA adapter")
        bad = [t for t in config.targets if t not in LM_ATTENTION_PROJECTIONS]
        if bad or not config.targets:
            raise ValueError(f"lora.targets {list(config.targets)}: LoRA goes on the language model's attention "
                             f"projections only, a non-empty subset of {list(LM_ATTENTION_PROJECTIONS)}")
        pattern = LM_ATTENTION_PREFIX + "(" + "|".join(re.escape(t) for t in config.targets) + ")"
        peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                     target_modules=pattern, bias="none")
        with _quiet_peft():
            self._set_peft(get_peft_model(self.model, peft_config))  # injects into self.model in place
        n = sum(p.numel() for p in self.trainable_parameters())
        logger.info("added LoRA (rank %d) on %s: %d trainable parameters", config.rank, list(config.targets), n)

    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the base weights and drop it (the model then computes what it computed with
        the adapter, to float rounding); nothing happens without an adapter."""
        if self.peft_model is None:
            return
        with _quiet_peft():
            merged = self.peft_model.merge_and_unload()
        if merged is not self.model:  # peft merges in place and hands back the model it wrapped
            raise RuntimeError("merge_lora: peft returned a different model than the one it wrapped")
        self._set_peft(None)
        logger.info("merged the LoRA adapter into the reasoner's base weights")

    # -- save -----------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the base model, tokenizer and image processor to `path`, and the adapter to `path/lora`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.peft_model is None:
            self.model.save_pretrained(path)
        else:
            # The LoRA-wrapped linears keep their weights under `base_layer`; the base is saved as it was.
            base = {re.sub(r"\.base_layer\.", ".", k): v
                    for k, v in self.model.state_dict().items() if "lora_" not in k}
            self.model.save_pretrained(path, state_dict=base)
            self.peft_model.save_pretrained(path / LORA_DIR)
        self.processor.save_pretrained(path)
        return path

    # -- conditioning ---------------------------------------------------------------------------

    def condition_inputs(
        self, images: Sequence[Image | Sequence[Image]], instructions: Sequence[str]
    ) -> list[dict[str, torch.Tensor]]:
        """Per-sample, unpadded inputs of the condition prompt; checks that each starts with the fixed prefix."""
        if len(images) != len(instructions):
            raise ValueError(f"condition: {len(images)} image entries for {len(instructions)} instructions")
        samples = []
        for image, instruction in zip(images, instructions):
            sample = prompts.encode_condition(self.processor, image, instruction, self.condition_template)
            samples.append({k: v.to(self.device) for k, v in sample.items()})
        return samples

    def condition_states(
        self,
        images: Sequence[Image | Sequence[Image]],
        instructions: Sequence[str],
        *,
        packed: bool = False,
        backend: str = "auto",
    ) -> list[torch.Tensor]:
        """Last-layer hidden states over the condition prompt, fixed system prefix dropped: one (T_i, hidden)
        tensor per sample. `images[i]` is one image or a list (multi-image edit). Gradients flow when enabled."""
        return self.encoded_condition_states(self.condition_inputs(images, instructions), packed=packed,
                                             backend=backend)

    def encoded_condition_states(self, samples: Sequence[Mapping[str, torch.Tensor]], *, packed: bool = False,
                                 backend: str = "auto") -> list[torch.Tensor]:
        """`condition_states` of condition prompts already encoded (`condition_inputs`, or a preprocessed
        segment's `condition`), on any device."""
        samples = [{k: v.to(self.device) for k, v in s.items()} for s in samples]
        prefix = self.condition_prefix_length
        if packed:
            return self.packed_condition_states(samples, [prefix] * len(samples), backend=backend)
        batch = collate(samples, pad_id=self.tokenizer.pad_token_id, padding_side="right")
        hidden = self.model.model(**batch, use_cache=False).last_hidden_state  # (B, T, hidden)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [hidden[i, prefix:n] for i, n in enumerate(lengths)]

    # -- packed forwards ------------------------------------------------------------------------

    def packed_condition_states(self, samples: Sequence[Mapping[str, torch.Tensor]], prefix_tokens: Sequence[int],
                                *, backend: str = "auto") -> list[torch.Tensor]:
        """Condition states of encoded condition prompts run as one packed row: one (T_i - prefix_tokens[i], hidden)
        tensor per sample. Gradients flow when enabled."""
        row = pack_reasoner_inputs(samples, self.model).to(self.device)
        states = row.split(self.packed_hidden_states(row, backend=backend))  # (1, L, hidden) -> (T_i, hidden) each
        return [s[p:] for s, p in zip(states, prefix_tokens)]

    def _packed_kwargs(self, row: PackedReasonerInputs, backend: str) -> dict[str, Any]:
        return {
            "input_ids": row.input_ids,
            "position_ids": row.position_ids,
            "pixel_values": row.pixel_values,
            "image_grid_thw": row.image_grid_thw,
            "use_cache": False,
            # one mask for the whole row, built once and shared by every layer
            PACKED_KWARG: PackedAttention(row.layout, backend),
        }

    def packed_hidden_states(self, row: PackedReasonerInputs, *, backend: str = "auto") -> torch.Tensor:
        """Last-layer hidden states (1, L, hidden) of a packed row."""
        return self.model.model(**self._packed_kwargs(row, backend)).last_hidden_state

    def forward_packed(self, row: PackedReasonerInputs, *, backend: str = "auto", with_loss: bool = True,
                       output_hidden_states: bool = False) -> CausalLMOutputWithPast:
        """Logits (1, L, vocab) of a packed row; with `with_loss`, transformers' mean next-token loss over the row's
        labels (the stages sum their own, token-weighted across ranks, and pass with_loss=False)."""
        return self.model(**self._packed_kwargs(row, backend), labels=row.labels if with_loss else None,
                          output_hidden_states=output_hidden_states)

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        messages: Messages | Sequence[Messages],
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
    ) -> list[str]:
        """Answer one conversation or a batch (left-padded): one string per conversation, cut at `<|im_end|>`,
        decision tokens kept and every other special token dropped. Sampling with a `seed` is reproducible and
        leaves the global RNG untouched."""
        batch = self.processor(messages, add_generation_prompt=True, padding_side="left").to(self.device)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        options: dict[str, Any] = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos,
                                  pad_token_id=pad, **options)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**batch, generation_config=config)
        return self.decode_answers(out[:, batch["input_ids"].shape[1]:])

    def decode_answers(self, generated: torch.Tensor) -> list[str]:
        """Generated ids (B, T) -> text, each cut at `<|im_end|>`. Special tokens other than the decision tags
        (image placeholders, role markers, padding) are dropped: they are not text, and a reply that carried an
        image placeholder into the next prompt would break it."""
        eos = self.tokenizer.eos_token_id
        keep = {self.tokenizer.convert_tokens_to_ids(t) for t in DECISION_TOKENS}
        drop = (set(self.tokenizer.all_special_ids) | {self.tokenizer.pad_token_id}) - keep
        answers = []
        for row in generated.tolist():
            row = row[: row.index(eos)] if eos in row else row
            answers.append(self.tokenizer.decode([t for t in row if t not in drop], skip_special_tokens=False))
        return answers

    # -- the adapter's wrapper, outside the module tree ------------------------------------------

    @property
    def peft_model(self):
        return self.__dict__["_peft_model"]

    def _set_peft(self, wrapper) -> None:
        # not `self.peft_model = ...`: nn.Module would register the wrapper as a child, and its parameters
        # (which are `model`'s) would appear twice in the state dict
        self.__dict__["_peft_model"] = wrapper


__all__ = ["LORA_DIR", "PACKED_ATTENTION", "PACKED_KWARG", "VISION_ATTENTION", "PackedReasonerInputs", "Reasoner",
           "attention_calls", "pack_reasoner_inputs", "packed_attention_forward", "packed_vision_attention_forward",
           "register_packed_attention", "set_attention"]
