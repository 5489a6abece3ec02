"""Tests for models.py: shapes, gradients (float64 gradcheck), fast path = written-out path,
hand-computed memory tables, masking invariants, parameter counts, and two learning smoke
tests (the MAE overfits a batch; the MANN beats chance on tiny few-shot episodes).
CPU only, tiny configs: `python -m pytest tests/test_models.py -q --durations=10`."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck

import models
import stmeta
from models import (
    MANN, Attention, Backbone, MetaLearner, Block, Classifier, LRUAWriteHead, LSTMController, MANNState, NTMWriteHead,
    POOLS, PatchEmbed, ReadHead, ShiftedPatchTokenizer, VideoMAE, VideoViT, attention_reference, build_backbone,
    circular_shift, content_addressing, conv3d_to_linear_weight, cosine_similarity, count_parameters,
    gather_tokens, interpolate, least_used, lrua_usage, lrua_write, memory_read, ntm_write, param_groups,
    patchify, random_masking, separable_pos_embed, set_fast_attention, set_fast_paths, sharpen, shift_stack,
    sincos_3d, sincos_videomae, spt_shifts, tube_masking, tubelet_tokens, unpatchify,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waiting made the learning tests 10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(**kw) -> stmeta.ViTConfig:
    return dataclasses.replace(stmeta.mae_tiny().encoder, **kw)


def tiny_mae(enc: dict | None = None, **kw) -> stmeta.MAEConfig:
    cfg = stmeta.mae_tiny()
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **(enc or {})), **kw)


def video(B=2, cfg=None, seed=0) -> torch.Tensor:
    cfg = cfg or tiny_vit()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def head(*values) -> torch.Tensor:
    """One batch element, one head: (B=1, nh=1, n), float64."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, -1)


def per_head(value) -> torch.Tensor:
    """A per-head scalar (beta, gate, gamma, alpha): (B=1, nh=1)."""
    return torch.tensor([[value]], dtype=torch.float64)


def batch(*rows) -> torch.Tensor:
    """Rows stacked into one batch element: (B=1, len(rows), n); one row gives (1, 1, n)."""
    return torch.tensor(rows, dtype=torch.float64)[None]


def assert_forms_agree(module: nn.Module, run, inputs: list[torch.Tensor], tol: float = 1e-10) -> None:
    """run() with `module`'s paper forms (set_fast_paths False) and its fast forms (True), in
    float64: the same output, and the same gradients of a random projection of it for `inputs`
    and every parameter. Leaves the module fast, as it is built."""
    results = []
    for fast in (False, True):
        set_fast_paths(module, fast)
        out = run()
        weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * weights).sum(), inputs + list(module.parameters()), allow_unused=True)
        results.append((out, grads))
    set_fast_paths(module, True)
    (paper, paper_grads), (fast, fast_grads) = results
    assert torch.allclose(fast, paper, rtol=tol, atol=tol)
    names = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, fast_grads, paper_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=tol, atol=tol), name


def perturb(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Move every parameter off its initial value (unit norms, zero biases, equal temperatures,
    a zero temporal_fc), so that a fold of one into another is really tested."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


# -----------------------------------------------------------------------------
# patchify, masking


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 3, 4, 8, 12)
    tok = patchify(x, 2, 4)
    assert tok.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    # token (ti, hi, wi) = 1 * 6 + 1 * 3 + 2, its numbers in (t, row, col, C) order
    expect = x[:, :, 2:4, 4:8, 8:12].permute(0, 2, 3, 4, 1).reshape(2, -1)
    assert torch.equal(tok[:, 6 + 3 + 2], expect)
    assert torch.equal(unpatchify(tok, 2, 4, 3, 4, 8, 12), x)
    with pytest.raises(ValueError, match="tubelets"):
        patchify(torch.randn(1, 3, 3, 8, 8), 2, 4)


def test_random_masking_invariants():
    B, L, ratio = 3, 50, 0.9
    ids_keep, mask, ids_restore = random_masking(B, L, ratio, torch.Generator().manual_seed(0))
    keep = int(L * (1 - ratio))
    assert ids_keep.shape == (B, keep) and mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert torch.all(mask.sum(1) == L - keep)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    # ids_restore undoes the shuffle: it is the inverse permutation of one that starts with ids_keep
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :keep], ids_keep)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(B, -1))
    _assert_decoder_unshuffle(ids_keep, mask, ids_restore)
    # the same generator seed gives the same mask
    again = random_masking(B, L, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_keep)
    with pytest.raises(ValueError, match="keeps no token"):
        random_masking(1, 4, 0.9)


def test_tube_masking_invariants():
    B, gt, hw, ratio = 3, 4, 16, 0.75
    ids_keep, mask, ids_restore = tube_masking(B, gt, hw, ratio, torch.Generator().manual_seed(1))
    k = hw - int(ratio * hw)
    assert ids_keep.shape == (B, gt * k) and torch.all(mask.sum(1) == gt * (hw - k))
    m = mask.view(B, gt, hw)
    assert torch.equal(m, m[:, :1].expand_as(m)), "tube masks must be identical across time"
    grid = ids_keep.view(B, gt, k)
    assert torch.equal(grid // hw, torch.arange(gt).view(1, gt, 1).expand(B, gt, k))
    assert torch.equal(grid % hw, (grid % hw)[:, :1].expand_as(grid)), "same positions in every slice"
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    _assert_decoder_unshuffle(ids_keep, mask, ids_restore)


def _assert_decoder_unshuffle(ids_keep, mask, ids_restore):
    """As the MAE decoder does: [kept tokens, then mask tokens] in ids_restore order puts each
    kept token back at its own position and a mask token at every masked one."""
    B, L = mask.shape
    x = torch.arange(L).float().expand(B, -1)[..., None]
    seq = torch.cat([gather_tokens(x, ids_keep), torch.full((B, L - ids_keep.shape[1], 1), -1.0)], dim=1)
    back = gather_tokens(seq, ids_restore)[..., 0]
    assert torch.equal(back == -1, mask.bool())
    assert torch.equal(back[~mask.bool()], x[..., 0][~mask.bool()])


# -----------------------------------------------------------------------------
# tokenizers


def test_patch_embed_equals_conv3d():
    conv = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    emb = PatchEmbed(3, 2, 4, 8)
    emb.proj.weight.data = conv3d_to_linear_weight(conv.weight.data)
    emb.proj.bias.data = conv.bias.data.clone()
    x = torch.randn(2, 3, 4, 8, 8)
    ref = conv(x).flatten(2).transpose(1, 2)  # (B, L, D), tokens in (t, h, w) order
    assert torch.allclose(emb(x), ref, atol=1e-5)
    assert isinstance(VideoViT(tiny_vit(spt=False)).patch_embed, PatchEmbed)


def _lee_shift(frames: torch.Tensor, mode: str, p: int) -> torch.Tensor:
    """The three published shift codes, per frame (B, C, H, W), written independently."""
    s = p // 2
    if mode == "cardinal_1":  # lucidrains/vit-pytorch
        pads = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))
        return torch.cat([frames] + [F.pad(frames, pad) for pad in pads], dim=1)
    x = F.pad(frames, (s, s, s, s))
    if mode == "diagonal_half":  # aanna0701/SPT_LSA_ViT PatchShifting
        parts = [x[:, :, :-2 * s, :-2 * s], x[:, :, :-2 * s, 2 * s:], x[:, :, 2 * s:, :-2 * s], x[:, :, 2 * s:, 2 * s:]]
    else:  # the same file's cardinal variant
        parts = [x[:, :, s:-s, :-2 * s], x[:, :, s:-s, 2 * s:], x[:, :, :-2 * s, s:-s], x[:, :, 2 * s:, s:-s]]
    return torch.cat([frames] + parts, dim=1)


