"""The inference pipeline: a ReasonEditModel placed on its device, and the one place editors and thinkers are made.

`Pipeline` holds think / edit / reflect / edit_with_reasoning over the model's own generator and reasoner.
`build_editor` and `build_thinker` turn what a command line or a run's config names (the model, the exact
shapes editor, HTTP services) into an `Editor` and a `Thinker`; `reasonedit edit`, `serve`, `eval` and the
run's edit and eval steps all build theirs here, so every one of them places the model the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch

from reasonedit.inference.builtin import Generate, GeneratorEditor, ReasonerThinker
from reasonedit.inference.loop import edit_with_reasoning
from reasonedit.inference.sampler import SamplerConfig
from reasonedit.inference.types import SHAPES_EDITOR, EditRequest, Editor, Thinker
from reasonedit.config.model import RUN_DTYPES
from reasonedit.models.model import COMPONENTS, CONFIG_FILE, ReasonEditModel

if TYPE_CHECKING:
    from reasonedit.shapes.world import WorldConfig

def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None or "auto": CUDA when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """`dtype` as a torch dtype; "auto": bfloat16 on CUDA, as stored elsewhere (None); None: as stored."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in RUN_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {list(RUN_DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return getattr(torch, dtype)


class Pipeline:
    """A model placed on `device` (and cast to `dtype` when given) in eval mode, with its built-in editor and
    thinker and the think -> edit -> reflect API over them. Lists in give lists out; one image and one
    string give one result."""

    def __init__(self, model: ReasonEditModel, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, sampler: SamplerConfig | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = (model.to(self.device, self.dtype) if self.dtype is not None else model.to(self.device)).eval()
        self.sampler = sampler

    @classmethod
    def load(cls, path: str | Path, *, components: Sequence[str] = COMPONENTS,
             device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
             sampler: SamplerConfig | None = None) -> "Pipeline":
        """A model folder (ReasonEditModel.save_pretrained) with the parts named in `components`."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a model folder (no {CONFIG_FILE})")
        return cls(ReasonEditModel.from_pretrained(path, components=components), device=device, dtype=dtype,
                   sampler=sampler)

    def editor(self, progress: Callable[[int, int], None] | None = None) -> GeneratorEditor:
        return GeneratorEditor(self.model, self.sampler, progress=progress)

    def thinker(self, generate: Optional[Generate] = None, max_new_tokens: int | Mapping[str, int] = 128,
                loop: Optional[str] = None) -> ReasonerThinker:
        return ReasonerThinker(self.model, generate=generate, max_new_tokens=max_new_tokens, loop=loop)

    def think(self, source, instruction):
        """The concrete instruction for (source, abstract instruction)."""
        sources, instructions, single = _as_batch(source, instruction)
        out = self.thinker().think(sources, instructions)
        return out[0] if single else out

    def edit(self, source, instruction, *, seed: int = 0, guidance_scale: float = 4.0,
             num_inference_steps: int = 28, negative_prompt: str = " ", extra_images=None):
        """Edited uint8 (H, W, 3) image(s) from the generator alone; lists run as one packed batch.
        `extra_images`: further source images ("Picture 2", ...): a sequence for one edit, one per sample for lists."""
        sources, instructions, single = _as_batch(source, instruction)
        extras = _extras(extra_images, len(sources), single)
        requests = [EditRequest(image=s, prompt=i, seed=seed, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                                extra_images=e)
                    for s, i, e in zip(sources, instructions, extras)]
        out = self.editor().edit(requests)
        return out[0] if single else out

    def reflect(self, source, edited, instruction, previous=None):
        """A `Reflection` (description, score, reason, decision) on each edited image."""
        sources, instructions, single = _as_batch(source, instruction)
        edits = [edited] if single else list(edited)
        prev = [previous] * len(sources) if previous is None or isinstance(previous, str) else list(previous)
        out = self.thinker().reflect(sources, edits, instructions, prev)
        return out[0] if single else out

    def edit_with_reasoning(self, source, instruction, *, think: bool = True, reflect: bool = True,
                            rounds: int = 3, seed: int = 0, guidance_scale: float = 4.0,
                            num_inference_steps: int = 28, negative_prompt: str = " ",
                            generate: Optional[Generate] = None, progress=None, extra_images=None,
                            loop: str = "reasonedit"):
        """The think -> edit -> reflect loop with this model as editor and thinker: a `Trace` per sample.
        `generate` replaces the reasoner's text generation (a `messages_batch -> list[str]` callable); `loop`:
        the loop's rules, "reasonedit" or "editthinker" (`reasonedit.inference.loop`)."""
        sources, instructions, single = _as_batch(source, instruction)
        thinker = self.thinker(generate, loop=loop) if (think or reflect) else None
        traces = edit_with_reasoning(self.editor(), thinker, sources, instructions, think=think, reflect=reflect,
                                     rounds=rounds, seed=seed, guidance_scale=guidance_scale,
                                     num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                                     progress=progress, extra_images=_extras(extra_images, len(sources), single),
                                     loop=loop)
        return traces[0] if single else traces


def build_editor(editor: str | Sequence[str] | None = None, *, pipeline: Pipeline | None = None,
                 world: "WorldConfig | None" = None, error_rate: float = 0.0, seed: int = 0, concurrency: int = 8,
                 progress: Callable[[int, int], None] | None = None, preset: str | None = None,
                 resize_to_source: bool | None = None) -> Editor:
    """None: the pipeline's generator; SHAPES_EDITOR: the exact shapes editor on `world` (None: the default world),
    making errors on purpose at `error_rate`; else HTTP editing-service URL(s), round robin, spoken to as
    `preset` says (`editor_presets`), results resized to the source's size as `resize_to_source` says."""
    if error_rate and editor != SHAPES_EDITOR:
        raise ValueError("error rate: only the shapes editor makes errors on purpose")
    if (preset is not None or resize_to_source is not None) and (editor is None or editor == SHAPES_EDITOR):
        flag = "--editor-preset" if preset is not None else "--editor-resize-to-source"
        raise ValueError(f"{flag}: only with --editor URL (an HTTP editing service), not with "
                         f"{'the built-in generator' if editor is None else '--editor shapes'}")
    if editor is None:
        if pipeline is None:
            raise ValueError("the built-in editor needs a model; give a model folder or an editor URL")
        return pipeline.editor(progress)
    if editor == SHAPES_EDITOR:
        from reasonedit.shapes.editor import ShapesEditor
        return ShapesEditor(world, error_rate=error_rate, seed=seed)
    from reasonedit.inference.http_editor import HttpEditor
    urls = [editor] if isinstance(editor, str) else list(editor)
    return HttpEditor([u.strip() for arg in urls for u in arg.split(",") if u.strip()], concurrency=concurrency,
                      preset=preset, resize_to_source=resize_to_source)


def build_thinker(thinker: str | None = None, *, pipeline: Pipeline | None = None, model_name: str | None = None,
                  api_key: str | None = None, contract: str = "reasonedit", concurrency: int = 8,
                  max_new_tokens: int | Mapping[str, int] = 128, prompt_template: str | Path | None = None,
                  loop: str | None = None) -> Thinker:
    """None: the pipeline's reasoner; else an OpenAI-compatible chat endpoint speaking `contract`.
    `prompt_template`: the editthinker contract's prompt, a file (EditThinker's `inference/prompt_template.txt`)
    or its text; `loop`: the loop's rules the thinker is built for ("reasonedit" | "editthinker"; None: ours),
    which `edit_with_reasoning` then follows. `max_new_tokens`: the built-in reasoner's longest reply, one number or
    {role: tokens}."""
    if thinker is None:
        if pipeline is None:
            raise ValueError("the built-in thinker needs a model; give a model folder or a thinker URL")
        if prompt_template is not None:
            raise ValueError("prompt_template: the built-in reasoner asks with our role prompts; a prompt file is "
                             "for a chat thinker (a thinker URL) with the editthinker contract")
        return pipeline.thinker(max_new_tokens=max_new_tokens, loop=loop)
    from reasonedit.inference.openai_thinker import OpenAIThinker
    return OpenAIThinker(thinker, model_name, api_key, contract=contract, concurrency=concurrency,
                         prompt_template=prompt_template, loop=loop)


def _extras(extra_images, n: int, single: bool) -> list[tuple]:
    """Each sample's further source images: `extra_images` is a sequence of images for one edit, one sequence
    per sample for a batch, or None."""
    if extra_images is None:
        return [()] * n
    if single:
        return [tuple(extra_images)]
    extras = [tuple(e) for e in extra_images]
    if len(extras) != n:
        raise ValueError(f"extra_images: {len(extras)} entries for {n} samples")
    return extras


def _as_batch(source, instruction) -> tuple[list, list[str], bool]:
    """(sources, instructions, single): one image and one string, or two lists of the same length."""
    if isinstance(instruction, str):
        return [source], [instruction], True
    sources, instructions = list(source), list(instruction)
    if len(sources) != len(instructions):
        raise ValueError(f"{len(sources)} source images for {len(instructions)} instructions")
    return sources, instructions, False


__all__ = ["Pipeline", "build_editor", "build_thinker", "resolve_device", "resolve_dtype"]
