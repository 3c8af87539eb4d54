"""A disk cache of the frozen reasoner's condition states, for stage 2.

Each entry is keyed by two hashes: the reasoner's **fingerprint** (every weight, the tokenizer's
vocabulary and chat template, the image processor's settings) and the **sample** (the exact token
ids of the rendered condition prompt and the pixel values the processor made). Any change to the
weights, the template, the processor or the sample gives a different key, so a stale entry is
never reused; it is simply not found. Entries are written atomically (temporary file, rename),
so concurrent ranks can share one cache folder. Every entry's path is proved to resolve inside the cache's
root before it is written (a symlink planted in the cache cannot send an entry elsewhere).

    root/<fingerprint>/<key[:2]>/<key>.safetensors    {"states": (T, hidden)}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save

from reasonedit.paths import inside, output_file

from ..publish import atomic_write_bytes

log = logging.getLogger(__name__)


def hash_tensors(h, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Feed each (name, tensor)'s name, dtype, shape and bytes into the hash `h`."""
    for name, tensor in named:
        if hasattr(tensor, "full_tensor"):  # a sharded DTensor (FSDP2): hash the whole tensor, as one process sees it
            tensor = tensor.full_tensor()  # a collective: every rank hashes the same names in the same order
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def reasoner_fingerprint(reasoner) -> str:
    """A hash of everything that decides the condition states except the sample itself."""
    h = hashlib.blake2b(digest_size=16)
    hash_tensors(h, sorted(reasoner.model.state_dict().items()))
    tok = reasoner.tokenizer
    h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    h.update((tok.chat_template or "").encode())
    h.update(json.dumps(reasoner.processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(reasoner.condition_prefix_length).encode())
    h.update(reasoner.condition_template.prefix().encode())
    return h.hexdigest()


def sample_key(inputs: dict[str, torch.Tensor]) -> str:
    """A hash of one sample's processed condition inputs (token ids, pixels, image grid)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("input_ids", "pixel_values", "image_grid_thw"):
        t = inputs.get(name)
        if t is None:
            h.update(f"{name}:none".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    unreadable: int = 0  # entries that could not be read and were computed again


class TensorFiles:
    """One tensor per key under `dir` (`<key[:2]>/<key>.safetensors`, the tensor stored as `name`), written
    atomically; an unreadable entry counts in `stats` and reads as missing, to be computed again. `dir` and every
    entry must resolve inside `root` (default: `dir`): an OutsidePathError otherwise, before anything is written."""

    def __init__(self, dir: Path, name: str, what: str, root: Path | None = None):
        self.dir, self.name, self.what = Path(dir), name, what
        self.root = Path(root) if root is not None else self.dir
        inside(self.root, self.dir).mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        return output_file(self.dir, key[:2], f"{key}.safetensors")  # keys are hashes; a name is checked anyway

    def read(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)[self.name]
        except Exception as e:  # a torn or foreign file: recompute rather than trust it
            self.stats.unreadable += 1
            log.warning("%s entry %s is unreadable (%s); computing it again", self.what, path, e)
            return None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        atomic_write_bytes(inside(self.root, self.path(key)), save({self.name: tensor.detach().to("cpu").contiguous()}))


class ConditionCache:
    """Condition states of a frozen reasoner, computed once per sample and read back after."""

    def __init__(self, root: str | os.PathLike, reasoner, packed: bool = True, backend: str = "auto"):
        self.reasoner, self.packed, self.backend = reasoner, packed, backend
        self.fingerprint = reasoner_fingerprint(reasoner)
        self.dir = Path(root) / self.fingerprint
        self.files = TensorFiles(self.dir, "states", "condition cache", root=Path(root))
        self.stats = self.files.stats

    @torch.no_grad()
    def states(self, images: Sequence, instructions: Sequence[str]) -> list[torch.Tensor]:
        """One (T_i, hidden) tensor per sample: from disk where cached, else computed and stored."""
        return self.encoded_states(self.reasoner.condition_inputs(images, instructions))

    @torch.no_grad()
    def encoded_states(self, inputs: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """`states` of condition prompts already encoded (a preprocessed segment's `condition`): nothing is
        encoded twice."""
        keys = [sample_key(x) for x in inputs]
        out: list[torch.Tensor | None] = [self.files.read(k) for k in keys]
        missing = [i for i, s in enumerate(out) if s is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            computed = self.reasoner.encoded_condition_states([inputs[i] for i in missing], packed=self.packed,
                                                              backend=self.backend)
            for i, states in zip(missing, computed):
                self.files.write(keys[i], states)
                out[i] = states.detach().to("cpu")
        return [s.to(self.reasoner.device) for s in out]


__all__ = ["CacheStats", "ConditionCache", "TensorFiles", "hash_tensors", "reasoner_fingerprint", "sample_key"]