@pytest.mark.parametrize("mode", ["diagonal_half", "cardinal_half", "cardinal_1"])
def test_shift_stack_matches_published_shifts(mode):
    x = torch.randn(2, 3, 2, 8, 8)
    ours = shift_stack(x, spt_shifts(mode, 4))  # (B, 5C, T, H, W)
    for ti in range(2):
        assert torch.equal(ours[:, :, ti], _lee_shift(x[:, :, ti], mode, 4))


def test_spt_shapes_and_gradcheck():
    tok = ShiftedPatchTokenizer(2, 1, 2, 3).double()
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert tok(x).shape == (1, 2 * 2 * 2, 3)
    assert tok.norm.normalized_shape == (1 * 2 * 2 * 2 * 5,)
    ids = torch.tensor([[0, 5, 7]])
    assert torch.allclose(tok(x, ids), tok(x)[:, [0, 5, 7]])
    assert gradcheck(lambda v: tok(v), (x,))


@pytest.mark.parametrize("mode", ["diagonal_half", "cardinal_1"])
@pytest.mark.parametrize("masked", [False, True])
def test_tubelet_tokens_equal_patchify_of_shift_stack(mode, masked):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 8, 12, generator=g)  # 2 x 2 x 3 tokens of tubelet 2, patch 4
    ids = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(3)]) if masked else None
    for shifts in ([], spt_shifts(mode, 4)):
        ref = gather_tokens(patchify(shift_stack(x, shifts) if shifts else x, 2, 4), ids)
        assert torch.equal(tubelet_tokens(x, 2, 4, shifts, ids), ref)


def test_spt_folded_norm_equals_norm_then_projection():
    """The tokenizer folds the norm's affine into the projection: same outputs, same gradients."""
    torch.manual_seed(0)
    tok = ShiftedPatchTokenizer(3, 2, 4, 16).double()
    nn.init.normal_(tok.norm.weight)
    nn.init.normal_(tok.norm.bias)
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    ids = torch.tensor([[0, 3, 5], [7, 1, 2]])
    for keep in (None, ids):
        written_out = tok.proj(tok.norm(gather_tokens(patchify(shift_stack(x, tok.shifts), 2, 4), keep)))
        grads = torch.autograd.grad(written_out.square().sum(), list(tok.parameters()))
        fast = tok(x, keep)
        assert torch.allclose(fast, written_out, atol=1e-10)
        for a, b in zip(torch.autograd.grad(fast.square().sum(), list(tok.parameters())), grads):
            assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("mode", ["diagonal_half", "cardinal_half", "cardinal_1", "linear"])
@pytest.mark.parametrize("masked", [False, True])
def test_tokenizer_paper_form_equals_fast_form(mode, masked):
    """SPT as Lee et al. write it (shift_stack, patchify, LayerNorm, Linear) and its fast form
    (tubelet_tokens, the norm's affine folded into the projection); PatchEmbed's patchify and
    its tubelet_tokens: equal outputs and gradients, input and parameters, in float64."""
    torch.manual_seed(0)
    tok = PatchEmbed(3, 2, 4, 16) if mode == "linear" else ShiftedPatchTokenizer(3, 2, 4, 16, shift=mode)
    perturb(tok.double())
    x = torch.randn(3, 3, 4, 8, 12, dtype=torch.float64, requires_grad=True)  # 2 x 2 x 3 tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(3)]) if masked else None
    assert_forms_agree(tok, lambda: tok(x, ids), [x])


# -----------------------------------------------------------------------------
# positional embeddings


def test_separable_pos_embed():
    vit = VideoViT(tiny_vit(pos_embed="separable"))
    table = vit.pos_embed_table()
    gt, gh, gw = vit.grid
    assert table.shape == (1, gt * gh * gw, 32)
    assert torch.equal(table[0, 1 * gh * gw + 3], vit.pos_embed_spatial[0, 3] + vit.pos_embed_temporal[0, 1])
    assert torch.equal(separable_pos_embed(vit.pos_embed_spatial, vit.pos_embed_temporal), table)
    assert {"pos_embed_spatial", "pos_embed_temporal"} <= set(vit.state_dict())
    cls = VideoViT(tiny_vit(cls_token=True))
    assert cls.pos_embed_table().shape == (1, 1 + gt * gh * gw, 32)
    assert torch.equal(cls.pos_embed_table()[:, 0], cls.pos_embed_class[:, 0])


def test_joint_pos_embed():
    vit = VideoViT(tiny_vit(pos_embed="joint", cls_token=True))
    assert vit.pos_embed.shape == (1, 1 + vit.num_tokens, 32)  # mae_st, sep_pos_embed=False
    assert vit.pos_embed_table() is vit.pos_embed


