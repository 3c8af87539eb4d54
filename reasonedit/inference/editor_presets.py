"""How `HttpEditor` speaks to each editing service EditThinker ships: the request's field names, the service's
own defaults (steps, guidance, negative prompt), the fields sent with every request (`enhance_prompt: false`,
so no request waits on or pays for an outside prompt rewrite) and whether results come back at the source's
size. The values are those the services' request models declare (EditThinker, inference/server/apis/
*_edit_api.py at commit 803d1a7); docs/serve.md has the table and the lines they come from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

DEFAULT_PRESET = "reasonedit"


@dataclass(frozen=True)
class EditorPreset:
    """One editing service's request shape and defaults.

    guidance_field: the request field the guidance scale goes in (OmniGen2's is `text_guidance_scale`).
    negative_prompt: the service's default; None when its request takes no negative prompt (FLUX.1 Kontext).
    fixed: fields sent with every request, under the caller's `extra`.
    resize_to_source: an edit comes back at the source's size (the service answers at its own resolution).
    """

    name: str
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: Optional[str]
    guidance_field: str = "guidance_scale"
    max_steps: Optional[int] = 100  # the service's bounds (None: not checked here, the service says)
    max_guidance: Optional[float] = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    resize_to_source: bool = True
    aliases: tuple[str, ...] = ()  # EditThinker's client's model names (get_model_config)

    def defaults(self) -> dict[str, Any]:
        """The service's own settings as `EditRequest` / `edit_with_reasoning` keyword arguments."""
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "negative_prompt": " " if self.negative_prompt is None else self.negative_prompt}

    def fill(self, steps: Optional[int] = None, guidance: Optional[float] = None,
             negative_prompt: Optional[str] = None) -> tuple[int, float, str]:
        """(steps, guidance, negative prompt): what a command line gave, the preset's own where it gave None."""
        d = self.defaults()
        return (d["num_inference_steps"] if steps is None else steps,
                d["guidance_scale"] if guidance is None else guidance,
                d["negative_prompt"] if negative_prompt is None else negative_prompt)


PRESETS: dict[str, EditorPreset] = {p.name: p for p in (
    # our own `reasonedit serve` (and the loop's defaults): it keeps the source's size itself
    EditorPreset("reasonedit", 28, 4.0, " ", max_steps=None, resize_to_source=False),
    # flux_edit_api.py FluxImageEditRequest: guidance 2.5 (<= 7.5), 28 steps, enhance_prompt True, no negative prompt
    EditorPreset("flux-kontext", 28, 2.5, None, max_guidance=7.5, fixed={"enhance_prompt": False},
                 aliases=("flux-kontext-dev",)),
    # qwen_edit_api.py ImageEditRequest: negative " ", guidance 4.0 (<= 7.5, as true_cfg_scale), 50 steps,
    # enhance_prompt True
    EditorPreset("qwen-image-edit", 50, 4.0, " ", max_guidance=7.5, fixed={"enhance_prompt": False}),
    # omnigen2_edit_api.py OmniGen2ImageEditRequest: text_guidance_scale 5.0 (<= 10), image_guidance_scale 2.0
    # (left to the service), 50 steps, its negative prompt, enhance_prompt False (sent anyway)
    EditorPreset("omnigen2", 50, 5.0, "(((deformed))), blurry, over saturation, bad anatomy",
                 guidance_field="text_guidance_scale", max_guidance=10.0, fixed={"enhance_prompt": False},
                 aliases=("omnigen2-edit",)),
    # longcat_edit_api.py LongCatImageEditRequest: negative "", guidance 4.5 (<= 10), 50 steps; no enhance_prompt
    EditorPreset("longcat", 50, 4.5, "", max_guidance=10.0, aliases=("longcat-image-edit",)),
)}
PRESET_NAMES = tuple(PRESETS)


def get_preset(preset: str | EditorPreset | None = None) -> EditorPreset:
    """A preset by its name or one of EditThinker's model names; None: our own service's."""
    if isinstance(preset, EditorPreset):
        return preset
    name = DEFAULT_PRESET if preset is None else preset.strip().lower()
    for p in PRESETS.values():
        if name == p.name or name in p.aliases:
            return p
    raise ValueError(f"editor preset {preset!r}: unknown; choose from {', '.join(PRESET_NAMES)}")


def preset_name(text: str) -> str:
    """argparse `type=` for --editor-preset: a preset's name (EditThinker's model names taken too)."""
    try:
        return get_preset(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_preset_arguments(parser, editor_flag: str = "--editor") -> None:
    """--editor-preset and --editor-resize-to-source on a CLI (or argument group) that takes `editor_flag` URLs."""
    import argparse

    parser.add_argument("--editor-preset", metavar="NAME", type=preset_name,
                        help=f"the service behind {editor_flag} ({', '.join(PRESET_NAMES)}): its field names, its own "
                             "steps, guidance and negative prompt (unless given otherwise) and enhance_prompt false; "
                             "default reasonedit (our own `reasonedit serve`)")
    parser.add_argument("--editor-resize-to-source", action=argparse.BooleanOptionalAction, default=None,
                        help=f"resize {editor_flag}'s results to the source's size (default: on with an EditThinker "
                             "preset, which answer at their own resolution; off for reasonedit)")


__all__ = ["add_preset_arguments", "DEFAULT_PRESET", "EditorPreset", "PRESETS", "PRESET_NAMES", "get_preset", "preset_name"]
