"""Counting a training step's host syncs and collectives, for tests and benches (it patches torch only inside
its `with` block; the runtime itself is never patched).

A host read (`item`, `tolist`, `float(t)`, `int(t)`, `bool(t)`, `.cpu()`, `.to("cpu")`) of a tensor on an
accelerator makes the host wait for the device's queue: it is counted wherever it is made. On a CPU every tensor
is on the host, so none of them is a sync as such; there a read is counted when the code making it is under one
of `roots` (default: the training runtime and the losses), which are the reads that become syncs on a GPU. Reads
of tensors born on the host elsewhere (AdamW's CPU step counters inside torch, a stage's labels and timestep
weights) are left out. A collective is any call of a `torch.distributed` collective function (DeepSpeed's go
through them; DDP's and FSDP2's gradient reductions run in C++ and are not seen).

    with HostSyncs() as syncs:
        stepper.step(micro, at)
    syncs.reads, syncs.collectives  # ["tolist @ reasonedit/training/step.py:107"], ["all_reduce"]

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` names the syncs PyTorch itself knows of; this counter also
sees those on a CPU, where the default test suite runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

PACKAGE = Path(__file__).resolve().parents[1]
DEFAULT_ROOTS = (PACKAGE / "training", PACKAGE / "losses")
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv")


@dataclass
class HostSyncs:
    """A context manager: the host reads and collectives made inside it, in order, as `name @ file:line`
    (reads) and `name` (collectives); `events` holds both, with any `mark(label)` between them."""

    roots: Sequence[Path] = DEFAULT_ROOTS
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind: "read" | "collective" | "mark", text)

    @property
    def reads(self) -> list[str]:
        return [text for kind, text in self.events if kind == "read"]

    @property
    def collectives(self) -> list[str]:
        return [text for kind, text in self.events if kind == "collective"]

    def mark(self, label: str) -> None:
        self.events.append(("mark", label))

    def between_marks(self) -> list[list[tuple[str, str]]]:
        """The events after each mark, up to the next one (what each marked span, e.g. a step, made)."""
        spans: list[list[tuple[str, str]]] = []
        for kind, text in self.events:
            if kind == "mark":
                spans.append([])
            elif spans:
                spans[-1].append((kind, text))
        return spans

    def clear(self) -> None:
        self.events.clear()

    # -- patching --------------------------------------------------------------------------------------
    def _counts(self, t: torch.Tensor, caller) -> bool:
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            return True
        name = caller.f_code.co_filename
        return any(name.startswith(str(r)) for r in self.roots)

    def _where(self, caller) -> str:
        path = Path(caller.f_code.co_filename)
        with_root = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
        return f"{with_root}:{caller.f_lineno}"

    def _read(self, name: str, real: Callable) -> Callable:
        def wrapped(t, *args, **kwargs):
            caller = sys._getframe(1)
            if self._counts(t, caller):
                self.events.append(("read", f"{name} @ {self._where(caller)}"))
            return real(t, *args, **kwargs)
        return wrapped

    def _to_host(self, name: str, real: Callable) -> Callable:
        """`.cpu()` and `.to(...)`: counted when a device tensor comes back to the host."""
        def wrapped(t, *args, **kwargs):
            out = real(t, *args, **kwargs)
            if (isinstance(out, torch.Tensor) and out.device.type == "cpu" and t.device.type not in ("cpu", "meta")):
                self.events.append(("read", f"{name} @ {self._where(sys._getframe(1))}"))
            return out
        return wrapped

    def _collective(self, name: str, real: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            self.events.append(("collective", name))
            return real(*args, **kwargs)
        return wrapped

    def __enter__(self) -> "HostSyncs":
        import torch.distributed as dist

        self._saved: list[tuple[object, str, object, bool]] = []
        patches = [(torch.Tensor, n, self._read(n, getattr(torch.Tensor, n))) for n in READS]
        patches += [(torch.Tensor, n, self._to_host(n, getattr(torch.Tensor, n))) for n in ("cpu", "to")]
        if dist.is_available():
            patches += [(dist, n, self._collective(n, getattr(dist, n))) for n in COLLECTIVES if hasattr(dist, n)]
        for owner, name, new in patches:
            own = name in vars(owner)  # else inherited (torch._C.TensorBase): deleted again on the way out
            self._saved.append((owner, name, vars(owner).get(name), own))
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, old, own in reversed(self._saved):
            if own:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        self._saved = []


__all__ = ["HostSyncs"]