def test_sincos_pos_embeds():
    L, D = 10, 6
    # VideoMAE's get_sinusoid_encoding_table, written out
    ref = torch.tensor([[pos / 10000 ** (2 * (j // 2) / D) for j in range(D)] for pos in range(L)])
    ref[:, 0::2], ref[:, 1::2] = ref[:, 0::2].sin(), ref[:, 1::2].cos()
    assert torch.allclose(sincos_videomae(L, D)[0], ref, atol=1e-6)
    vit = VideoViT(tiny_vit(pos_embed="sincos"))
    assert "pos_embed" not in vit.state_dict() and torch.allclose(vit.pos_embed, sincos_videomae(vit.num_tokens, 32))
    # 3-D: tokens in the same time slice share the time channels, same row the row channels
    table = sincos_3d(2, 3, 4, 32)[0].view(2, 3, 4, 32)
    dt, ds = 32 - 2 * 10, 10
    assert torch.equal(table[0, :, :, :dt], table[0, :1, :1, :dt].expand(3, 4, dt))
    assert torch.equal(table[:, 1, :, dt:dt + ds], table[:1, 1, :1, dt:dt + ds].expand(2, 4, ds))
    assert not torch.equal(table[0, 0, 0], table[1, 0, 0])
    assert "pos_embed" not in VideoViT(tiny_vit(pos_embed="sincos3d")).state_dict()


# -----------------------------------------------------------------------------
# attention and blocks


@pytest.mark.parametrize("lsa", [False, True])
def test_fast_attention_equals_written_out(lsa):
    torch.manual_seed(0)
    attn = Attention(24, 3, 16, qkv_bias=True, lsa=lsa)  # inner width 48 != 24, like the authors' decoder
    if lsa:
        attn.temperature.data = torch.tensor([0.1, 0.5, 2.0])
    x = torch.randn(2, 7, 24)
    fast = attn(x)
    attn.fast = False
    assert torch.allclose(fast, attn(x), atol=1e-5)


@pytest.mark.parametrize("lsa", [False, True])
def test_fast_attention_parameter_gradients_equal_written_out(lsa):
    """The fast path folds LSA's temperature into the q rows of the projection: the
    temperature, weight and bias gradients must still be the written-out ones."""
    torch.manual_seed(0)
    attn = Attention(24, 3, 16, qkv_bias=True, lsa=lsa).double()
    if lsa:
        attn.temperature.data = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    grads = {}
    for fast in (True, False):
        attn.fast = fast
        attn(x).square().sum().backward()
        grads[fast] = {n: p.grad.clone() for n, p in attn.named_parameters()}
        attn.zero_grad()
    for name in grads[True]:
        assert torch.allclose(grads[True][name], grads[False][name], atol=1e-10), name


def test_lsa_masks_the_diagonal():
    L = 5
    q, k = torch.randn(1, 2, L, 4), torch.randn(1, 2, L, 4)
    v = torch.eye(L).expand(1, 2, L, L)  # the output is then the attention matrix itself
    attn = attention_reference(q, k, v, torch.tensor([0.3, 1.0]), mask_diagonal=True)
    assert torch.all(attn.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 2, L))
    # a single token: nothing else to attend to, so it keeps itself (as Lee et al.'s code)
    one = attention_reference(q[:, :, :1], k[:, :, :1], v[:, :, :1, :1], 1.0, mask_diagonal=True)
    assert torch.equal(one, torch.ones(1, 2, 1, 1))
    lsa = Attention(8, 2, 4, lsa=True)
    assert torch.allclose(lsa.temperature, torch.full((2,), 0.5))  # 1 / sqrt(head size)


def test_attention_gradcheck():
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda *a: attention_reference(*a, mask_diagonal=True), (q, k, v, scale))
    attn = Attention(6, 2, 3, lsa=True).double()
    x = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    for fast in (True, False):
        attn.fast = fast
        assert gradcheck(attn, (x,))


@pytest.mark.parametrize("lsa", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("L", [1, 2, 7])
def test_attention_written_out_form_equals_fast_form(lsa, qkv_bias, L):
    """logits = q k^T * temperature with the diagonal masked, softmax, times v (forward) and the
    fused kernel with the temperature folded into q's weight rows and q/k/v unbound in another
    order (forward_fast): equal outputs and gradients in float64, a lone token included."""
    torch.manual_seed(0)
    attn = perturb(Attention(24, 3, 16, qkv_bias=qkv_bias, lsa=lsa).double())
    x = torch.randn(2, L, 24, dtype=torch.float64, requires_grad=True)
    assert_forms_agree(attn, lambda: attn(x), [x])


def test_the_paper_forms_run_no_fast_piece(monkeypatch):
    """set_fast_paths(model, False) reaches every tokenizer and attention: with the fused kernel
    and tubelet_tokens out of reach the model still runs."""
    def unreachable(*args, **kwargs):
        raise AssertionError("a fast path ran in the paper form")

    def flags(mae):
        return [m.fast for m in mae.modules() if isinstance(m, (Attention, PatchEmbed, ShiftedPatchTokenizer))]
    for kw in (dict(), dict(spt=False)):
        mae = VideoMAE(tiny_mae(kw))
        set_fast_paths(mae, False)
        with monkeypatch.context() as patch:
            patch.setattr(models, "tubelet_tokens", unreachable)
            patch.setattr(models.F, "scaled_dot_product_attention", unreachable)
            mae(video())[0].backward()
        assert len(flags(mae)) == 2 + 1 + 1 and not any(flags(mae))  # 2 encoder blocks, 1 decoder block, tokenizer
        set_fast_attention(mae, True)  # the old name switches the same paths
        assert all(flags(mae))


def test_divided_equals_joint_with_one_time_slice():
    torch.manual_seed(0)
    cfg = tiny_vit(num_frames=2, tubelet_size=2)  # one token time slice
    joint = VideoViT(cfg)
    divided = VideoViT(dataclasses.replace(cfg, attention="divided"))
    missing, unexpected = divided.load_state_dict(joint.state_dict(), strict=False)
    assert not unexpected and all("temporal" in k for k in missing)
    x = video(cfg=cfg)
    assert torch.allclose(joint(x), divided(x), atol=1e-5)  # temporal_fc starts at zero


def test_divided_block_is_time_then_space():
    torch.manual_seed(0)
    blk = Block(8, 2, 4, lsa=True, divided=True).eval()
    nn.init.normal_(blk.temporal_fc.weight)
    B, gt, k = 2, 3, 4
    x = torch.randn(B, gt * k, 8)
    # reference: a loop over spatial positions, then over time slices
    grid = x.view(B, gt, k, 8).clone()
    for s in range(k):
        seq = grid[:, :, s]
        grid[:, :, s] = seq + blk.temporal_fc(blk.temporal_attn(blk.temporal_norm1(seq)))
    for ti in range(gt):
        seq = grid[:, ti]
        grid[:, ti] = seq + blk.attn(blk.norm1(seq))
    y = grid.view(B, gt * k, 8)
    y = y + blk.mlp(blk.norm2(y))
    assert torch.allclose(blk(x, gt), y, atol=1e-5)


def test_block_drop_path_and_dropout_only_in_training():
    blk = Block(8, 2, 4, drop_path=0.5, dropout=0.5)
    x = torch.randn(64, 3, 8)
    blk.eval()
    assert torch.equal(blk(x), blk(x))
    blk.train()
    torch.manual_seed(0)
    dropped = (blk(x) == x).all(-1).all(-1)  # whole samples pass unchanged when both branches drop
    assert 0 < dropped.sum() < 64


# -----------------------------------------------------------------------------
# encoder, MAE, classifier


@pytest.mark.parametrize("kw", [dict(), dict(spt=False, lsa=False), dict(cls_token=True, pos_embed="joint"),
                                dict(attention="divided"), dict(spt_shift="cardinal_1")])
def test_video_vit_shapes(kw):
    cfg = tiny_vit(**kw)
    vit = VideoViT(cfg)
    x = video(cfg=cfg)
    assert vit.grid == (2, 4, 4) and vit.num_tokens == 32
    assert vit(x).shape == (2, 32, 32)
    assert vit.embed(x).shape == (2, 32)
    ids_keep = tube_masking(2, 2, 16, 0.75)[0]
    assert vit(x, ids_keep).shape == (2, 8, 32)
    with pytest.raises(ValueError, match="takes videos"):
        vit(torch.randn(2, 3, 4, 8, 8))


def test_vit_rejects_bad_settings():
    with pytest.raises(ValueError, match="cls token"):
        VideoViT(tiny_vit(attention="divided", cls_token=True))
    with pytest.raises(ValueError, match="tube masking"):
        VideoMAE(tiny_mae(enc=dict(attention="divided"), mask_type="random"))
    with pytest.raises(ValueError, match="pos_embed"):
        VideoViT(tiny_vit(pos_embed="learned"))
    with pytest.raises(ValueError, match="spt_shift"):
        VideoViT(tiny_vit(spt_shift="diagonal_1"))


def test_fast_and_written_out_attention_give_the_same_mae():
    mae = VideoMAE(tiny_mae()).eval()
    x = video()
    fast = mae(x, generator=torch.Generator().manual_seed(0))[1]
    set_fast_attention(mae, False)
    slow = mae(x, generator=torch.Generator().manual_seed(0))[1]
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("tokens", ["diagonal_half", "cardinal_half", "cardinal_1", "linear"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lsa", [False, True])
@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_mae_paper_forms_equal_fast_forms(tokens, masked, lsa, attention):
    """The whole MAE (encoder on the kept tokens, decoder on all) with every tokenizer and
    attention in its paper form and in its fast form: equal predictions and gradients, float64."""
    torch.manual_seed(0)
    enc = dict(spt=tokens != "linear", spt_shift="diagonal_half" if tokens == "linear" else tokens, lsa=lsa,
               attention=attention, qkv_bias=True)
    mae = perturb(VideoMAE(tiny_mae(enc, mask_type="tube" if attention == "divided" else "random")).double())
    x = video().double().requires_grad_()
    ratio = 0.75 if masked else 0.0
    assert_forms_agree(mae, lambda: mae(x, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))[1], [x])


@pytest.mark.parametrize("enc,kw", [(dict(), dict()), (dict(attention="divided"), dict(mask_type="tube")),
                                    (dict(cls_token=True, pos_embed="joint"), dict(norm_pix_loss=False)),
                                    (dict(pos_embed="sincos"), dict(pred_t_dim=2))])
def test_video_mae_shapes(enc, kw):
    mae = VideoMAE(tiny_mae(enc, **kw))
    x = video()
    loss, pred, mask = mae(x)
    t_pred = 1 if kw.get("pred_t_dim") else 2
    assert loss.ndim == 0 and pred.shape == (2, 32, t_pred * 4 * 4 * 3) and mask.shape == (2, 32)
    assert torch.all(mask.sum(1) == 24)
    T = 2 if kw.get("pred_t_dim") else 4
    recon, mask_video = mae.reconstruct(x)
    assert recon.shape == (2, 3, T, 16, 16) and mask_video.shape == (2, 1, T, 16, 16)
    assert mae.per_frame_loss(x).shape == (2, T)


def test_mae_loss_is_on_masked_normalised_patches():
    mae = VideoMAE(tiny_mae())
    x = video()
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(3))
    target = patchify(x, 2, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_token = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_token[mask.bool()].mean(), atol=1e-6)
    # mask ratio 0: the plain autoencoder, loss over every token
    loss0, pred0, mask0 = mae(x, mask_ratio=0.0)
    assert mask0.sum() == 0 and torch.isfinite(loss0)


def test_mae_pred_t_dim_target_frames():
    mae = VideoMAE(tiny_mae(pred_t_dim=2, norm_pix_loss=False))
    x = video()
    target, _, _ = mae.target(x)
    assert torch.equal(target, patchify(x[:, :, [0, 3]], 1, 4))  # mae_st: linspace(0, T-1, 2) frames


def test_diff_target_adds_each_tokens_frame_differences():
    """diff_target (MotionMAE): the target is the pixels then frame t minus frame t-1 (0 for the
    first frame), each half normalised per patch; pictures use the pixel half, and per_frame_loss
    still averages to the loss."""
    raw = VideoMAE(tiny_mae(diff_target=True, norm_pix_loss=False))
    x = video()
    target, _, _ = raw.target(x)
    diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
    assert torch.equal(target, torch.cat([patchify(x, 2, 4), patchify(diff, 2, 4)], dim=-1))
    mae = VideoMAE(tiny_mae(diff_target=True, enc=dict(tubelet_size=1)))
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(5))
    assert pred.shape == (2, 64, 2 * 4 * 4 * 3)
    target, _, _ = mae.target(x)
    halves = target.view(2, 64, 2, -1)
    assert torch.allclose(halves.mean(-1)[:, 16:], torch.zeros(2, 48, 2), atol=1e-5)  # each half normalised (frame 0: no diff)
    assert torch.allclose(halves.var(-1)[:, 16:], torch.ones(2, 48, 2), atol=1e-3)
    per_frame = mae.per_frame_loss(x, generator=torch.Generator().manual_seed(5))
    _, mask_video = mae.reconstruct(x, generator=torch.Generator().manual_seed(5))
    weight = mask_video.sum((1, 3, 4))
    assert torch.allclose((per_frame * weight).sum() / weight.sum(), loss, atol=1e-5)
    mae.forward_decoder = lambda latent, ids_restore: target  # a perfect decoder: pictures are the input
    recon, _ = mae.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.allclose(recon, x, atol=1e-4)


def test_reconstruct_denormalises_each_patch_with_its_own_statistics():
    mae = VideoMAE(tiny_mae())
    x = video()
    target, _, _ = mae.target(x)
    mae.forward_decoder = lambda latent, ids_restore: target  # a perfect decoder
    recon, mask_video = mae.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(recon, x, atol=1e-4)
    assert torch.all(mae.per_frame_loss(x) < 1e-10)
    assert torch.allclose(mask_video.mean((1, 2, 3, 4)), torch.full((2,), 0.75))


def test_per_frame_loss_averages_to_the_loss():
    mae = VideoMAE(tiny_mae(enc=dict(tubelet_size=1)))  # 4 time slices of one frame each
    x = video()
    loss = mae(x, generator=torch.Generator().manual_seed(5))[0]
    per_frame = mae.per_frame_loss(x, generator=torch.Generator().manual_seed(5))
    _, mask_video = mae.reconstruct(x, generator=torch.Generator().manual_seed(5))
    weight = mask_video.sum((1, 3, 4))  # masked pixels per frame
    assert torch.allclose((per_frame * weight).sum() / weight.sum(), loss, atol=1e-5)


def test_mae_overfits_one_batch():
    torch.manual_seed(0)
    # decoder width 64: the tiny preset's 16-wide decoder can only produce a 17-dim subspace
    # of the 96-number patches, too few to memorise 48 random masked patches
    mae = VideoMAE(tiny_mae(decoder_width=64))
    x = video(B=2)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = mae(x, generator=torch.Generator().manual_seed(0))[0]  # the same mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_classifier_shapes_and_features():
    cfg = tiny_vit()
    clf = Classifier(cfg, 26, dropout=0.5).eval()
    x = video(cfg=cfg)
    assert clf(x).shape == (2, 26)
    feats = clf.encoder.norm(clf.encoder.forward_features(x).mean(1))  # mae_st: mean pool, then norm
    assert torch.allclose(clf(x), clf.head(feats), atol=1e-6)


def _assert_all_grads(model, loss):
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("enc,kw", [(dict(), dict()), (dict(cls_token=True, pos_embed="joint"), dict()),
                                    (dict(attention="divided", num_frames=8), dict(mask_type="tube"))])
def test_every_mae_parameter_gets_a_gradient(enc, kw):
    # (divided with 8 frames: with only 2 time slices, LSA leaves each token one other to
    # attend to, and the temporal temperature rightly gets no gradient)
    torch.manual_seed(0)
    cfg = tiny_mae(enc, **kw)
    mae = VideoMAE(cfg)
    for m in mae.modules():  # temporal_fc starts at zero, which would block the temporal branch
        if isinstance(m, Block) and m.divided:
            nn.init.normal_(m.temporal_fc.weight, std=0.1)
    _assert_all_grads(mae, mae(video(cfg=cfg.encoder))[0])


def test_every_classifier_parameter_gets_a_gradient():
    clf = Classifier(tiny_vit(cls_token=True), 4)
    _assert_all_grads(clf, clf(video()).logsumexp(-1).sum())


# -----------------------------------------------------------------------------
# parameter counts and groups


def test_paper_parameter_count():
    mae = VideoMAE(stmeta.mae_paper_count())
    layers = lambda m: count_parameters(m, layers_only=True)  # noqa: E731
    assert layers(mae.encoder.patch_embed) == 9_408
    assert all(layers(b) == 296_448 for b in mae.encoder.blocks) and len(mae.encoder.blocks) == 9
    assert layers(mae.encoder.norm) == 384
    assert layers(mae.decoder_embed) == 18_528
    assert all(layers(b) == 135_936 for b in mae.decoder_blocks) and len(mae.decoder_blocks) == 3
    assert layers(mae.decoder_norm) == 192 and layers(mae.decoder_pred) == 4_656
    assert layers(mae) == 3_109_008  # the paper's section 4.1 count


def test_preset_parameter_counts():
    assert count_parameters(VideoMAE(stmeta.mae_paper()), layers_only=True) == 3_505_020
    assert count_parameters(Classifier(stmeta.mae_paper().encoder, 26), layers_only=True) == 3_046_214
    assert count_parameters(Classifier(stmeta.mae_paper_count().encoder, 26), layers_only=True) == 2_682_842
    assert count_parameters(VideoMAE(stmeta.mae_cpu()), layers_only=True) == 878_296
    assert count_parameters(VideoMAE(stmeta.mae_tiny()), layers_only=True) == 37_686


def test_param_groups_layer_decay_and_no_decay():
    clf = Classifier(tiny_vit(cls_token=True), 5)
    groups = param_groups(clf, weight_decay=0.05, layer_decay=0.5)
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len(list(clf.parameters())) == len({id(p) for p in seen})
    by_param = {id(p): g for g in groups for p in g["params"]}
    depth = len(clf.encoder.blocks)  # 2: ids 0 (embeddings), 1, 2 (blocks), 3 (the rest)
    assert by_param[id(clf.encoder.patch_embed.proj.weight)]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_param[id(clf.encoder.blocks[1].mlp.fc1.weight)]["lr_scale"] == 0.5 ** 1
    assert by_param[id(clf.head.weight)]["lr_scale"] == 1.0
    assert by_param[id(clf.head.weight)]["weight_decay"] == 0.05
    for p in (clf.head.bias, clf.encoder.norm.weight, clf.encoder.cls_token, clf.encoder.pos_embed_spatial,
              clf.encoder.blocks[0].attn.temperature):
        assert by_param[id(p)]["weight_decay"] == 0.0


# -----------------------------------------------------------------------------
# MANN: pure addressing functions, hand-computed tables


def test_lstm_controller_equals_torch_lstm_cell_and_gradcheck():
    torch.manual_seed(0)
    ours = LSTMController(5, 4)
    assert torch.all(ours.ih.bias[4:8] == 1.0)  # forget gate
    ref = nn.LSTMCell(5, 4)
    with torch.no_grad():  # torch's gate order is ours: i, f, g, o
        ref.weight_ih.copy_(ours.ih.weight)
        ref.weight_hh.copy_(ours.hh.weight)
        ref.bias_ih.copy_(ours.ih.bias)
        ref.bias_hh.zero_()
    x, h, c = torch.randn(3, 5), torch.randn(3, 4), torch.randn(3, 4)
    for a, b in zip(ours(x, h, c), ref(x, (h, c))):
        assert torch.allclose(a, b, atol=1e-6)
    ours = ours.double()
    args = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, dtype=torch.float64, requires_grad=True))
    assert gradcheck(ours, args)


def test_content_addressing_table_and_gradcheck():
    memory = torch.eye(4, dtype=torch.float64)[None]  # (1, N=4, M=4)
    key = head(1, 1, 0, 0)  # cosine with the rows: 1/sqrt2, 1/sqrt2, 0, 0
    assert torch.allclose(cosine_similarity(key, memory), head(1, 1, 0, 0) / math.sqrt(2))
    beta = per_head(math.sqrt(2) * math.log(2))  # logits ln2, ln2, 0, 0 -> weights 2:2:1:1
    assert torch.allclose(content_addressing(key, memory, beta), head(1 / 3, 1 / 3, 1 / 6, 1 / 6))
    w = content_addressing(head(1, 0, 0, 0), memory, per_head(100.0))
    assert torch.allclose(w, head(1, 0, 0, 0), atol=1e-6)
    # a zero memory row reads as similarity 0 and stays differentiable
    zero = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    w0 = content_addressing(key, zero, per_head(1.0))
    w0.sum().backward()
    assert torch.allclose(w0, torch.full_like(w0, 1 / 3)) and torch.isfinite(zero.grad).all()
    args = (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 3, dtype=torch.float64, requires_grad=True))
    assert gradcheck(content_addressing, args)


