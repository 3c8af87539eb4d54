import warnings

import pytest
import torch

from reasonedit.models.attention import PackedAttention, Span, TokenLayout, resolve_backend

MIXED = [Span(0, 5, False), Span(0, 7, True), Span(0, 3, False), Span(1, 10, True),
         Span(2, 6, False), Span(2, 4, True), Span(2, 2, False)]


def qkv(n, heads=2, dim=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g).to(device) for _ in range(3)]


def reference(layout, q, k, v):
    """Attention document by document with an explicit mask: what the packed row must equal."""
    out = torch.zeros_like(q)
    allowed = torch.zeros(len(layout), len(layout), dtype=torch.bool)
    for i in range(len(layout)):
        for j in range(len(layout)):
            same = layout.doc[i] == layout.doc[j]
            allowed[i, j] = bool(same and (j <= i or (layout.span[i] == layout.span[j] and layout.full[i])))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    return out, allowed


def test_dense_mask_is_the_rule_written_out():
    layout = TokenLayout.from_spans(MIXED)
    _, allowed = reference(layout, *qkv(len(layout)))
    assert torch.equal(layout.dense(), allowed)


def test_sdpa_backend_equals_the_reference():
    layout = TokenLayout.from_spans(MIXED)
    q, k, v = qkv(len(layout))
    want, _ = reference(layout, q, k, v)
    assert torch.allclose(PackedAttention(layout, "sdpa")(q, k, v), want, atol=1e-6)


def test_flex_forward_equals_dense_sdpa_on_cpu():
    layout = TokenLayout.from_spans(MIXED)
    q, k, v = qkv(len(layout), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        flex = PackedAttention(layout, "flex", compile_flex=False)(q, k, v)
    dense = PackedAttention(layout, "sdpa")(q, k, v)
    assert (flex - dense).abs().max() <= 1e-5


def test_documents_do_not_see_each_other():
    layout = TokenLayout.from_spans([Span(0, 6, True), Span(1, 9, False)])
    q, k, v = qkv(len(layout))
    packed = PackedAttention(layout, "sdpa")(q, k, v)
    alone0 = PackedAttention(TokenLayout.from_spans([Span(0, 6, True)]), "sdpa")(q[:, :, :6], k[:, :, :6], v[:, :, :6])
    alone1 = PackedAttention(TokenLayout.from_spans([Span(0, 9, False)]), "sdpa")(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:])
    assert torch.allclose(packed, torch.cat([alone0, alone1], 2), atol=1e-6)


def test_padding_rows_stay_finite_and_are_invisible():
    layout = TokenLayout.from_spans([Span(0, 5, True)]).padded(8)
    assert len(layout) == 8 and layout.doc[-1] == -1
    q, k, v = qkv(8)
    out = PackedAttention(layout, "sdpa")(q, k, v)
    assert torch.isfinite(out).all()
    real = PackedAttention(TokenLayout.from_spans([Span(0, 5, True)]), "sdpa")(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    assert torch.allclose(out[:, :, :5], real, atol=1e-6)


def test_plain_document_masks_and_cu_seqlens():
    full = TokenLayout.from_spans([Span(0, 4, True), Span(1, 3, True)])
    causal = TokenLayout.from_spans([Span(0, 4, False), Span(1, 3, False), Span(1, 2, False)])
    assert full.is_plain_document_mask() and causal.is_plain_document_mask()
    assert not TokenLayout.from_spans(MIXED).is_plain_document_mask()
    cu, longest = causal.cu_seqlens()
    assert cu.tolist() == [0, 4, 9] and longest == 5


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="backend 'nope'"):
        resolve_backend("nope", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_backend("flash", torch.device("cpu"))


def test_wrong_length_is_refused():
    layout = TokenLayout.from_spans([Span(0, 5, True)])
    with pytest.raises(ValueError, match=r"\(1, H, 5, D\)"):
        PackedAttention(layout, "sdpa")(*qkv(6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs a CUDA device")
def test_compiled_flex_forward_and_backward_match_dense_on_gpu():
    spans = [Span(s.doc + 3 * i, s.length, s.full) for i in range(8) for s in MIXED]  # several 128-blocks
    layout = TokenLayout.from_spans(spans, device="cuda")
    q, k, v = (t.requires_grad_() for t in qkv(len(layout), heads=4, dim=64, device="cuda"))
    flex = PackedAttention(layout, "flex")(q, k, v)
    g = torch.randn_like(flex)
    grads_flex = torch.autograd.grad(flex, (q, k, v), g)
    dense = PackedAttention(layout, "sdpa")(q, k, v)
    grads_dense = torch.autograd.grad(dense, (q, k, v), g)
    assert (flex - dense).abs().max() <= 1e-4
    for a, b in zip(grads_flex, grads_dense):
        assert (a - b).abs().max() <= 1e-4


def test_split_documents_fall_back_to_one_dense_mask():
    # document 0 appears in two separate runs: only the whole-row mask is right
    layout = TokenLayout.from_spans([Span(0, 4, False), Span(1, 3, True), Span(0, 5, True)])
    attn = PackedAttention(layout, "sdpa")
    assert attn.blocks is None
    q, k, v = qkv(len(layout), seed=9)
    want, _ = reference(layout, q, k, v)
    assert torch.allclose(attn(q, k, v), want, atol=1e-6)


def test_per_document_sdpa_with_padding_equals_the_dense_mask():
    layout = TokenLayout.from_spans(MIXED).padded(64)
    q, k, v = qkv(len(layout), seed=5)
    per_doc = PackedAttention(layout, "sdpa")
    assert per_doc.blocks is not None
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense())
    assert (per_doc(q, k, v) - dense).abs().max() <= 1e-6
