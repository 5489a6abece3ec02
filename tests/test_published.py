"""Published video MAE checkpoints (mae_st, its PySlowFast release form, VideoMAE) loaded into our
models by `models.load_published`, and through `train.py --init / --pretrained`.

Nothing is downloaded: state dicts with the published key names and tensor shapes are made here
at small widths. The strongest checks run an independent functional reference of each published
forward pass, written in this file from reading facebookresearch/mae_st (models_mae.py,
models_vit.py, util/video_vit.py), facebookresearch/SlowFast (models/masked.py) and MCG-NJU/VideoMAE
(modeling_pretrain.py, modeling_finetune.py), directly on the published-format tensors, and
require our encoder (and decoder) to give the same numbers.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import models
import stmeta
import train

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only spin on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# Published-format state dicts at small widths


def _rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _norm(sd, g, name, D):
    sd[f"{name}.weight"] = 1 + _rand(g, D, scale=0.1)
    sd[f"{name}.bias"] = _rand(g, D, scale=0.1)


def _linear(sd, g, name, out, inp, bias=True):
    sd[f"{name}.weight"] = _rand(g, out, inp, scale=inp ** -0.5)
    if bias:
        sd[f"{name}.bias"] = _rand(g, out, scale=0.1)


def mae_st_block(sd, g, pre, D, fused=False, layer_scale=False, videomae=False):
    """A block under `pre`: mae_st's separate q/k/v (video_vit.Attention), or VideoMAE's
    bias-free fused qkv with q_bias / v_bias (and optional layer scales gamma_1/2)."""
    _norm(sd, g, pre + "norm1", D)
    if videomae:
        _linear(sd, g, pre + "attn.qkv", 3 * D, D, bias=False)
        sd[pre + "attn.q_bias"] = _rand(g, D, scale=0.1)
        sd[pre + "attn.v_bias"] = _rand(g, D, scale=0.1)
    else:
        for n in "qkv":
            _linear(sd, g, f"{pre}attn.{n}", D, D)
    _linear(sd, g, pre + "attn.proj", D, D)
    _norm(sd, g, pre + "norm2", D)
    _linear(sd, g, pre + "mlp.fc1", 4 * D, D)
    _linear(sd, g, pre + "mlp.fc2", D, 4 * D)
    if layer_scale:
        sd[pre + "gamma_1"] = 0.5 + _rand(g, D, scale=0.1)
        sd[pre + "gamma_2"] = 0.5 + _rand(g, D, scale=0.1)


def mae_st_state(D=32, depth=2, p=4, t=2, frames=8, img=16, cls=True, sep=True, Dd=16, ddepth=1, t_pred=1,
                 decoder=True, slowfast=False, head=False, seed=0):
    """models_mae.MaskedAutoencoderViT's keys (decoder_*), or MaskMViT's PySlowFast form
    (pred_head.transforms.0.{j}, its final LayerNorm, pred_head.projections.0, decoder_pos_embed
    joint with the class position) when slowfast; models_vit's (+ head) when not decoder."""
    g = torch.Generator().manual_seed(seed)
    gt, hw = frames // t, (img // p) ** 2
    sd = {"patch_embed.proj.weight": _rand(g, D, 3, t, p, p, scale=0.1), "patch_embed.proj.bias": _rand(g, D)}
    if cls:
        sd["cls_token"] = _rand(g, 1, 1, D)
    if sep:
        sd["pos_embed_spatial"], sd["pos_embed_temporal"] = _rand(g, 1, hw, D), _rand(g, 1, gt, D)
        if cls:
            sd["pos_embed_class"] = _rand(g, 1, 1, D)
    else:
        sd["pos_embed"] = _rand(g, 1, int(cls) + gt * hw, D)
    for i in range(depth):
        mae_st_block(sd, g, f"blocks.{i}.", D)
    _norm(sd, g, "norm", D)
    if head:
        _linear(sd, g, "head", 5, D)
    if not decoder:
        return sd
    _linear(sd, g, "decoder_embed", Dd, D)
    sd["mask_token"] = _rand(g, 1, 1, Dd)
    pred = t_pred * p * p * 3
    if slowfast:
        sd["decoder_pos_embed"] = _rand(g, 1, int(cls) + gt * hw, Dd)
        for j in range(ddepth):
            mae_st_block(sd, g, f"pred_head.transforms.0.{j}.", Dd)
        _norm(sd, g, f"pred_head.transforms.0.{ddepth}", Dd)
        _linear(sd, g, "pred_head.projections.0", pred, Dd)
        return sd
    if cls:
        sd["decoder_cls_token"] = _rand(g, 1, 1, Dd)
    if sep:
        sd["decoder_pos_embed_spatial"], sd["decoder_pos_embed_temporal"] = _rand(g, 1, hw, Dd), _rand(g, 1, gt, Dd)
        if cls:
            sd["decoder_pos_embed_class"] = _rand(g, 1, 1, Dd)
    else:
        sd["decoder_pos_embed"] = _rand(g, 1, int(cls) + gt * hw, Dd)
    for j in range(ddepth):
        mae_st_block(sd, g, f"decoder_blocks.{j}.", Dd)
    _norm(sd, g, "decoder_norm", Dd)
    _linear(sd, g, "decoder_pred", pred, Dd)
    return sd