def test_circular_shift_table_and_gradcheck():
    w = head(1, 0, 0, 0)
    assert torch.equal(circular_shift(w, head(0, 0, 1)), head(0, 1, 0, 0))  # shift +1
    assert torch.equal(circular_shift(w, head(1, 0, 0)), head(0, 0, 0, 1))  # -1 wraps around
    assert torch.equal(circular_shift(w, head(0, 1, 0)), w)
    blurred = circular_shift(head(0, 1, 0, 0), head(0.25, 0.5, 0.25))
    assert torch.equal(blurred, head(0.25, 0.5, 0.25, 0))
    args = (torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True))
    assert gradcheck(circular_shift, args)


def test_sharpen_and_interpolate_tables_and_gradcheck():
    out = sharpen(head(0.5, 0.25, 0.25), per_head(2.0))  # squares 0.25, 0.0625, 0.0625
    assert torch.allclose(out, head(2 / 3, 1 / 6, 1 / 6))
    mixed = interpolate(head(1, 0, 0), head(0, 0, 1), per_head(0.25))
    assert torch.allclose(mixed, head(0.25, 0, 0.75))
    args = (torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True) + 0.1,
            1 + torch.rand(2, 3, dtype=torch.float64, requires_grad=True))
    assert gradcheck(sharpen, args)


