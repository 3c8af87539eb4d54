"""One mask definition, several attention backends.

A packed row is described per token by three ids: the document (sample) it belongs to, the span
inside that document, and whether that span attends fully (bidirectionally) or causally. The rule,
written once as a FlexAttention `mask_mod`:

    q may attend k  iff  same document and (k <= q, or same span and the span is full)
                    or   q == k  (so padding rows, which belong to no document, stay finite)

All-causal documents give a document-causal mask (the reasoner); one full span per document
gives a block-diagonal mask (the generator); mixed spans give causal text with bidirectional
image blocks. Backends:

- `flex`: compiled `flex_attention` with a `BlockMask` (CUDA; the row padded to a multiple of 128,
  the block mask built once per forward and shared by every layer);
- `sdpa`: the same `mask_mod` materialised as a dense boolean mask for
  `scaled_dot_product_attention` (CPU, where FlexAttention has no backward);
- `flash`: `flash_attn_varlen_func` when flash-attn is installed and every document is a single
  full span or entirely causal (a plain document mask).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from reasonedit.data.packing import BLOCK

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flex", "sdpa", "flash")
FLEX_BLOCK = BLOCK  # flex attention's block: the packer's row multiple


@dataclass(frozen=True)
class Span:
    """A span of one document in a packed row: `length` tokens attending fully or causally within it."""

    doc: int
    length: int
    full: bool


@dataclass
class TokenLayout:
    """Per-token document ids, span ids and full-attention flags of one packed row."""

    doc: torch.Tensor  # (L,) int32, -1 for padding
    span: torch.Tensor  # (L,) int32, unique per span across the row
    full: torch.Tensor  # (L,) bool

    @classmethod
    def from_spans(cls, spans: Sequence[Span], device: torch.device | str = "cpu") -> "TokenLayout":
        doc, span, full = [], [], []
        for i, s in enumerate(spans):
            if s.length <= 0:
                raise ValueError(f"span {i} of document {s.doc} has length {s.length}")
            doc.append(torch.full((s.length,), s.doc, dtype=torch.int32))
            span.append(torch.full((s.length,), i, dtype=torch.int32))
            full.append(torch.full((s.length,), s.full, dtype=torch.bool))
        return cls(torch.cat(doc).to(device), torch.cat(span).to(device), torch.cat(full).to(device))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, length: int, full: bool = True) -> "TokenLayout":
        """One span per document, from cumulative boundaries (0, n_0, n_0 + n_1, ..., length) as varlen
        kernels take them; built on their device without a host sync."""
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.int32, device=cu_seqlens.device),
                                      counts, output_size=length)
        return cls(doc, doc.clone(), torch.full((length,), full, dtype=torch.bool, device=cu_seqlens.device))

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def padded(self, multiple: int) -> "TokenLayout":
        """The layout with padding tokens (document -1) appended up to a multiple of `multiple`."""
        extra = (-len(self)) % multiple
        if extra == 0:
            return self
        dev = self.doc.device
        return TokenLayout(torch.cat([self.doc, torch.full((extra,), -1, dtype=torch.int32, device=dev)]),
                           torch.cat([self.span, torch.full((extra,), -1, dtype=torch.int32, device=dev)]),
                           torch.cat([self.full, torch.zeros(extra, dtype=torch.bool, device=dev)]))

    def mask_mod(self) -> Callable:
        doc, span, full = self.doc, self.span, self.full

        def mod(b, h, q, k):
            same_doc = (doc[q] == doc[k]) & (doc[q] >= 0)
            causal_or_block = (k <= q) | ((span[q] == span[k]) & full[q])
            return (same_doc & causal_or_block) | (q == k)
        return mod

    def dense(self) -> torch.Tensor:
        """(L, L) boolean mask, True where attention is allowed: the mask_mod on every pair."""
        idx = torch.arange(len(self), device=self.doc.device)
        return self.mask_mod()(None, None, idx[:, None], idx[None, :])

    def is_plain_document_mask(self) -> bool:
        """All causal, or every document one full span: what a varlen kernel with one flag can do."""
        real = self.doc >= 0
        if not self.full[real].any():
            return True
        if not self.full[real].all():
            return False
        return all(torch.unique(self.span[self.doc == d]).numel() == 1
                   for d in torch.unique(self.doc[real]).tolist())

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Cumulative document lengths for varlen kernels (documents must be contiguous)."""
        real = self.doc[self.doc >= 0]
        change = torch.nonzero(real[1:] != real[:-1]).flatten() + 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=real.device), change,
                            torch.tensor([len(real)], device=real.device)])
        return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def _document_blocks(layout: TokenLayout) -> list[tuple[int, int, torch.Tensor | None, bool]] | None:
    """(start, end, local mask or None, is_causal) per contiguous document; None when a document
    is split into several runs (then only the dense mask over the whole row is right)."""
    doc = layout.doc.tolist()
    runs, start = [], 0
    for i in range(1, len(doc) + 1):
        if i == len(doc) or doc[i] != doc[start] or doc[start] < 0:
            runs.append((start, i))
            start = i
    real = [doc[s] for s, _ in runs if doc[s] >= 0]
    if len(real) != len(set(real)):
        return None
    blocks = []
    for s, e in runs:
        if doc[s] < 0:
            blocks.append((s, e, None, False))
            continue
        full = layout.full[s:e]
        if not bool(full.any()):
            blocks.append((s, e, None, True))  # plain causal
        elif bool(full.all()) and torch.unique(layout.span[s:e]).numel() == 1:
            blocks.append((s, e, None, False))  # one full span: no mask at all
        else:
            sub = TokenLayout(layout.doc[s:e], layout.span[s:e], full)
            blocks.append((s, e, sub.dense(), False))
    return blocks


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    # Packed rows change length every step. Measured by bench/flex_compile.py on an H100 over 12
    # distinct lengths: dynamic=False compiled once per length (47.6 s in all), dynamic=True once
    # (7.2 s), and ran no slower afterwards (1.19 ms vs 1.35 ms per forward+backward).
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def resolve_backend(backend: str, device: torch.device, layout: TokenLayout | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        if backend == "flash" and not flash_available():
            raise ValueError("attention backend 'flash' needs flash-attn and a CUDA device: "
                             "pip install reasonedit[gpu], or set the backend to auto")
        if backend == "flash" and layout is not None and not layout.is_plain_document_mask():
            raise ValueError("attention backend 'flash' supports only plain document masks (one full span "
                             "or all-causal per document); use flex or sdpa for mixed spans")
        return backend
    return "flex" if device.type == "cuda" else "sdpa"


class PackedAttention:
    """Attention over one packed row with the layout's mask, built once and reused by every layer.

    q, k, v are (1, H, L, D) for the real tokens; the backend pads and unpads as it needs.
    """

    def __init__(self, layout: TokenLayout, backend: str = "auto", compile_flex: bool = True):
        self.layout = layout
        self.length = len(layout)
        self.backend = resolve_backend(backend, layout.doc.device, layout)
        if self.backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            padded = layout.padded(FLEX_BLOCK)
            self.padded_length = len(padded)
            # compiled mask construction: the eager one evaluates the mask_mod on all L^2 pairs
            self.block_mask = create_block_mask(padded.mask_mod(), None, None, self.padded_length,
                                                self.padded_length, device=layout.doc.device,
                                                _compile=compile_flex)
            self._flex = _compiled_flex() if compile_flex else flex_attention
        elif self.backend == "sdpa":
            self.blocks = _document_blocks(layout)
            self.dense = layout.dense() if self.blocks is None else None
        else:
            if bool((layout.doc < 0).any()):
                raise ValueError("attention backend 'flash' takes a layout without padding tokens")
            self.cu_seqlens, self.max_len = layout.cu_seqlens()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1 or q.shape[2] != self.length:
            raise ValueError(f"expected (1, H, {self.length}, D) tensors for this packed row, got {tuple(q.shape)}")
        if self.backend == "sdpa":
            if self.blocks is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense)
            # One call per document, each with its own small mask: sum(L_i^2) work, not L^2.
            outs = []
            for start, end, mask, causal in self.blocks:
                if mask is None and end - start == 1 and not causal:
                    outs.append(v[:, :, start:end])  # a padding token sees only itself
                    continue
                outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                           attn_mask=mask, is_causal=causal))
            return torch.cat(outs, dim=2)
        if self.backend == "flex":
            pad = self.padded_length - self.length
            if pad:
                q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            out = self._flex(q, k, v, block_mask=self.block_mask)
            return out[:, :, :self.length]
        from flash_attn import flash_attn_varlen_func
        causal = not bool(self.layout.full.any())
        out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                     self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, causal=causal)
        return out.transpose(0, 1)[None]


__all__ = ["BACKENDS", "FLEX_BLOCK", "PackedAttention", "Span", "TokenLayout", "flash_available",
           "resolve_backend"]