def videomae_state(D=24, depth=2, p=4, t=2, Dd=16, ddepth=1, finetuned=False, layer_scale=False, seed=1):
    """modeling_pretrain.PretrainVisionTransformer's keys (encoder., decoder., encoder_to_decoder,
    mask_token), or modeling_finetune.VisionTransformer's (no prefix, fc_norm, head)."""
    g = torch.Generator().manual_seed(seed)
    enc = "" if finetuned else "encoder."
    sd = {f"{enc}patch_embed.proj.weight": _rand(g, D, 3, t, p, p, scale=0.1),
          f"{enc}patch_embed.proj.bias": _rand(g, D)}
    for i in range(depth):
        mae_st_block(sd, g, f"{enc}blocks.{i}.", D, videomae=True, layer_scale=layer_scale)
    if finetuned:
        _norm(sd, g, "fc_norm", D)  # use_mean_pooling: norm is Identity, fc_norm after the mean
        _linear(sd, g, "head", 7, D)
        return sd
    _norm(sd, g, "encoder.norm", D)
    _linear(sd, g, "encoder_to_decoder", Dd, D, bias=False)
    sd["mask_token"] = _rand(g, 1, 1, Dd)
    for j in range(ddepth):
        mae_st_block(sd, g, f"decoder.blocks.{j}.", Dd, videomae=True)
    _norm(sd, g, "decoder.norm", Dd)
    _linear(sd, g, "decoder.head", t * p * p * 3, Dd)
    return sd


# -----------------------------------------------------------------------------
# Functional references of the published forward passes (read from their code, not ours)