def test_ntm_memory_write_read_table():
    """A sequence of writes and reads on a 4 x 4 memory, each checked by hand (as pytorch-ntm's tests)."""
    memory = torch.zeros(1, 4, 4, dtype=torch.float64)
    steps = [  # w, erase, add, expected read at w after the write
        ([1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]),
        ([0, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]),
        ([1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]),  # keep column 0, overwrite the rest
        ([0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0]),  # no erase: add on top
        ([0, 0, 0, 1], [0, 0, 0, 0.5], [0, 0, 0, 0.2], [0, 0, 0, 0.2]),
        ([0, 0, 0, 1], [0, 0, 0, 0.5], [0, 0, 0, 0.2], [0, 0, 0, 0.3]),  # 0.2 * (1 - 0.5) + 0.2
        ([0.5, 0.5, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0.25, 0.5, 0.5, 0.25]),  # half erased, read half each
    ]
    for w, e, a, expected in steps:
        w = head(*w)
        memory = ntm_write(memory, w, head(*e), head(*a))
        assert torch.allclose(memory_read(w, memory), head(*expected)), (w, expected)
    # two heads erase multiplicatively and add additively
    two = ntm_write(torch.ones(1, 2, 2, dtype=torch.float64), batch([1, 0], [1, 0]), batch([0.5, 0], [0.5, 0]),
                    batch([1, 0], [0, 2]))
    assert torch.allclose(two, batch([1.25, 3], [1, 1]))


