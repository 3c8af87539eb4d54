"""The packed vision tower: one attention call per layer over all images, equal to the stock tower."""

import pytest
import torch

from reasonedit.models.attention import Span, TokenLayout
from reasonedit.models.reasoner import VISION_ATTENTION, attention_calls, set_attention
from reasonedit.models.tiny import init_tiny_reasoner

# (t, h, w) in 14-px patches: one whole 112-px window (8 x 8), windows cut at the edges, one image smaller than a
# window, and two frames (one attention segment each in the full-attention layer)
GRIDS = torch.tensor([[1, 8, 8], [1, 12, 20], [1, 6, 4], [1, 18, 10], [2, 4, 6]])
DEPTH = 3  # blocks 0 and 1 windowed, block 2 full attention (tiny_reasoner_config closes the stack with one)


@pytest.fixture(scope="module")
def model():
    model, _ = init_tiny_reasoner(["a red circle left of a blue square"], vocab_size=300, vision_depth=DEPTH)
    return model


def pixels(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator)  # (patches, C * T * P * P)


def tower_forward(model, packed: bool, px: torch.Tensor):
    if packed:
        set_attention(model)
    else:
        model.set_attn_implementation("sdpa")  # transformers' own: sdpa once per window
    return model.model.visual(px, grid_thw=GRIDS)


@torch.no_grad()
def test_packed_tower_equals_the_stock_tower_on_images_of_several_sizes(model):
    px = pixels()
    stock = tower_forward(model, False, px)
    packed = tower_forward(model, True, px)
    assert model.config.vision_config._attn_implementation == VISION_ATTENTION
    for a, b in ((stock.last_hidden_state, packed.last_hidden_state), (stock.pooler_output, packed.pooler_output)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_packed_tower_gradients_equal_the_stock_towers(model):
    # stage 0 fully fine-tunes the tiny reasoner, vision tower included
    weights = torch.randn(int(GRIDS.prod(-1).sum()) // 4, model.config.vision_config.out_hidden_size,
                          generator=torch.Generator().manual_seed(1))
    grads = []
    for packed in (False, True):
        px = pixels().requires_grad_()
        model.zero_grad(set_to_none=True)
        (tower_forward(model, packed, px).pooler_output * weights).sum().backward()
        grads.append([px.grad] + [p.grad for p in model.model.visual.parameters()])
    set_attention(model)
    for stock, packed in zip(*grads):
        torch.testing.assert_close(packed, stock, atol=1e-5, rtol=0)


@torch.no_grad()
def test_one_attention_call_per_layer_instead_of_one_per_window(model):
    set_attention(model, packed_vision=False)  # stock per-window calls, through our registered function
    with attention_calls() as stock:
        model.model.visual(pixels(), grid_thw=GRIDS)
    set_attention(model)
    with attention_calls() as packed:
        model.model.visual(pixels(), grid_thw=GRIDS)
    assert packed == {"vision": DEPTH}
    # 112-px windows are 4 x 4 merged tokens: 1 + 2 * 3 + 1 + 3 * 2 + 2 * 1 = 16 in each of the 2 windowed layers;
    # 4 images and 2 frames in the full-attention layer
    assert stock == {"vision": 2 * 16 + 6}


def test_layout_from_cu_seqlens_is_one_full_span_per_document():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    got = TokenLayout.from_cu_seqlens(cu, 9)
    want = TokenLayout.from_spans([Span(0, 3, True), Span(1, 1, True), Span(2, 5, True)])
    assert torch.equal(got.dense(), want.dense()) and torch.equal(got.doc, want.doc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs a CUDA device")
def test_packed_tower_with_flex_equals_the_stock_tower_on_gpu(model):
    px = pixels().cuda()
    gpu = model.cuda()
    try:
        with torch.no_grad():
            stock = tower_forward(gpu, False, px).pooler_output
            packed = tower_forward(gpu, True, px).pooler_output
    finally:
        model.cpu()
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=0)