def n_blocks(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def mae_st_attention(x, sd, pre, heads):
    """util/video_vit.Attention: separate q, k, v Linears, scale head_dim ** -0.5."""
    B, N, C = x.shape
    q, k, v = (F.linear(x, sd[f"{pre}{n}.weight"], sd.get(f"{pre}{n}.bias")).reshape(B, N, heads, C // heads)
               .permute(0, 2, 1, 3) for n in "qkv")
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def videomae_attention(x, sd, pre, heads):
    """modeling_finetune.Attention: qkv without bias, then bias cat(q_bias, zeros, v_bias); q scaled first."""
    B, N, C = x.shape
    bias = torch.cat((sd[pre + "q_bias"], torch.zeros_like(sd[pre + "v_bias"]), sd[pre + "v_bias"]))
    qkv = F.linear(x, sd[pre + "qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (qkv.shape[-1] ** -0.5)
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(B, N, -1), sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def ref_block(x, sd, pre, heads, attention):
    """timm-style pre-norm block (both repositories), with VideoMAE's optional layer scale."""
    g1, g2 = sd.get(pre + "gamma_1", 1.0), sd.get(pre + "gamma_2", 1.0)
    x = x + g1 * attention(ln(x, sd, pre + "norm1"), sd, pre + "attn.", heads)
    h = F.gelu(F.linear(ln(x, sd, pre + "norm2"), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + g2 * F.linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def conv_tokens(video, sd, pre=""):
    """Conv3d with kernel = stride = (t, p, p), tokens in (t, h, w) order: (B, L, D)."""
    w = sd[pre + "patch_embed.proj.weight"]
    x = F.conv3d(video, w, sd[pre + "patch_embed.proj.bias"], stride=tuple(w.shape[2:]))  # (N, D, T', H', W')
    return x.flatten(2).transpose(1, 2)


def mae_st_pos(sd, grid, pre="pos_embed", cls=True, sep=True):
    """models_mae's table: spatial.repeat(1, T', 1) + repeat_interleave(temporal, H'W'), class first."""
    if not sep:
        return sd[pre]
    gt, gh, gw = grid
    pos = sd[pre + "_spatial"].repeat(1, gt, 1) + torch.repeat_interleave(sd[pre + "_temporal"], gh * gw, dim=1)
    return torch.cat([sd[pre + "_class"], pos], 1) if cls else pos


def ref_mae_st_encoder(video, sd, heads, cls=True, sep=True, ids_keep=None):
    """models_mae.forward_encoder (ids_keep: the kept tokens, in that order; None: all, in order)."""
    x = conv_tokens(video, sd)
    N, L, D = x.shape
    t, p = sd["patch_embed.proj.weight"].shape[2:4]
    grid = (video.shape[2] // t, video.shape[3] // p, video.shape[4] // p)
    pos = mae_st_pos(sd, grid, cls=cls, sep=sep).expand(N, -1, -1)
    ids = torch.arange(L).expand(N, -1) if ids_keep is None else ids_keep
    n = int(cls)
    index = ids.unsqueeze(-1).repeat(1, 1, D)
    x = torch.gather(x, 1, index) + torch.gather(pos[:, n:], 1, index)
    if cls:
        x = torch.cat([sd["cls_token"].expand(N, -1, -1) + pos[:, :1], x], 1)
    for i in range(n_blocks(sd, "blocks.")):
        x = ref_block(x, sd, f"blocks.{i}.", heads, mae_st_attention)
    return ln(x, sd, "norm")[:, n:]


def ref_mae_st_decoder(latent, sd, ids_restore, grid, heads, cls=True, sep=True):
    """models_mae.forward_decoder: mask tokens appended, unshuffled, decoder cls token, positions,
    blocks, norm, decoder_pred; the cls row dropped."""
    x = F.linear(latent, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    N, _, C = x.shape
    L = ids_restore.shape[1]
    x = torch.cat([x, sd["mask_token"].repeat(N, L - x.shape[1], 1)], 1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
    if cls:
        x = torch.cat([sd["decoder_cls_token"].expand(N, -1, -1), x], 1)
    x = x + mae_st_pos(sd, grid, "decoder_pos_embed", cls, sep)
    for j in range(n_blocks(sd, "decoder_blocks.")):
        x = ref_block(x, sd, f"decoder_blocks.{j}.", heads, mae_st_attention)
    x = F.linear(ln(x, sd, "decoder_norm"), sd["decoder_pred.weight"], sd["decoder_pred.bias"])
    return x[:, int(cls):]


def sinusoid_table(n, d):
    """modeling_finetune.get_sinusoid_encoding_table, as written there (numpy, per position)."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float).unsqueeze(0)


def ref_videomae_encoder(video, sd, heads, mask=None, pre="encoder."):
    """PretrainVisionTransformerEncoder.forward_features: tokens + sin-cos table, visible ones
    (~mask, in grid order), blocks, norm. mask (B, L) bool, True = masked; None: all visible."""
    x = conv_tokens(video, sd, pre)
    B, L, D = x.shape
    x = x + sinusoid_table(L, D)
    if mask is not None:
        x = x[~mask].reshape(B, -1, D)
    for i in range(n_blocks(sd, pre + "blocks.")):
        x = ref_block(x, sd, f"{pre}blocks.{i}.", heads, videomae_attention)
    return x if pre == "" else ln(x, sd, pre + "norm")


def ref_videomae_decoder(x_vis, sd, mask, heads):
    """PretrainVisionTransformer.forward after the encoder: visible tokens + their positions, then
    mask tokens + theirs; decoder blocks; head(norm(...)) on the masked tokens only (grid order)."""
    x_vis = F.linear(x_vis, sd["encoder_to_decoder.weight"])
    B, _, C = x_vis.shape
    pos = sinusoid_table(mask.shape[1], C).expand(B, -1, -1)
    pos_vis, pos_mask = pos[~mask].reshape(B, -1, C), pos[mask].reshape(B, -1, C)
    x = torch.cat([x_vis + pos_vis, sd["mask_token"] + pos_mask], dim=1)
    for j in range(n_blocks(sd, "decoder.blocks.")):
        x = ref_block(x, sd, f"decoder.blocks.{j}.", heads, videomae_attention)
    x = ln(x[:, -pos_mask.shape[1]:], sd, "decoder.norm")
    return F.linear(x, sd["decoder.head.weight"], sd["decoder.head.bias"])


# -----------------------------------------------------------------------------
# Helpers


def load(sd, where="model", **kw):
    cfg, state, report = models.load_published("ckpt.pth", {where: sd}, **kw)
    model = models.VideoMAE(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    return cfg, state, report, model, missing


def video(T, size, seed=3, B=2):
    return torch.randn(B, 3, T, size, size, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# mae_st


@pytest.mark.parametrize("cls,sep", [(True, True), (False, False)])
def test_mae_st_encoder_and_decoder_equal_the_reference(cls, sep):
    """(True, True): main_pretrain.py's defaults (cls_embed, sep_pos_embed); (False, False):
    MaskedAutoencoderViT's constructor defaults, with t = 4 and 16 frames, pred_t_dim 8 (2 frames
    predicted per token)."""
    t, frames, t_pred = (2, 8, 1) if sep else (4, 16, 2)
    sd = mae_st_state(cls=cls, sep=sep, t=t, frames=frames, t_pred=t_pred, ddepth=2)
    if not sep:  # a joint table of 64 positions fits 4x4x4, 16x2x2 and 64x1x1: the size must be given
        with pytest.raises(stmeta.CheckpointError, match=r"fit several token grids.*\(4, 4, 4\).*own img_size"):
            load(sd)
    cfg, state, report, model, missing = load(sd, img_size=16, num_frames=frames)
    assert missing == [] and "missing: none" in report
    enc = cfg.encoder
    assert (enc.width, enc.depth, enc.num_heads, enc.patch_size, enc.tubelet_size) == (32, 2, 16, 4, t)
    assert (enc.img_size, enc.num_frames, enc.cls_token, enc.pos_embed, enc.qkv_bias) == \
        (16, frames, cls, "separable" if sep else "joint", True)
    assert (cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, model.t_pred) == (16, 2, 16, t_pred)
    assert model.pred_frames == frames * t_pred // t and enc.norm_eps == 1e-6

    x = video(frames, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), ref_mae_st_encoder(x, sd, 16, cls, sep), atol=ATOL, rtol=RTOL)
        gt = frames // t
        ids_keep, mask, ids_restore = models.random_masking(2, gt * 16, 0.75, torch.Generator().manual_seed(5))
        latent = model.encoder(x, ids_keep)
        torch.testing.assert_close(latent, ref_mae_st_encoder(x, sd, 16, cls, sep, ids_keep), atol=ATOL, rtol=RTOL)
        ours = model.forward_decoder(latent, ids_restore)
        ref = ref_mae_st_decoder(latent, sd, ids_restore, (gt, 4, 4), 16, cls, sep)
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_guessed_head_counts_warn_and_given_settings_are_used():
    """Head counts and the LayerNorm epsilon are not in a file: a width outside the published
    tables gets the repository's default with a warning; given values are used as given."""
    sd = mae_st_state()
    cfg, _, report, _, _ = load(sd, img_size=16, num_frames=8)
    assert "warning: width 32 is not a published ViT width, so 16 encoder heads is a guess" in report
    assert "decoder heads is a guess" in report and cfg.encoder.norm_eps == 1e-6
    cfg, _, report, model, _ = load(sd, img_size=16, num_frames=8, num_heads=4, decoder_heads=2, norm_eps=1e-5)
    assert "warning" not in report and "LayerNorm eps 1e-05 (as given)" in report
    assert (cfg.encoder.num_heads, cfg.encoder.head_dim, cfg.decoder_heads, cfg.encoder.norm_eps) == (4, 8, 2, 1e-5)
    assert model.encoder.norm.eps == 1e-5


def test_mae_st_tensors_land_where_they_should():
    sd = mae_st_state()
    _, state, report, _, _ = load(sd)
    D = 32
    qkv, bias = state["encoder.blocks.1.attn.qkv.weight"], state["encoder.blocks.1.attn.qkv.bias"]
    for i, n in enumerate("qkv"):  # our q, k, v rows are mae_st's separate Linears, in that order
        assert torch.equal(qkv[i * D:(i + 1) * D], sd[f"blocks.1.attn.{n}.weight"])
        assert torch.equal(bias[i * D:(i + 1) * D], sd[f"blocks.1.attn.{n}.bias"])
    x = video(8, 16)
    conv = F.conv3d(x, sd["patch_embed.proj.weight"], stride=(2, 4, 4)).flatten(2).transpose(1, 2)  # (B, L, D)
    torch.testing.assert_close(models.patchify(x, 2, 4) @ state["encoder.patch_embed.proj.weight"].T, conv,
                               atol=ATOL, rtol=RTOL)
    for key in ("encoder.pos_embed_spatial", "encoder.cls_token", "decoder_pos_embed_class", "decoder_pred.weight",
                "decoder_blocks.0.mlp.fc2.bias", "mask_token"):
        src = key.removeprefix("encoder.")
        assert torch.equal(state[key], sd[src]), key
    assert "encoder.blocks.{i}.attn.qkv.weight <- blocks.{i}.attn.q.weight + blocks.{i}.attn.k.weight" in report
    assert "(i = 0-1)" in report and "mae_st MAE pretraining (models_mae.py)" in report


def test_pyslowfast_release_form():
    """The released mae_pretrain_vit_*_k400.pth: 'model_state', the decoder as MaskMViT's pred_head,
    a joint decoder table (with the class position) next to a separable encoder one."""
    sd = mae_st_state(slowfast=True, ddepth=2, Dd=128)
    cfg, state, report, model, missing = load(sd, where="model_state")
    assert "PySlowFast form" in report and "under 'model_state'" in report
    assert missing == ["decoder_cls_token"] and "carries the encoder's own cls output" in report
    assert cfg.decoder_heads == 2  # MSSeparateHead: num_heads = dim_out // 64
    assert cfg.encoder.pos_embed == "joint" and "summed into one joint table" in report
    for j in range(2):
        for i, n in enumerate("qkv"):
            assert torch.equal(state[f"decoder_blocks.{j}.attn.qkv.weight"][i * 128:(i + 1) * 128],
                               sd[f"pred_head.transforms.0.{j}.attn.{n}.weight"])
    assert torch.equal(state["decoder_norm.weight"], sd["pred_head.transforms.0.2.weight"])
    assert torch.equal(state["decoder_pred.bias"], sd["pred_head.projections.0.bias"])
    assert torch.equal(state["decoder_pos_embed"], sd["decoder_pos_embed"])
    x = video(8, 16)
    with torch.no_grad():  # the separable table folded into a joint one gives the same numbers
        torch.testing.assert_close(model.encoder(x), ref_mae_st_encoder(x, sd, 16), atol=ATOL, rtol=RTOL)


def test_mae_st_finetuned_vit_embeds_as_its_forward():
    """models_vit.VisionTransformer: the blocks, x[:, 1:].mean(1), then norm; the head is ignored."""
    sd = mae_st_state(decoder=False, head=True)
    cfg, state, report, model, missing = load(sd)
    assert "classification head" in report and "head.weight" in report
    assert "decoder_pred.weight" in missing and "a fresh one" in report
    assert cfg.encoder.num_heads == 8  # models_vit's default 12 does not divide 32: the largest count below that does
    x = video(8, 16)
    tokens = conv_tokens(x, sd)
    tokens = torch.cat([sd["cls_token"].expand(2, -1, -1), tokens], 1) + mae_st_pos(sd, (4, 4, 4))
    for i in range(2):
        tokens = ref_block(tokens, sd, f"blocks.{i}.", 8, mae_st_attention)
    ref = ln(tokens[:, 1:, :].mean(dim=1), sd, "norm")
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.embed(x), ref, atol=ATOL, rtol=RTOL)


# -----------------------------------------------------------------------------
# VideoMAE


def test_videomae_encoder_and_decoder_equal_the_reference():
    sd = videomae_state()
    cfg, state, report, model, missing = load(sd, img_size=16, num_frames=8)
    assert missing == [] and "VideoMAE pretraining" in report
    enc = cfg.encoder
    assert (enc.pos_embed, enc.cls_token, cfg.mask_type, cfg.pred_t_dim, enc.num_heads, cfg.decoder_heads) == \
        ("sincos", False, "tube", 0, 12, 8)
    D = 24
    qkv = sd["encoder.blocks.0.attn.qkv.weight"]
    for i in range(3):  # our q, k, v are the slices of VideoMAE's fused qkv
        assert torch.equal(state["encoder.blocks.0.attn.qkv.weight"][i * D:(i + 1) * D], qkv[i * D:(i + 1) * D])
    bias = state["encoder.blocks.0.attn.qkv.bias"]
    assert torch.equal(bias[:D], sd["encoder.blocks.0.attn.q_bias"])
    assert torch.equal(bias[2 * D:], sd["encoder.blocks.0.attn.v_bias"])
    assert torch.equal(bias[D:2 * D], torch.zeros(D))  # no k bias
    assert torch.equal(state["decoder_embed.bias"], torch.zeros(16)) and "encoder_to_decoder has no bias" in report
    assert torch.equal(state["decoder_pred.weight"], sd["decoder.head.weight"])

    x = video(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), ref_videomae_encoder(x, sd, 12), atol=ATOL, rtol=RTOL)
        ids_keep, mask, ids_restore = models.tube_masking(2, 4, 16, 0.75, torch.Generator().manual_seed(2))
        latent = model.encoder(x, ids_keep)
        pred = model.forward_decoder(latent, ids_restore)  # (B, L, P), every token
        masked = mask.bool()
        ref = ref_videomae_decoder(ref_videomae_encoder(x, sd, 12, masked), sd, masked, 8)  # masked tokens only
    torch.testing.assert_close(pred[masked].reshape(ref.shape), ref, atol=ATOL, rtol=RTOL)


def test_decoder_pixel_order_is_ours_in_both_families():
    """decoder_pred's rows load unchanged because both targets lay a patch out as ours does:
    VideoMAE's rearrange 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c' flattened (p c),
    mae_st's patchify einsum 'nctuhpwq->nthwupqc'; and un-patchifying a prediction is exact."""
    B, C, T, H, W, t, p = 2, 3, 4, 8, 8, 2, 4
    x = video(T, H)
    v = x.reshape(B, C, T // t, t, H // p, p, W // p, p)  # b c t p0 h p1 w p2
    videomae = v.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, t * p * p, C).reshape(B, -1, t * p * p * C)
    mae_st = torch.einsum("nctuhpwq->nthwupqc", v).reshape(B, -1, t * p * p * C)
    ours = models.patchify(x, t, p)
    assert torch.equal(ours, videomae) and torch.equal(ours, mae_st)
    assert torch.equal(models.unpatchify(mae_st, t, p, C, T, H, W), x)


def test_videomae_finetuned_with_layer_scale_embeds_as_its_forward_features():
    """modeling_finetune.VisionTransformer with init_values > 0 (gamma_1, gamma_2, folded into
    attn.proj and mlp.fc2), under DeepSpeed's 'module' key: our embed = fc_norm(mean of tokens)."""
    sd = videomae_state(finetuned=True, layer_scale=True)
    cfg, state, report, model, missing = load(sd, where="module", img_size=16, num_frames=8)
    assert "VideoMAE fine-tuned" in report and "under 'module'" in report
    assert "ignored 2 (a classification head, not part of an MAE): head.weight, head.bias" in report
    assert "times layer scale blocks.{i}.gamma_1" in report and "fc_norm -> encoder.norm" in report
    assert "decoder_blocks.* (48 tensors)" in report
    assert not any(k.startswith("encoder.") for k in missing) and "decoder_pred.weight" in missing
    x = video(8, 16)
    with torch.no_grad():
        ref = ln(ref_videomae_encoder(x, sd, 12, pre="").mean(1), sd, "fc_norm")
        torch.testing.assert_close(model.encoder.embed(x), ref, atol=ATOL, rtol=RTOL)


# -----------------------------------------------------------------------------
# Position tables resized to the run's clips


def test_resizing_a_grid_to_its_own_size_is_the_identity():
    table = torch.randn(1, 4 * 14 * 14, 8)
    assert models.resize_grid_table(table, (4, 14, 14), (4, 14, 14)) is not None
    assert torch.equal(models.resize_grid_table(table, (4, 14, 14), (4, 14, 14)), table)
    assert torch.equal(models.resize_spatial(table[:, :196], (14, 14), (14, 14)), table[:, :196])
    assert torch.equal(models.resize_temporal(table[:, :4], 4), table[:, :4])
    sd = mae_st_state()
    _, same, report, _, _ = load(sd, img_size=16, num_frames=8)  # the checkpoint's own size
    assert "resized" not in report
    assert torch.equal(same["encoder.pos_embed_spatial"], sd["pos_embed_spatial"])


def test_resizing_follows_mae_st_interpolate_pos_embed():
    """Spatial: mae_st's interpolate_pos_embed (reshape to the grid, bicubic, align_corners=False);
    temporal: linear. A constant table stays constant."""
    spatial = torch.randn(1, 196, 8)
    ref = F.interpolate(spatial.reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(models.resize_spatial(spatial, (14, 14), (4, 4)), ref)
    const = torch.full((1, 8 * 196, 3), 0.7)
    torch.testing.assert_close(models.resize_grid_table(const, (8, 14, 14), (4, 4, 4)), torch.full((1, 64, 3), 0.7))


def test_224_checkpoint_runs_at_64_pixels():
    """A ViT at the released size (patch 16, 16 frames of 224 px, 14x14 grid) loaded for 64 px
    clips of 8 frames: the tables go 14x14 -> 4x4 and 8 -> 4, and a forward pass runs."""
    sd = mae_st_state(D=32, depth=1, p=16, t=2, frames=16, img=224, Dd=16)
    cfg, state, report, model, missing = load(sd, img_size=64, num_frames=8)
    assert missing == []
    assert "pos_embed_spatial 14x14 -> 4x4 (bicubic)" in report and "pos_embed_temporal 8 -> 4 (linear)" in report
    assert "8x14x14 (16 frames of 224 px) -> ours 4x4x4 (8 frames of 64 px)" in report
    assert state["encoder.pos_embed_spatial"].shape == (1, 16, 32) and cfg.pred_t_dim == 4
    loss, pred, mask = model(video(8, 64), mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and pred.shape == (2, 64, 16 * 16 * 3)
    videomae = videomae_state(p=16)  # the sin-cos table is rebuilt for the new grid
    cfg, _, report, model, _ = load(videomae, img_size=64, num_frames=8)
    assert "rebuilt for our grid" in report and "8x14x14 (16 frames of 224 px, assumed" in report
    assert torch.equal(model.encoder.pos_embed, models.sincos_videomae(64, 24))
    assert model(video(8, 64), mask_ratio=0.75)[1].shape == (2, 64, 2 * 16 * 16 * 3)


# -----------------------------------------------------------------------------
# Errors that name the file, the key and the shapes


def test_truncated_foreign_and_inconsistent_files_get_clear_errors(tmp_path):
    path = str(tmp_path / "mae.pth")
    torch.save({"model": mae_st_state()}, path)
    blob = open(path, "rb").read()
    cut = str(tmp_path / "cut.pth")
    open(cut, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(stmeta.CheckpointError, match="cut.pth: not a readable PyTorch checkpoint"):
        stmeta.load_checkpoint(cut)
    foreign = {"model": {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}}
    with pytest.raises(stmeta.CheckpointError, match=r"x.pth: not a video MAE checkpoint .* 2 tensors, e.g. conv1"):
        models.load_published("x.pth", foreign)
    with pytest.raises(stmeta.CheckpointError, match="no tensors"):
        models.load_published("x.pth", {"epoch": 3})
    ours = models.VideoMAE(stmeta.mae_tiny()).state_dict()
    with pytest.raises(stmeta.CheckpointError, match="one of our own VideoMAE state dicts"):
        models.load_published("x.pth", {"model": ours})
    with pytest.raises(stmeta.CheckpointError, match=r"tubelets of 2 frames.*multiple of 2"):
        models.load_published("x.pth", {"model": mae_st_state()}, img_size=16, num_frames=7)
    with pytest.raises(stmeta.CheckpointError, match=r"4-px patches.*multiple of 4"):
        models.load_published("x.pth", {"model": mae_st_state()}, img_size=18, num_frames=8)
    odd = mae_st_state()
    odd["blocks.0.attn.rel_pos_h"] = torch.zeros(7, 8)
    with pytest.raises(stmeta.CheckpointError, match="blocks.0.attn.rel_pos_h: a block parameter"):
        models.load_published("x.pth", {"model": odd})
    bad = mae_st_state()
    bad["decoder_pos_embed_temporal"] = torch.zeros(1, 3, 16)
    with pytest.raises(stmeta.CheckpointError, match=r"'decoder_pos_embed_temporal': \(1, 3, 16\).* grid \(3, 4, 4\)"
                                                     r" \(t, h, w\), the encoder's for \(4, 4, 4\)"):
        models.load_published("x.pth", {"model": bad})
    bad = mae_st_state()
    bad["decoder_embed.weight"] = torch.zeros(16, 30)  # the file disagrees with itself: named key, both shapes
    with pytest.raises(stmeta.CheckpointError, match=r"decoder_embed.weight -> decoder_embed.weight: shape \(16, 30\) "
                                                     r"in the file, \(16, 32\) in our model"):
        models.load_published("x.pth", {"model": bad})
    with pytest.raises(stmeta.CheckpointError, match="decoder_pred predicts 40 numbers"):
        models.load_published("x.pth", {"model": {**mae_st_state(), "decoder_pred.weight": torch.zeros(40, 16)}})


# -----------------------------------------------------------------------------
# Through train.py


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "cache")
    data.build_synthetic(out, n_classes=10, clips_per_class=4, frames=8, size=16, seed=0, workers=1, verbose=False)
    return out


def test_train_stage1_init_from_released_form_then_stage2(tmp_path, tiny_cache, capsys):
    """`train.py --stage 1 --init FILE --preset tiny`: the tiny preset's 16 px, 4-frame clips;
    the published file's 32 px, 8-frame tables are resized; explicit head counts are kept; and
    the stage-1 run feeds stage 2 (--pretrained, our own checkpoint into a later stage)."""
    path = str(tmp_path / "mae_pretrain_vit_tiny_k400.pth")
    torch.save({"model_state": mae_st_state(img=32, slowfast=True), "epoch": 1}, path)
    common = ["--preset", "tiny", "--device", "cpu", "--data", tiny_cache, "--log-every", "1"]
    s1 = str(tmp_path / "s1")
    res = train.main(["--stage", "1", "--init", path, "--out", s1, "--num_heads=4", "--decoder_heads=2", *common])
    out = capsys.readouterr().out
    assert "PySlowFast form" in out and "encoder.pos_embed_spatial 8x8 -> 4x4 (bicubic)" in out
    assert "4 head(s) (as given" in out and "missing 1 (left at their initial values): decoder_cls_token" in out
    ck = stmeta.load_checkpoint(os.path.join(s1, "last.pt"))
    enc = ck["config"]["model"]["encoder"]
    assert (enc["img_size"], enc["num_frames"], enc["patch_size"], enc["width"], enc["num_heads"]) == (16, 4, 4, 32, 4)
    assert ck["config"]["model"]["decoder_heads"] == 2 and ck["config"]["model"]["mask_ratio"] == 0.75
    assert math.isfinite(res["start_val_loss"]) and math.isfinite(res["val_loss"])
    s2 = str(tmp_path / "s2")
    res2 = train.main(["--stage", "2", "--pretrained", os.path.join(s1, "last.pt"), "--out", s2, *common])
    assert 0 <= res2["val_acc"] <= 1
    assert stmeta.load_checkpoint(os.path.join(s2, "last.pt"))["config"]["model"]["encoder"]["width"] == 32


def test_train_refuses_a_foreign_file_with_its_name(tmp_path, tiny_cache):
    path = str(tmp_path / "resnet.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3, 3, 3)}}, path)
    with pytest.raises(SystemExit, match="resnet.pth: not a video MAE checkpoint"):
        train.main(["--stage", "1", "--init", path, "--preset", "tiny", "--device", "cpu", "--data", tiny_cache,
                    "--out", str(tmp_path / "x")])