def test_ntm_write_and_head_gradcheck():
    args = (torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 2, 4, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 2, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True))
    assert gradcheck(ntm_write, args)
    head = NTMWriteHead(6, 2, 3).double()
    h = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w_prev = torch.softmax(torch.randn(2, 2, 5, dtype=torch.float64), -1).requires_grad_()
    assert gradcheck(head, (h, memory, w_prev))
    new_memory, w = head(h, memory, w_prev)
    assert new_memory.shape == (2, 5, 3) and torch.allclose(w.sum(-1), torch.ones(2, 2, dtype=torch.float64))


def test_lrua_tables():
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3]], dtype=torch.float64)  # (B=1, N=4)
    assert torch.equal(least_used(usage, 2), head(0, 1, 0, 1)[0])
    assert torch.equal(least_used(torch.zeros(1, 4), 2), torch.tensor([[1.0, 1, 0, 0]]))  # ties: lower index
    memory = batch([1, 1], [3, 3], [5, 5], [0, 1])
    # two heads, alpha 0 (sigmoid 0.5), last read slots 0 and 2; w^lu marks the 2 least used (1, 3):
    # w^w = 0.5 * w^r_prev + 0.5 * [0, 1, 0, 1]; slot 1, the least used, is cleared before writing
    read_prev = batch([1, 0, 0, 0], [0, 0, 1, 0])
    new, w_w = lrua_write(memory, usage, read_prev, torch.zeros(1, 2, dtype=torch.float64), batch([2, 0], [0, 2]))
    assert torch.equal(w_w, batch([0.5, 0.5, 0, 0.5], [0, 0.5, 0.5, 0.5]))
    # slot 0: [1, 1] + 0.5 [2, 0]; slot 1: 0 + 0.5 [2, 0] + 0.5 [0, 2]; slot 2: [5, 5] + 0.5 [0, 2]; slot 3: [0, 1] + [1, 1]
    assert torch.equal(new, batch([2, 1], [1, 1], [5, 6], [1, 2]))
    # usage: 0.95 [0.5, 0.1, 0.9, 0.3] + reads [1, 0, 1, 0] + writes [0.5, 1, 0.5, 1]
    w_r = batch([0, 0, 1, 0], [1, 0, 0, 0])
    assert torch.allclose(lrua_usage(usage, w_r, w_w, 0.95), head(1.975, 1.095, 2.355, 1.285)[0])


def test_lrua_write_gradcheck():
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]], dtype=torch.float64).expand(2, -1)  # no ties
    args = (torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True),
            torch.rand(2, 2, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True))
    assert gradcheck(lambda m, w, a, k: lrua_write(m, usage, w, a, k), args)


def test_read_head_and_lrua_head_shapes():
    h, memory = torch.randn(3, 10), torch.randn(3, 7, 4)
    read = ReadHead(10, 2, 4)
    key, beta = read.key(h)
    assert key.shape == (3, 2, 4) and beta.shape == (3, 2) and torch.all(beta > 0)
    w, r = read(memory, key, beta)
    assert w.shape == (3, 2, 7) and r.shape == (3, 2, 4)
    new, w_w = LRUAWriteHead(10, 2)(h, key, memory, torch.rand(3, 7), w)
    assert new.shape == (3, 7, 4) and w_w.shape == (3, 2, 7)


# -----------------------------------------------------------------------------
# MANN


def small_mann(write="lrua", input_dim=16, n_way=3) -> MANN:
    cfg = stmeta.MANNConfig(controller_size=32, n_slots=16, slot_dim=16, read_heads=2, write=write)
    return MANN(cfg, input_dim, n_way)


@pytest.mark.parametrize("write", ["lrua", "ntm"])
def test_mann_shapes_state_and_continuation(write):
    torch.manual_seed(0)
    mann = small_mann(write)
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    mann = mann.double()
    labels = torch.tensor([[0, 1, 2, -1, -1, -1]]).expand(4, -1)
    state = mann.initial_state(x)
    assert isinstance(state, MANNState) and state.memory.shape == (4, 16, 16)
    assert all(s.dtype == torch.float64 and s.device == x.device for s in state)
    assert not state.memory.any() and not state.usage.any() and not state.h.any()
    assert torch.all(state.read_weights[..., 0] == 1) and torch.all(state.read_weights.sum(-1) == 1)
    logits, final = mann(x, labels)
    assert logits.shape == (4, 6, 3) and final.reads.shape == (4, 2, 16) and final.usage.shape == (4, 16)
    first, mid = mann(x[:, :3], labels[:, :3])
    second, _ = mann(x[:, 3:], labels[:, 3:], mid)  # the state carries the episode on
    assert torch.allclose(torch.cat([first, second], 1), logits)
    with pytest.raises(ValueError, match="labels"):
        mann(x, labels + 3)


def test_mann_input_projection_and_label_encoding():
    cfg = stmeta.MANNConfig(controller_size=8, n_slots=4, slot_dim=3, read_heads=1, input_proj=5)
    mann = MANN(cfg, 20, 2)
    assert mann.controller.ih.in_features + mann.controller.hh.in_features == 5 + 2 + 3 + 8
    x = torch.randn(1, 2, 20)
    shown, _ = mann(x, torch.tensor([[1, -1]]))
    hidden, _ = mann(x, torch.tensor([[-1, -1]]))
    assert not torch.allclose(shown[:, 0], hidden[:, 0])  # the label enters the first step


def reference_mann_forward(mann: MANN, x, label_in):
    """The MANN as Santoro's equations run it, one step at a time: the controller's whole input
    [x_t, y_t] projected inside the loop, the output layer applied at every step."""
    state = mann.initial_state(x)
    y = F.one_hot(label_in.clamp_min(0), mann.n_way).to(x.dtype) * (label_in >= 0)[..., None]
    logits = []
    for t in range(x.shape[1]):
        state = mann.step(mann.controller.ih(torch.cat([mann.input_proj(x[:, t]), y[:, t]], -1)), state)
        logits.append(mann.out(torch.cat([state.h, state.reads.flatten(1)], -1)))
    return torch.stack(logits, 1)


@pytest.mark.parametrize("kw", [dict(), dict(write="ntm"), dict(write_content="key", read_order="before_write"),
                                dict(key_strength=5.0), dict(read_heads=0)])
def test_mann_forward_equals_the_step_by_step_equations(kw):
    """forward hoists the input projection and the output layer out of the time loop: same
    logits and gradients as the step-by-step form, in every variant."""
    torch.manual_seed(0)
    cfg = stmeta.MANNConfig(**{**dict(controller_size=12, n_slots=6, slot_dim=5, read_heads=2), **kw})
    mann = MANN(cfg, 7, 3).double()
    x = torch.randn(2, 9, 7, dtype=torch.float64)
    label_in = torch.tensor([[-1, 0, 1, 2, 0, 1, 2, 0, 1]] * 2)
    fast, _ = mann(x, label_in)
    ref = reference_mann_forward(mann, x, label_in)
    assert torch.allclose(fast, ref, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), list(mann.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(mann.parameters()))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_fast, g_ref))


def test_mann_variants():
    """read_heads=0 is a plain LSTM (no memory parameters); the key strength and the write
    content are the configured ones; bad names are refused."""
    lstm = MANN(stmeta.MANNConfig(controller_size=8, read_heads=0), 6, 3)
    assert not hasattr(lstm, "read_head") and lstm.out.in_features == 8
    logits, state = lstm(torch.randn(2, 4, 6), torch.tensor([[-1, 0, 1, 2]] * 2))
    assert logits.shape == (2, 4, 3) and not state.memory.any()  # the memory is never touched
    sharp = MANN(stmeta.MANNConfig(controller_size=8, n_slots=5, slot_dim=4, read_heads=2, key_strength=10.0), 6, 3)
    _, beta = sharp.read_head.key(torch.zeros(3, 8))
    assert torch.allclose(beta, torch.full((3, 2), 10.0))
    plain = MANN(stmeta.MANNConfig(controller_size=8, n_slots=5, slot_dim=4, read_heads=2, key_strength=0.0), 6, 3)
    key, beta = plain.read_head.key(torch.randn(3, 8))
    assert torch.equal(beta, torch.ones(3, 2)) and key.shape == (3, 2, 4)  # Santoro: softmax of the cosine
    assert plain.write_head.fc.out_features == 2 * (1 + 4)  # alpha + add vector per head
    keyed = MANN(stmeta.MANNConfig(controller_size=8, n_slots=5, slot_dim=4, read_heads=2, write_content="key"), 6, 3)
    assert keyed.write_head.fc.out_features == 2  # alpha only: the key is written
    for bad in (dict(write_content="both"), dict(read_order="never"), dict(write="dnc"), dict(read_heads=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            MANN(stmeta.MANNConfig(**bad), 6, 3)


@pytest.mark.parametrize("write", ["lrua", "ntm"])
def test_every_mann_parameter_gets_a_gradient(write):
    torch.manual_seed(0)
    mann = small_mann(write)
    logits, _ = mann(torch.randn(2, 5, 16), torch.tensor([[0, 1, 2, -1, -1]] * 2))
    _assert_all_grads(mann, logits.logsumexp(-1).sum())


def few_shot_episodes(B, n_way=3, queries=2, dim=16, noise=0.3, generator=None):
    """Support/query episodes over random class vectors: one labelled example per class,
    then n_way * queries noisy queries in random order with their labels hidden."""
    proto = torch.randn(B, n_way, dim, generator=generator)  # new classes every episode
    support = torch.arange(n_way).expand(B, -1)
    query = torch.stack([torch.randperm(n_way * queries, generator=generator) % n_way for _ in range(B)])
    y = torch.cat([support, query], 1)
    x = torch.gather(proto, 1, y[..., None].expand(-1, -1, dim))
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x, torch.cat([support, torch.full_like(query, -1)], 1), y


@pytest.mark.parametrize("write", ["lrua", "ntm"])
def test_mann_learns_a_tiny_few_shot_task(write):
    torch.manual_seed(0)
    mann = small_mann(write)
    opt = torch.optim.Adam(mann.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x, labels, y = few_shot_episodes(32, generator=g)
        logits, _ = mann(x, labels)
        loss = F.cross_entropy(logits[:, 3:].reshape(-1, 3), y[:, 3:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, labels, y = few_shot_episodes(300, generator=torch.Generator().manual_seed(1))
        acc = (mann(x, labels)[0][:, 3:].argmax(-1) == y[:, 3:]).float().mean().item()
    assert acc > 0.7, f"query accuracy {acc:.2f} (chance 0.33)"


# -----------------------------------------------------------------------------
# stage-3 backbones


def test_backbones():
    cfg = tiny_vit()
    x = video(cfg=cfg)
    for kind in ("mae", "scratch"):
        bb = build_backbone(kind, cfg)
        assert isinstance(bb, Backbone) and bb.out_dim == 32 and bb(x).shape == (2, 32)
        assert isinstance(bb.vit, VideoViT)
    pix = build_backbone("pixels", cfg, pixels_size=2)
    assert pix.out_dim == 3 * 4 * 2 * 2 and pix(x).shape == (2, pix.out_dim)
    assert torch.allclose(pix(x).view(2, 3, 4, 2, 2)[:, :, :, 0, 0], x[:, :, :, :8, :8].mean((-1, -2)), atol=1e-6)
    assert count_parameters(pix) == 0
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("resnet", cfg)


def test_backbone_pools():
    """Every pool of VideoViT.embed: its length, and what it averages (tokens are (t, h, w), time first)."""
    cfg = tiny_vit()
    x = video(cfg=cfg)
    vit = VideoViT(cfg).eval()
    t, h, w = vit.grid
    with torch.no_grad():
        tokens = vit.forward_features(x).view(2, t, h * w, cfg.width)
        mean = vit.embed(x)
        assert torch.allclose(mean, vit.norm(tokens.mean((1, 2))), atol=1e-5)
        assert torch.allclose(vit.embed(x, "mean"), mean)
        space, when, every = vit.embed(x, "space"), vit.embed(x, "time"), vit.embed(x, "tokens")
    assert space.shape == (2, h * w * cfg.width) and when.shape == (2, t * cfg.width)
    assert every.shape == (2, t * h * w * cfg.width)
    assert torch.allclose(space.view(2, h * w, -1)[:, 3], vit.norm(tokens[:, :, 3].mean(1)), atol=1e-5)
    assert torch.allclose(when.view(2, t, -1)[:, 1], vit.norm(tokens[:, 1].mean(1)), atol=1e-5)
    assert torch.allclose(every.view(2, t, h * w, -1), vit.norm(tokens), atol=1e-5)
    for pool in POOLS:
        bb = build_backbone("mae", cfg, pool=pool)
        assert bb.out_dim == bb.vit.embed_dim(pool) == bb(x).shape[1]
    assert build_backbone("pixels", cfg, pixels_size=2, pool="space").out_dim == 3 * 4 * 2 * 2  # pixels ignore it
    with pytest.raises(ValueError, match="pool 'cls'"):
        build_backbone("mae", cfg, pool="cls")
    with pytest.raises(ValueError, match="pool 'max'"):
        vit.embed(x, "max")


def test_meta_learner():
    cfg = tiny_vit()
    bb = build_backbone("scratch", cfg)
    mann = small_mann(input_dim=bb.out_dim)
    model = MetaLearner(bb, mann)
    x = video(B=6, cfg=cfg)
    z = model.backbone(x).view(2, 3, -1)  # two episodes of three clips
    labels = torch.tensor([[0, 1, -1], [2, -1, -1]])
    logits, state = model(z, labels)
    assert logits.shape == (2, 3, 3) and isinstance(state, MANNState)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "input_mean", "norm", "mann"}
    # centring: the MANN reads x - input_mean; a state dict from before it existed loads as zero
    with torch.no_grad():
        model.input_mean.normal_()
    shifted = model(z + model.input_mean, labels)[0]
    old = {k: v for k, v in model.state_dict().items() if k != "input_mean"}
    model.load_state_dict(old)
    assert not model.input_mean.any()
    torch.testing.assert_close(model(z, labels)[0], shifted)


def test_meta_learner_input_dropout_only_in_training():
    """input_dropout drops features of what the MANN reads in training (a new draw at each
    call); in eval mode the model is the same function as one without dropout."""
    cfg = tiny_vit()
    torch.manual_seed(0)
    plain = MetaLearner(build_backbone("scratch", cfg), small_mann(input_dim=build_backbone("scratch", cfg).out_dim))
    dropped = MetaLearner(build_backbone("scratch", cfg), small_mann(input_dim=plain.backbone.out_dim), input_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())  # dropout has no weights: the same state dict
    z = torch.randn(2, 3, plain.backbone.out_dim)
    labels = torch.tensor([[0, 1, -1], [2, -1, -1]])
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(z, labels)[0], plain(z, labels)[0])
    dropped.train()
    a, b = dropped(z, labels)[0], dropped(z, labels)[0]
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(z, labels)[0])
    with pytest.raises(ValueError, match="dropout probability"):
        MetaLearner(plain.backbone, plain.mann, input_dropout=1.5)
