"""models.py: everything in stmeta that has parameters.

A video ViT with shifted patch tokenization and locality self-attention, joint or divided
space-time attention; the video masked autoencoder built on it; a classifier; and the
memory-augmented neural network (MANN) that does few-shot classification over clip embeddings.

Papers, with the section each piece follows:
  SPT / LSA      Lee, Lee & Song 2021, "Vision Transformer for Small-Size Datasets", 2112.13492 (sec. 3)
  MAE-ST         Feichtenhofer et al. 2022, "Masked Autoencoders As Spatiotemporal Learners", 2205.09113
  VideoMAE       Tong et al. 2022, "VideoMAE", 2203.12602 (tube masking, fixed sin-cos positions)
  TimeSformer    Bertasius, Wang & Torresani 2021, "Is Space-Time Attention All You Need?", 2102.05095
  NTM            Graves, Wayne & Danihelka 2014, "Neural Turing Machines", 1410.5401 (sec. 3)
  MANN           Santoro et al. 2016, "Meta-Learning with Memory-Augmented Neural Networks", 1605.06065 (sec. 3)

Reference code read next to the papers (nothing copied): facebookresearch/mae_st,
MCG-NJU/VideoMAE, aanna0701/SPT_LSA_ViT, facebookresearch/TimeSformer,
loudinthecloud/pytorch-ntm, snowkylin/ntm.

Where the papers' parts are, in file order (search for the name):
  patchify, random_masking, tube_masking      tubelets and masking (MAE-ST sec. 3; VideoMAE's tubes)
  shift_stack, ShiftedPatchTokenizer          SPT: Lee et al. sec. 3.2, eq. 2 (PatchEmbed: no shifts)
  add_pos_embed, sincos_3d, sincos_videomae   positions: learned separable or joint, fixed sin-cos
  attention_reference, Attention              attention written out; LSA (Lee et al. sec. 3.3)
  Block                                       pre-norm block, joint or divided space-time (TimeSformer sec. 3)
  VideoViT                                    the encoder: tokens + positions, blocks, final norm
  VideoMAE                                    masking, the encoder on visible tokens, decoder, loss
  Classifier, param_groups                    fine-tuning: pooled features and a head; layer-wise lr decay
  content_addressing, ntm_write, lrua_write   MANN memory addressing, pure functions (NTM sec. 3, Santoro sec. 3)
  LSTMController, ReadHead                    the MANN's controller and read head
  LRUAWriteHead, NTMWriteHead, MANN           its two kinds of write head; the network over an episode
  Backbone, MetaLearner                       stage 3: clip embeddings, then the MANN
  load_published (the last section)           not the core: other repositories' checkpoints mapped onto our
                                              VideoMAE; a reader of the papers can skip it

Fast paths: each tokenizer's and attention's `forward` is written as its paper writes it, and
beside it a fast form (`forward_fast`, `tubelet_tokens`) computes the same function of the same
parameters in fewer copies (tested equal, outputs and gradients). Models are built running the
fast forms; `set_fast_paths(model, False)` runs the paper forms instead.

Run: nothing to run here; `python -m pytest tests/test_models.py` checks it.

Shape legend
  B batch            C channels          T frames        H, W pixels
  t, p               tubelet frames, patch pixels (a token covers t x p x p pixels)
  gt, gh, gw         the token grid: T/t, H/p, W/p      hw = gh * gw
  L                  tokens (gt * gh * gw); L' the tokens kept by masking
  P                  numbers in one patch vector (t * p * p * C)
  D                  model width          nh heads        hs head size
  S                  steps of an episode  N x M           memory slots x slot size
  Hc                 controller (LSTM) units            K  classes of an episode (n_way)
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stmeta import CheckpointError, MAEConfig, MANNConfig, ViTConfig

# -----------------------------------------------------------------------------
# Tensor tricks for video tokens (pure functions)


def patchify(video: Tensor, t: int, p: int) -> Tensor:
    """Cut a video into tubelets of t frames x p x p pixels, one flat vector each.

    video (B, C, T, H, W) -> (B, L, t*p*p*C). Tokens in (gt, gh, gw) row-major order;
    inside a patch the numbers run (t, p_row, p_col, C), channel fastest, as mae_st and
    VideoMAE lay out their pixel targets (so their decoder heads load unchanged).
    """
    B, C, T, H, W = video.shape
    if T % t or H % p or W % p:
        raise ValueError(f"video of {T} frames x {H}x{W} pixels does not split into tubelets of "
                         f"{t} frames x {p}x{p} pixels")
    gt, gh, gw = T // t, H // p, W // p
    x = video.reshape(B, C, gt, t, gh, p, gw, p)  # (B, C, gt, t, gh, p, gw, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gt, gh, gw, t, p, p, C)
    return x.reshape(B, gt * gh * gw, t * p * p * C)  # (B, L, P)


def unpatchify(x: Tensor, t: int, p: int, C: int, T: int, H: int, W: int) -> Tensor:
    """The exact inverse of `patchify`: (B, L, t*p*p*C) -> (B, C, T, H, W)."""
    B = x.shape[0]
    gt, gh, gw = T // t, H // p, W // p
    x = x.reshape(B, gt, gh, gw, t, p, p, C)  # (B, gt, gh, gw, t, p, p, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gt, t, gh, p, gw, p)
    return x.reshape(B, C, T, H, W)  # (B, C, T, H, W)


def gather_tokens(x: Tensor, ids: Tensor | None) -> Tensor:
    """Pick tokens by index per sample: x (B, L, D), ids (B, L') -> (B, L', D). None keeps all."""
    if ids is None:
        return x
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, L', D)


def conv3d_to_linear_weight(weight: Tensor) -> Tensor:
    """A Conv3d tubelet kernel (D, C, t, p, p) as the weight of our Linear on patchify's
    vectors (D, t*p*p*C). mae_st and VideoMAE embed patches with such a Conv3d."""
    return weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)  # (D, P)


def _noise(B: int, n: int, generator: torch.Generator | None, device) -> Tensor:
    # Drawn on the generator's own device, so a CPU generator gives the same masks on any device.
    gen_device = generator.device if generator is not None else device
    return torch.rand(B, n, generator=generator, device=gen_device).to(device)


def random_masking(B: int, L: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE, MAE-ST).

    Returns ids_keep (B, L_keep) with L_keep = int(L * (1 - mask_ratio)) (mae_st's rounding);
    mask (B, L) float, 0 is keep, 1 is remove; ids_restore (B, L), which puts the sequence
    [kept tokens, then removed ones] back into grid order (`gather_tokens(x, ids_restore)`).
    """
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no token out of {L}")
    noise = _noise(B, L, generator, device)  # (B, L): small is keep, large is remove
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, L_keep)
    mask = torch.ones(B, L, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in grid order
    return ids_keep, mask, ids_restore


def tube_masking(B: int, t: int, hw: int, mask_ratio: float, generator: torch.Generator | None = None,
                 device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Tube masking (VideoMAE): the same spatial positions are removed in every time slice.

    Tokens are in (gt, hw) order with t = gt slices here. int(mask_ratio * hw) positions per
    slice are removed (VideoMAE's rounding). ids_keep (B, t*k) runs slice by slice with the
    same k spatial positions in the same order in each slice, so it reshapes to (B, t, k):
    what divided attention needs. mask and ids_restore as in `random_masking`.
    """
    keep = hw - int(mask_ratio * hw)
    if keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no position out of {hw} per frame")
    noise = _noise(B, hw, generator, device)  # (B, hw)
    spatial = torch.argsort(noise, dim=1)  # (B, hw) small is keep
    offsets = torch.arange(t, device=device).view(1, t, 1) * hw  # (1, t, 1)
    ids_keep = (offsets + spatial[:, None, :keep]).reshape(B, t * keep)  # (B, t*k)
    ids_remove = (offsets + spatial[:, None, keep:]).reshape(B, t * (hw - keep))  # (B, t*(hw-k))
    ids_shuffle = torch.cat([ids_keep, ids_remove], dim=1)  # (B, L)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    mask = torch.zeros(B, t * hw, device=device).scatter_(1, ids_remove, 1.0)  # (B, L)
    return ids_keep, mask, ids_restore


# -----------------------------------------------------------------------------
# Tokenizers: plain tubelet embedding and shifted patch tokenization (Lee et al. sec. 3.2)


def spt_shifts(mode: str, p: int) -> list[tuple[int, int]]:
    """The four (dy, dx) pixel shifts of SPT. A shift (dy, dx) moves content down by dy and
    right by dx: out[i, j] = frame[i - dy, j - dx].

    "diagonal_half": by p/2 along the diagonals, Lee et al.'s code (order lu, ru, lb, rb);
    "cardinal_half": by p/2 left/right/up/down, the seed paper's authors' default;
    "cardinal_1":    by 1 pixel in the same four directions, lucidrains/vit-pytorch.
    """
    s = p // 2
    if mode == "diagonal_half":
        return [(s, s), (s, -s), (-s, s), (-s, -s)]
    if mode == "cardinal_half":
        return [(0, s), (0, -s), (s, 0), (-s, 0)]
    if mode == "cardinal_1":
        return [(0, 1), (0, -1), (1, 0), (-1, 0)]
    raise ValueError(f"unknown spt_shift {mode!r}; choose diagonal_half, cardinal_half or cardinal_1")


def shift_stack(video: Tensor, shifts: list[tuple[int, int]]) -> Tensor:
    """Each frame followed by its shifted copies (zero-filled), stacked on channels.

    video (B, C, T, H, W) -> (B, (1 + len(shifts)) * C, T, H, W), channel index shift-major,
    the unshifted frame first: Lee et al.'s torch.cat([x, x_lu, x_ru, x_lb, x_rb], dim=1).
    """
    H, W = video.shape[-2:]
    s = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    padded = F.pad(video, (s, s, s, s))  # (B, C, T, H+2s, W+2s): padded[a, b] = video[a-s, b-s]
    views = [video] + [padded[..., s - dy:s - dy + H, s - dx:s - dx + W] for dy, dx in shifts]
    return torch.cat(views, dim=1)  # (B, 5C, T, H, W)


class PatchEmbed(nn.Module):
    """Linear tubelet embedding: patchify, then one Linear. Equal to mae_st's Conv3d with
    kernel = stride = (t, p, p) (see `conv3d_to_linear_weight`)."""

    def __init__(self, in_chans: int, tubelet: int, patch: int, dim: int):
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.proj = nn.Linear(tubelet * patch * patch * in_chans, dim)
        self.fast = True  # `tubelet_tokens`; False: patchify, then drop the masked tokens (set_fast_paths)

    def forward(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """video (B, C, T, H, W) -> (B, L', D); ids_keep (B, L') embeds only those tokens."""
        if not self.fast:
            x = gather_tokens(patchify(video, self.tubelet, self.patch), ids_keep)  # (B, L', P)
        else:  # the same vectors, and only the kept tokens are ever copied
            x = tubelet_tokens(video, self.tubelet, self.patch, [], ids_keep)  # (B, L', P)
        return self.proj(x)  # (B, L', D)


class ShiftedPatchTokenizer(nn.Module):
    """SPT for video (Lee et al. eq. 2 per frame): each frame and four shifted copies on
    channels (5C), cut into tubelets, LayerNorm'ed, projected."""

    def __init__(self, in_chans: int, tubelet: int, patch: int, dim: int, shift: str = "diagonal_half",
                 eps: float = 1e-6):
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.shifts = spt_shifts(shift, patch)
        patch_dim = tubelet * patch * patch * in_chans * (1 + len(self.shifts))
        self.norm = nn.LayerNorm(patch_dim, eps=eps)
        self.proj = nn.Linear(patch_dim, dim)
        self.fast = True  # forward_fast; False: the paper's composition below (set_fast_paths)

    def forward(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """video (B, C, T, H, W) -> (B, L', D); ids_keep (B, L') keeps only those tokens: the
        shifts see the whole frame, the norm and projection only the kept tokens.
        Lee et al. eq. 2: S(x) = LN(P([x, s1, s2, s3, s4])) E, P cutting into patches."""
        if self.fast:
            return self.forward_fast(video, ids_keep)
        x = shift_stack(video, self.shifts)  # (B, 5C, T, H, W): [x, s1, s2, s3, s4] on channels
        x = gather_tokens(patchify(x, self.tubelet, self.patch), ids_keep)  # (B, L', 5P)
        return self.proj(self.norm(x))  # (B, L', D)

    def forward_fast(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """`forward`'s function, the same parameters (tested equal, outputs and gradients) in
        fewer copies and products: the kept tubelets are read straight out of the shifted
        windows (`tubelet_tokens`), and the norm's affine is folded into the projection."""
        x = tubelet_tokens(video, self.tubelet, self.patch, self.shifts, ids_keep)  # (B, L', 5P)
        # proj(norm(x)) = x_hat (W diag(g))^T + (W beta + b). The backward then no longer needs the
        # gradient of the wide (B, L', 5P) normalised tokens (a 5P x D matrix product and a LayerNorm
        # backward per step) to reach g and beta.
        x_hat = F.layer_norm(x, x.shape[-1:], eps=self.norm.eps)  # (B, L', 5P)
        weight = self.proj.weight * self.norm.weight  # (D, 5P)
        bias = self.proj.bias + (self.proj.weight * self.norm.bias).sum(-1)  # (D,), outside autocast's bf16 matmuls
        return F.linear(x_hat, weight, bias)  # (B, L', D)


# -- the tokenizers' fast path (set_fast_paths): patchify's vectors in one copy of the kept tokens


def tubelet_tokens(video: Tensor, t: int, p: int, shifts: list[tuple[int, int]],
                   ids_keep: Tensor | None = None) -> Tensor:
    """gather_tokens(patchify(shift_stack(video, shifts), t, p), ids_keep) in one copy of the kept
    tokens (tested equal). shifts [] is plain `patchify`; ids_keep None keeps every token.

    Each shifted frame is a window of the zero-padded video, and the tubelets of a window are
    a strided view of it; only the kept tokens are read, and the views are stacked straight
    into patchify's layout (t, p, p, (1 + len(shifts)) * C), view-major, channel fastest.
    The written-out composition copies the stacked video twice and drops masked tokens last.
    video (B, C, T, H, W) -> (B, L', t*p*p*(1 + len(shifts))*C).
    """
    B, C, T, H, W = video.shape
    if T % t or H % p or W % p:
        raise ValueError(f"video of {T} frames x {H}x{W} pixels does not split into tubelets of "
                         f"{t} frames x {p}x{p} pixels")
    gt, gh, gw = T // t, H // p, W // p
    s = max([0] + [max(abs(dy), abs(dx)) for dy, dx in shifts])  # the padding the shifts need
    padded = F.pad(video, (s, s, s, s)) if s else video  # (B, C, T, H+2s, W+2s)
    views = []
    for dy, dx in [(0, 0)] + list(shifts):  # out[i, j] = frame[i - dy, j - dx], as shift_stack
        x = padded[..., s - dy:s - dy + H, s - dx:s - dx + W]  # (B, C, T, H, W), a view
        x = x.view(B, C, gt, t, gh, p, gw, p).permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gt, gh, gw, t, p, p, C)
        if ids_keep is not None:  # token l sits at (l // (gh*gw), l // gw % gh, l % gw) of the grid
            rows = torch.arange(B, device=video.device)[:, None]  # (B, 1)
            x = x[rows, ids_keep // (gh * gw), ids_keep // gw % gh, ids_keep % gw]  # (B, L', t, p, p, C)
        views.append(x)
    x = torch.stack(views, dim=-2) if len(views) > 1 else views[0]  # (B, L' | gt, gh, gw, t, p, p, [V,] C)
    return x.reshape(B, -1, t * p * p * C * len(views))  # (B, L', P); copies only a lone unmasked view


# -----------------------------------------------------------------------------
# Positional embeddings


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Transformer sin-cos table: (n,) positions -> (n, dim); first half sin, second half cos
    over frequencies 1 / 10000^(k / (dim/2)) (MAE's get_1d_sincos_pos_embed_from_grid)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None, :]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (n, dim)


def sincos_videomae(L: int, dim: int) -> Tensor:
    """VideoMAE's fixed table (get_sinusoid_encoding_table): one sinusoid over the flat
    token index, sin on even and cos on odd channels. (1, L, dim). It is 1-D: the grid
    structure is left for the network to infer from the flat index."""
    pos = torch.arange(L, dtype=torch.float64)[:, None]  # (L, 1)
    j = torch.arange(dim)
    angles = pos / 10000 ** (2 * torch.div(j, 2, rounding_mode="floor").double() / dim)  # (L, dim)
    table = torch.where(j % 2 == 0, angles.sin(), angles.cos())  # (L, dim)
    return table.float().unsqueeze(0)  # (1, L, dim)


def sincos_3d(gt: int, gh: int, gw: int, dim: int) -> Tensor:
    """A factorised 3-D sin-cos table: channels split between time, rows and columns,
    each a `sincos_1d` of its coordinate. (1, gt*gh*gw, dim) in (gt, gh, gw) order."""
    if dim % 2:
        raise ValueError(f"a 3-D sin-cos embedding needs an even width, got {dim}")
    ds = 2 * (dim // 6)  # even channels for rows and for columns; time takes the rest
    dt = dim - 2 * ds
    tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    table = torch.cat([sincos_1d(tt.flatten(), dt), sincos_1d(hh.flatten(), ds),
                       sincos_1d(ww.flatten(), ds)], dim=1)  # (L, D)
    return table.unsqueeze(0)  # (1, L, D)


def separable_pos_embed(spatial: Tensor, temporal: Tensor) -> Tensor:
    """mae_st's separable embedding: token (ti, si) gets spatial[si] + temporal[ti].
    spatial (1, hw, D), temporal (1, gt, D) -> (1, gt*hw, D)."""
    gt, hw = temporal.shape[1], spatial.shape[1]
    return (temporal[:, :, None, :] + spatial[:, None, :, :]).reshape(1, gt * hw, -1)  # (1, L, D)


POS_EMBEDS = ("separable", "joint", "sincos", "sincos3d")


def add_pos_embed(owner: nn.Module, prefix: str, kind: str, grid: tuple[int, int, int], dim: int,
                  cls: bool) -> None:
    """Register the positional embedding of one kind on `owner`, under mae_st's names:
    separable -> {prefix}_spatial (1, hw, D), {prefix}_temporal (1, gt, D) [, {prefix}_class (1, 1, D)];
    joint     -> {prefix} (1, [1+]L, D), the class position first (mae_st, sep_pos_embed=False);
    sincos / sincos3d -> {prefix} a fixed buffer (1, L, D), not in the state dict (VideoMAE)."""
    gt, gh, gw = grid
    if kind == "separable":
        setattr(owner, f"{prefix}_spatial", nn.Parameter(torch.zeros(1, gh * gw, dim)))
        setattr(owner, f"{prefix}_temporal", nn.Parameter(torch.zeros(1, gt, dim)))
        if cls:
            setattr(owner, f"{prefix}_class", nn.Parameter(torch.zeros(1, 1, dim)))
    elif kind == "joint":
        setattr(owner, prefix, nn.Parameter(torch.zeros(1, int(cls) + gt * gh * gw, dim)))
    elif kind == "sincos":
        owner.register_buffer(prefix, sincos_videomae(gt * gh * gw, dim), persistent=False)
    elif kind == "sincos3d":
        owner.register_buffer(prefix, sincos_3d(gt, gh, gw, dim), persistent=False)
    else:
        raise ValueError(f"unknown pos_embed {kind!r}; choose one of {', '.join(POS_EMBEDS)}")


def pos_embed_table(owner: nn.Module, prefix: str, kind: str, cls: bool) -> Tensor:
    """The full table (1, [1+]L, D), the class token's position first when `cls` (zeros for
    the fixed kinds, which have none)."""
    if kind == "separable":
        table = separable_pos_embed(getattr(owner, f"{prefix}_spatial"), getattr(owner, f"{prefix}_temporal"))
        return torch.cat([getattr(owner, f"{prefix}_class"), table], dim=1) if cls else table
    table = getattr(owner, prefix)
    if kind == "joint" or not cls:
        return table
    return torch.cat([table.new_zeros(1, 1, table.shape[-1]), table], dim=1)  # (1, 1+L, D)


# -----------------------------------------------------------------------------
# Attention: written out, and the fast path (LSA: Lee et al. sec. 3.3)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: Tensor | float, mask_diagonal: bool = False,
                        dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T * scale) v, written out.

    q, k, v (B, nh, L, hs); scale a float or a per-head tensor (nh,) (LSA's learnable
    temperature, which multiplies the logits). mask_diagonal: a token may not attend to
    itself (LSA's diagonal masking); with a single token there is nothing else to attend
    to and the mask is skipped, which is what Lee et al.'s -987654321 fill gives too.
    """
    if isinstance(scale, Tensor):
        scale = scale.view(1, -1, 1, 1)  # (1, nh, 1, 1)
    logits = torch.einsum("bnld,bnmd->bnlm", q, k) * scale  # (B, nh, L, L)
    L = q.shape[-2]
    if mask_diagonal and L > 1:
        eye = torch.eye(L, dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(eye, float("-inf"))
    attn = logits.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return torch.einsum("bnlm,bnmd->bnld", attn, v)  # (B, nh, L, hs)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection; optional LSA (a learnable
    per-head temperature, initialised to 1/sqrt(hs), and the diagonal masked)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = False, lsa: bool = False,
                 attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.lsa = num_heads, head_dim, lsa
        inner = num_heads * head_dim  # need not equal dim (the authors' decoder: 16 x 16 = 256 > 96)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)  # weight rows: q's, then k's, then v's
        self.proj = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)
        if lsa:  # Lee et al. call it `scale`: it multiplies the logits
            self.temperature = nn.Parameter(torch.full((num_heads,), head_dim ** -0.5))
        self.fast = True  # forward_fast; False: the written-out form below (set_fast_paths)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D): each head softmax(q k^T * scale) v, the heads side by side,
        the output projection. scale is LSA's learnable temperature, with the diagonal masked
        (Lee et al. sec. 3.3), else 1/sqrt(hs)."""
        if self.fast:
            return self.forward_fast(x)
        B, L, D = x.shape
        nh, hs = self.num_heads, self.head_dim
        q, k, v = (z.view(B, L, nh, hs).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))  # 3 x (B, nh, L, hs)
        scale = self.temperature if self.lsa else hs ** -0.5
        p = self.attn_dropout if self.training else 0.0
        out = attention_reference(q, k, v, scale, mask_diagonal=self.lsa, dropout_p=p)  # (B, nh, L, hs)
        out = out.transpose(1, 2).reshape(B, L, nh * hs)  # (B, L, nh*hs)
        return self.proj_drop(self.proj(out))  # (B, L, D)

    def forward_fast(self, x: Tensor) -> Tensor:
        """`forward`'s function, the same parameters (tested equal, outputs and gradients), with
        torch's fused kernel (F.scaled_dot_product_attention), the temperature folded into the
        weight and q/k/v taken in the order that saves a backward copy."""
        B, L, D = x.shape
        nh, hs = self.num_heads, self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias  # (3*nh*hs, D): q rows, then k, then v
        if self.lsa:  # the temperature scales q: fold it into q's rows of the (small) weight
            rows = torch.cat([self.temperature.repeat_interleave(hs), self.temperature.new_ones(2 * nh * hs)])
            weight = weight * rows[:, None]
            bias = bias * rows if bias is not None else None
        qkv = F.linear(x, weight, bias).view(B, L, 3, nh, hs)  # (B, L, 3, nh, hs)
        # The same strided views as chunk(3) then a head split, taken in this order so that the
        # backward stacks the three gradients straight into qkv's layout (one copy, not two).
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # 3 x (B, nh, L, hs)
        allowed = ~torch.eye(L, dtype=torch.bool, device=x.device) if self.lsa and L > 1 else None
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p,
                                             scale=1.0 if self.lsa else hs ** -0.5)  # (B, nh, L, hs)
        out = out.transpose(1, 2).reshape(B, L, nh * hs)  # (B, L, nh*hs)
        return self.proj_drop(self.proj(out))  # (B, L, D)


def set_fast_paths(module: nn.Module, fast: bool) -> None:
    """The one switch between the two forms of every tokenizer and attention in `module`.

    True (how models are built): `tubelet_tokens`, SPT's LayerNorm affine folded into its
    projection, the fused attention kernel with LSA's temperature folded into q's weight rows.
    False: each as the papers write it (shift_stack, patchify, nn.LayerNorm, nn.Linear;
    `attention_reference`). The same function of the same parameters either way (tested, outputs
    and gradients); the state dict does not change."""
    for m in module.modules():
        if isinstance(m, (PatchEmbed, ShiftedPatchTokenizer, Attention)):
            m.fast = fast


def set_fast_attention(module: nn.Module, fast: bool) -> None:
    """The old name of `set_fast_paths` (it now switches the tokenizers too)."""
    set_fast_paths(module, fast)


# -----------------------------------------------------------------------------
# Transformer block: pre-norm, joint or divided space-time attention (TimeSformer sec. 3)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p,
    scaling the kept ones by 1/(1-p). x (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p).div_(1 - p)  # (B, 1, ..)
    return x * keep  # one pass over x, not two


class DropPath(nn.Module):
    """`drop_path` as a module, so the rate shows when the model is printed."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1, GELU, dropout, fc2, dropout (timm's Mlp, Lee et al.'s FeedForward)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block. Joint: attention over all L tokens. Divided (TimeSformer):
    attention over time at each spatial position, then over space in each time slice."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 lsa: bool = False, divided: bool = False, drop_path: float = 0.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.divided = divided
        if divided:  # TimeSformer's names; temporal_fc starts at zero so the block starts spatial-only
            self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
            self.temporal_attn = Attention(dim, num_heads, head_dim, qkv_bias, lsa, attn_dropout, dropout)
            self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias, lsa, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, t: int = 1) -> Tensor:
        """x (B, L, D) in (t, k) order: t time slices of k tokens each (k = L / t; the
        same spatial positions in every slice). t only matters for divided attention."""
        if self.divided:
            B, L, D = x.shape
            k = L // t
            xt = x.view(B, t, k, D).transpose(1, 2).reshape(B * k, t, D)  # (B*k, t, D)
            yt = self.temporal_attn(self.temporal_norm1(xt))  # (B*k, t, D)
            yt = yt.view(B, k, t, D).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
            x = x + self.drop_path(self.temporal_fc(yt))
            xs = x.reshape(B * t, k, D)  # (B*t, k, D)
            x = x + self.drop_path(self.attn(self.norm1(xs)).view(B, L, D))  # (B, L, D)
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(m: nn.Module) -> None:
    """mae_st's initialisation: xavier-uniform Linear weights (the patch projection
    included), zero biases, unit LayerNorms; TimeSformer's zero temporal_fc. Apply with
    `module.apply`, which visits children before their parents."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, Block) and m.divided:
        nn.init.zeros_(m.temporal_fc.weight)
        nn.init.zeros_(m.temporal_fc.bias)


def _check_attention(kind: str, cls_token: bool) -> bool:
    if kind not in ("joint", "divided"):
        raise ValueError(f"unknown attention {kind!r}; choose joint or divided")
    if kind == "divided" and cls_token:
        raise ValueError("divided attention is implemented without a cls token: set cls_token=False")
    return kind == "divided"


# -----------------------------------------------------------------------------
# The video ViT encoder


# How VideoViT.embed pools its tokens into one vector a clip (stage 3, eval.py probe)
POOLS = ("mean", "space", "time", "tokens")


class VideoViT(nn.Module):
    """Video ViT: tubelet tokens (SPT or linear) + positions, pre-norm blocks, final norm.
    Encodes all tokens, or only those in ids_keep (the MAE encoder)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size or cfg.num_frames % cfg.tubelet_size:
            raise ValueError(f"{cfg.num_frames} frames x {cfg.img_size} px do not split into tubelets of "
                             f"{cfg.tubelet_size} x {cfg.patch_size} px")
        self.grid = (cfg.num_frames // cfg.tubelet_size, cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.divided = _check_attention(cfg.attention, cfg.cls_token)
        D = cfg.width
        if cfg.spt:
            self.patch_embed = ShiftedPatchTokenizer(cfg.in_chans, cfg.tubelet_size, cfg.patch_size, D,
                                                     cfg.spt_shift, cfg.norm_eps)
        else:
            self.patch_embed = PatchEmbed(cfg.in_chans, cfg.tubelet_size, cfg.patch_size, D)
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        add_pos_embed(self, "pos_embed", cfg.pos_embed, self.grid, D, cfg.cls_token)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio, cfg.qkv_bias, cfg.lsa, self.divided, rates[i],
                  cfg.dropout, cfg.attn_dropout, cfg.norm_eps) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.apply(init_vit_weights)
        for name, prm in self.named_parameters(recurse=False):  # tokens and learnable positions
            nn.init.trunc_normal_(prm, std=0.02)

    def pos_embed_table(self) -> Tensor:
        """(1, [1+]L, D): the positional embedding of every token, the cls position first."""
        return pos_embed_table(self, "pos_embed", self.cfg.pos_embed, self.cfg.cls_token)

    def forward_features(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """The blocks' output before the final norm, cls token (if any) first: (B, [1+]L', D)."""
        B, C, T, H, W = video.shape
        cfg = self.cfg
        if (C, T, H, W) != (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size):
            raise ValueError(f"this ViT takes videos of {cfg.in_chans} x {cfg.num_frames} x {cfg.img_size} x "
                             f"{cfg.img_size} (C, T, H, W); got {C} x {T} x {H} x {W}")
        x = self.patch_embed(video, ids_keep)  # (B, L', D)
        pos = self.pos_embed_table()  # (1, [1+]L, D)
        n_cls = int(cfg.cls_token)
        x = x + gather_tokens(pos[:, n_cls:].expand(B, -1, -1), ids_keep)  # (B, L', D)
        if cfg.cls_token:
            x = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), x], dim=1)  # (B, 1+L', D)
        t = self.grid[0]
        if self.divided and x.shape[1] % t:
            raise ValueError(f"divided attention needs the same tokens kept in each of the {t} time slices "
                             f"(tube masking); got {x.shape[1]} tokens")
        for blk in self.blocks:
            x = blk(x, t)
        return x

    def forward(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """video (B, C, T, H, W) -> tokens after the final norm (B, L', D), cls token dropped.
        ids_keep (B, L'): encode only these tokens (with divided attention they must come
        from `tube_masking`)."""
        x = self.norm(self.forward_features(video, ids_keep))
        return x[:, int(self.cfg.cls_token):]  # (B, L', D)

    def embed(self, video: Tensor, pool: str = "mean") -> Tensor:
        """(B, C, T, H, W) -> (B, F): the tokens (cls excluded) pooled, then the final norm on each
        pooled vector. "mean" (F = D): over every token, as mae_st's fine-tuning ViT pools (the
        Classifier's features, and stage 3's default embedding). The others keep the token grid
        (t, h, w) in part: "space" averages over time at each of the h*w positions (F = h*w*D: where
        things are), "time" over space in each of the t time slices (F = t*D: when), "tokens" keeps
        all t*h*w (F = t*h*w*D)."""
        x = self.forward_features(video)[:, int(self.cfg.cls_token):]  # (B, L, D)
        if pool == "mean":
            return self.norm(x.mean(dim=1))  # (B, D)
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        t, h, w = self.grid
        x = x.view(x.shape[0], t, h * w, -1)  # tokens are flattened (t, h, w), time first
        if pool == "space":
            x = x.mean(dim=1)  # (B, h*w, D)
        elif pool == "time":
            x = x.mean(dim=2)  # (B, t, D)
        return self.norm(x).flatten(1)  # (B, F)

    def embed_dim(self, pool: str = "mean") -> int:
        """F, the length of `embed(video, pool)`."""
        t, h, w = self.grid
        return self.cfg.width * {"mean": 1, "space": h * w, "time": t, "tokens": t * h * w}[pool]


# -----------------------------------------------------------------------------
# The video masked autoencoder (MAE-ST; VideoMAE's tube masking as an option)


class VideoMAE(nn.Module):
    """Masked autoencoder: the encoder sees the visible tokens only; a narrower decoder
    fills in mask tokens and predicts each token's pixels; the loss is on masked tokens."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = VideoViT(enc)
        if cfg.mask_type not in ("random", "tube"):
            raise ValueError(f"unknown mask_type {cfg.mask_type!r}; choose random or tube")
        if self.encoder.divided and cfg.mask_type != "tube" and cfg.mask_ratio > 0:
            raise ValueError("divided attention needs tube masking (the same positions kept in every frame): "
                             "set mask_type='tube'")
        # mae_st: the decoder predicts pred_t_dim of the frames, t_pred frames per token
        frames = cfg.pred_t_dim or enc.num_frames
        if (enc.tubelet_size * frames) % enc.num_frames or frames > enc.num_frames:
            raise ValueError(f"pred_t_dim {cfg.pred_t_dim} must be a multiple of the {self.encoder.grid[0]} "
                             f"token time slices and at most {enc.num_frames} frames")
        self.pred_frames = frames
        self.t_pred = enc.tubelet_size * frames // enc.num_frames
        Dd = cfg.decoder_width
        self.decoder_embed = nn.Linear(enc.width, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        if enc.cls_token:
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, Dd))
        add_pos_embed(self, "decoder_pos_embed", enc.pos_embed, self.encoder.grid, Dd, enc.cls_token)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_heads, cfg.decoder_head_dim, cfg.decoder_mlp_ratio, cfg.decoder_qkv_bias,
                  enc.lsa, self.encoder.divided, eps=enc.norm_eps) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=enc.norm_eps)
        self.patch_dim = self.t_pred * enc.patch_size ** 2 * enc.in_chans  # P, one token's pixels
        self.decoder_pred = nn.Linear(Dd, self.patch_dim * (2 if cfg.diff_target else 1))  # P' = P or 2P
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(init_vit_weights)
        for name, prm in self.named_parameters(recurse=False):
            if name == "mask_token":
                nn.init.normal_(prm, std=0.02)
            else:
                nn.init.trunc_normal_(prm, std=0.02)

    def masking(self, B: int, mask_ratio: float, generator: torch.Generator | None, device
                ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """ids_keep, mask (B, L) (1 = masked), ids_restore; ratio 0 keeps every token in order."""
        gt, gh, gw = self.encoder.grid
        if mask_ratio == 0:
            return None, torch.zeros(B, gt * gh * gw, device=device), None
        if self.cfg.mask_type == "tube":
            return tube_masking(B, gt, gh * gw, mask_ratio, generator, device)
        return random_masking(B, gt * gh * gw, mask_ratio, generator, device)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor | None) -> Tensor:
        """latent (B, L', D) visible tokens -> predictions for every token (B, L, P')."""
        B = latent.shape[0]
        L = self.encoder.num_tokens
        x = self.decoder_embed(latent)  # (B, L', Dd)
        if ids_restore is not None:
            fill = self.mask_token.expand(B, L - x.shape[1], -1)  # (B, L-L', Dd)
            x = gather_tokens(torch.cat([x, fill], dim=1), ids_restore)  # (B, L, Dd) grid order
        cls = self.cfg.encoder.cls_token
        pos = pos_embed_table(self, "decoder_pos_embed", self.cfg.encoder.pos_embed, cls)  # (1, [1+]L, Dd)
        if cls:
            x = torch.cat([self.decoder_cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+L, Dd)
        x = x + pos
        for blk in self.decoder_blocks:
            x = blk(x, self.encoder.grid[0])
        return self.decoder_pred(self.decoder_norm(x))[:, int(cls):]  # (B, L, P')

    def target(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What each token predicts: (target (B, L, P'), mean, var (B, L, 1)): its pixels (P
        numbers), per-patch normalised when norm_pix_loss (mean and var are the pixels' own
        statistics); with diff_target its frame differences follow (P more, normalised alike)."""
        T = video.shape[2]
        if self.pred_frames != T:  # mae_st: pred_t_dim frames evenly spread over the clip
            idx = torch.linspace(0, T - 1, self.pred_frames, device=video.device).long()
            video = video.index_select(2, idx)  # (B, C, T', H, W)
        p, eps = self.cfg.encoder.patch_size, self.cfg.norm_pix_eps
        pixels = patchify(video, self.t_pred, p)  # (B, L, P)
        mean = pixels.mean(dim=-1, keepdim=True)  # (B, L, 1)
        var = pixels.var(dim=-1, keepdim=True)  # unbiased, as mae_st
        parts = [(pixels - mean) / (var + eps) ** 0.5 if self.cfg.norm_pix_loss else pixels]
        if self.cfg.diff_target:
            diff = patchify(torch.diff(video, dim=2, prepend=video[:, :, :1]), self.t_pred, p)  # frame 0's is 0
            if self.cfg.norm_pix_loss:
                diff = (diff - diff.mean(dim=-1, keepdim=True)) / (diff.var(dim=-1, keepdim=True) + eps) ** 0.5
            parts.append(diff)
        return torch.cat(parts, dim=-1), mean, var  # (B, L, P'), (B, L, 1) x 2

    def _predict(self, video, mask_ratio, generator):
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if self.encoder.divided and self.cfg.mask_type != "tube" and ratio > 0:
            raise ValueError("divided attention needs tube masking: set mask_type='tube'")
        ids_keep, mask, ids_restore = self.masking(video.shape[0], ratio, generator, video.device)
        pred = self.forward_decoder(self.encoder(video, ids_keep), ids_restore)  # (B, L, P')
        return pred, mask, ratio

    def forward(self, video: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """video (B, C, T, H, W) normalised -> (loss, pred (B, L, P'), mask (B, L), 1 = masked).
        The loss is the mean squared error over masked tokens; with mask ratio 0 (the plain
        autoencoder) over all tokens."""
        pred, mask, ratio = self._predict(video, mask_ratio, generator)
        target, _, _ = self.target(video)
        per_token = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        loss = (per_token * mask).sum() / mask.sum() if ratio > 0 else per_token.mean()
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, video: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
        """Pictures: (recon (B, C, T', H, W), mask_video (B, 1, T', H, W), 1 = masked).

        recon is every token's prediction in the input's (normalised) space: with
        norm_pix_loss each predicted patch is de-normalised with that patch's own mean and
        variance, taken from the input. T' = T, or pred_t_dim frames (those at
        linspace(0, T-1, pred_t_dim)). Paste visible input over it with the mask if wanted."""
        pred, mask, _ = self._predict(video, mask_ratio, generator)
        _, mean, var = self.target(video)
        pred = pred[..., :self.patch_dim]  # the pixels (with diff_target, the differences follow)
        if self.cfg.norm_pix_loss:
            pred = pred * (var + self.cfg.norm_pix_eps) ** 0.5 + mean
        B, C, T, H, W = video.shape
        p = self.cfg.encoder.patch_size
        recon = unpatchify(pred, self.t_pred, p, C, self.pred_frames, H, W)  # (B, C, T', H, W)
        mask_patches = mask[:, :, None].expand(-1, -1, self.t_pred * p * p)  # (B, L, t*p*p)
        mask_video = unpatchify(mask_patches, self.t_pred, p, 1, self.pred_frames, H, W)  # (B, 1, T', H, W)
        return recon, mask_video

    @torch.no_grad()
    def per_frame_loss(self, video: Tensor, mask_ratio: float | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """(B, T') mean squared error per frame, over that frame's masked pixels (all pixels
        when the mask ratio is 0), in the loss's own target space (per-patch normalised when
        norm_pix_loss). Averaged over frames weighted by masked pixels it is the training
        loss. T' as in `reconstruct`. The paper's Table 3 reads this at every 20th frame. With
        diff_target a pixel's error is the mean of its pixel and its frame-difference errors."""
        pred, mask, ratio = self._predict(video, mask_ratio, generator)
        target, _, _ = self.target(video)
        B, C, T, H, W = video.shape
        p = self.cfg.encoder.patch_size
        sq = ((pred - target) ** 2).view(B, pred.shape[1], -1, self.patch_dim).mean(dim=2)  # (B, L, P)
        err = unpatchify(sq, self.t_pred, p, C, self.pred_frames, H, W)  # (B, C, T', H, W)
        if ratio == 0:
            return err.mean(dim=(1, 3, 4))  # (B, T')
        weight = unpatchify(mask[:, :, None].expand(-1, -1, self.patch_dim), self.t_pred, p, C,
                            self.pred_frames, H, W)  # (B, C, T', H, W)
        return (err * weight).sum(dim=(1, 3, 4)) / weight.sum(dim=(1, 3, 4)).clamp_min(1)  # (B, T')


# -----------------------------------------------------------------------------
# Classifier, parameter groups, counting


class Classifier(nn.Module):
    """Encoder, mean pool, norm (the encoder's, as mae_st), dropout, linear head."""

    def __init__(self, cfg: ViTConfig, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = VideoViT(cfg)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.width, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)  # mae_st
        nn.init.zeros_(self.head.bias)

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> logits (B, num_classes)."""
        return self.head(self.dropout(self.encoder.embed(video)))


def _no_weight_decay(name: str, p: Tensor) -> bool:
    return p.ndim <= 1 or name.endswith("token") or "pos_embed" in name


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with layer-wise lr decay (BEiT, mae_st's util/lr_decay.py).

    Layer ids as mae_st: cls/mask tokens, patch embedding and positions 0; encoder block i
    -> i + 1; everything else (final norm, head, decoder, MANN) depth + 1. lr_scale =
    layer_decay ** (depth + 1 - id). No weight decay on 1-D parameters (norms, biases, LSA
    temperatures), tokens, or positional embeddings. Each dict: params, weight_decay, lr_scale.
    """
    vit = model if isinstance(model, VideoViT) else getattr(model, "encoder", None)
    depth = len(vit.blocks) if isinstance(vit, VideoViT) else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = name.removeprefix("encoder.") if vit is not model else name
        if n in ("cls_token", "mask_token") or n.startswith(("patch_embed", "pos_embed")):
            layer = 0
        elif n.startswith("blocks."):
            layer = int(n.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = not _no_weight_decay(n, p)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, beta2: float, layer_decay: float = 1.0
                   ) -> torch.optim.AdamW:
    """AdamW over param_groups (fused on CUDA), each group's lr = lr * its lr_scale."""
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), **fused)


def optimizer_step(model: nn.Module, optimizer, scaler, clip_grad: float) -> None:
    """Unscale (fp16), clip the global gradient norm if asked, step, clear the gradients.
    With a disabled GradScaler (bf16, fp32) unscale_ and step are the plain calls."""
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def count_parameters(module: nn.Module, layers_only: bool = False) -> int:
    """Number of parameters. layers_only: the weights and biases of the layers (LSA
    temperatures included), without cls/mask tokens and positional embeddings: how the
    paper counts its 3,109,008."""
    return sum(p.numel() for name, p in module.named_parameters()
               if not (layers_only and (name.endswith("token") or "pos_embed" in name)))


# -----------------------------------------------------------------------------
# MANN: memory addressing (pure functions)


def cosine_similarity(key: Tensor, memory: Tensor, eps: float = 1e-8) -> Tensor:
    """K[k, M(i)] = k . M(i) / (|k| |M(i)|) (NTM eq. 6, Santoro sec. 3.1).
    key (B, nh, M), memory (B, N, M) -> (B, nh, N). Safe (zero gradient, no NaN) at zero rows."""
    dot = torch.bmm(key, memory.transpose(1, 2))  # (B, nh, N): k . M(i) for every head and slot
    norms = (key * key).sum(-1)[:, :, None] * (memory * memory).sum(-1)[:, None, :]  # (B, nh, N)
    return dot / norms.clamp_min(eps * eps).sqrt()


def content_addressing(key: Tensor, memory: Tensor, beta: Tensor) -> Tensor:
    """w^c(i) = softmax_i(beta K[k, M(i)]) (NTM eq. 5; Santoro's read weights with beta = 1).
    key (B, nh, M), memory (B, N, M), beta (B, nh) >= 0 -> (B, nh, N)."""
    return torch.softmax(beta[..., None] * cosine_similarity(key, memory), dim=-1)


def interpolate(w_content: Tensor, w_prev: Tensor, gate: Tensor) -> Tensor:
    """w^g = g w^c + (1 - g) w_{t-1} (NTM eq. 7). gate (B, nh) in (0, 1)."""
    g = gate[..., None]
    return g * w_content + (1 - g) * w_prev


def circular_shift(w: Tensor, s: Tensor) -> Tensor:
    """w~(i) = sum_j w(j) s(i - j), indices mod N (NTM eq. 8).

    w (B, nh, N), s (B, nh, 2R+1) a distribution over shifts -R..R (s[..., R] is no shift).
    Shift +1 moves weight from slot i to slot i+1. (pytorch-ntm's _convolve correlates, so
    its +1 moves weight the other way; a learned s does not care.)
    """
    N, R = w.shape[-1], (s.shape[-1] - 1) // 2
    offsets = torch.arange(-R, R + 1, device=w.device)  # (2R+1,)
    src = (torch.arange(N, device=w.device)[None, :] - offsets[:, None]) % N  # (2R+1, N): j = i - o
    return torch.einsum("bhon,bho->bhn", w[..., src], s)  # w[..., src] (B, nh, 2R+1, N)


def sharpen(w: Tensor, gamma: Tensor, eps: float = 1e-12) -> Tensor:
    """w(i) = w~(i)^gamma / sum_j w~(j)^gamma (NTM eq. 9). w (B, nh, N), gamma (B, nh) >= 1."""
    w = w.clamp_min(eps) ** gamma[..., None]
    return w / w.sum(dim=-1, keepdim=True)


def memory_read(w: Tensor, memory: Tensor) -> Tensor:
    """r = sum_i w(i) M(i) (NTM eq. 2, Santoro sec. 3.1). w (B, nh, N) -> (B, nh, M)."""
    return torch.bmm(w, memory)  # (B, nh, N) @ (B, N, M)


def ntm_write(memory: Tensor, w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """Erase then add (NTM eqs. 3-4), for nh write heads at once:
    M~ = M * prod_h (1 - w_h e_h^T);  M' = M~ + sum_h w_h a_h^T.
    memory (B, N, M), w (B, nh, N), erase in (0, 1) and add (B, nh, M) -> (B, N, M)."""
    keep = (1 - torch.einsum("bhn,bhm->bhnm", w, erase)).prod(dim=1)  # (B, N, M)
    return memory * keep + torch.einsum("bhn,bhm->bnm", w, add)


def least_used(usage: Tensor, n: int) -> Tensor:
    """w^lu: 1 at the n least-used slots, 0 elsewhere (Santoro sec. 3.2); ties go to the
    lower slot index. usage (B, N) -> (B, N)."""
    idx = torch.sort(usage, dim=-1, stable=True).indices[:, :n]  # (B, n)
    return torch.zeros_like(usage).scatter_(1, idx, 1.0)


def lrua_write(memory: Tensor, usage_prev: Tensor, read_weights_prev: Tensor, alpha: Tensor, content: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Least recently used access (Santoro sec. 3.2), nh heads at once.

    w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}, with w^lu_{t-1} the
    nh least-used slots of w^u_{t-1}; the single least-used slot is cleared, then
    M_t(i) = M_{t-1}(i) + sum_h w^w_{t,h}(i) a_{t,h}  (a: the read key in Santoro's text, a
    separate add vector in the published code; see MANNConfig.write_content).
    memory (B, N, M), usage_prev (B, N), read_weights_prev (B, nh, N), alpha (B, nh)
    (a logit), content (B, nh, M) -> (memory (B, N, M), write weights (B, nh, N)).
    """
    nh = content.shape[1]
    with torch.no_grad():  # which slots are least used: a discrete choice, no gradient
        order = torch.sort(usage_prev, dim=-1, stable=True).indices  # (B, N), least used first
        w_lu = torch.zeros_like(usage_prev).scatter_(1, order[:, :nh], 1.0)  # (B, N)
        keep = torch.ones_like(usage_prev).scatter_(1, order[:, :1], 0.0)  # (B, N), 0 at the least used
    a = torch.sigmoid(alpha)[..., None]  # (B, nh, 1)
    w_write = a * read_weights_prev + (1 - a) * w_lu[:, None, :]  # (B, nh, N)
    # (B, N, M): the cleared memory plus sum_h w^w_h a_h^T, in one batched product-and-add
    return torch.baddbmm(memory * keep[..., None], w_write.transpose(1, 2), content), w_write


def lrua_usage(usage_prev: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """w^u_t = gamma w^u_{t-1} + sum_h w^r_{t,h} + sum_h w^w_{t,h} (Santoro sec. 3.2). (B, N)."""
    return gamma * usage_prev + read_weights.sum(dim=1) + write_weights.sum(dim=1)


# -----------------------------------------------------------------------------
# MANN: controller, heads, the network


class LSTMController(nn.Module):
    """One LSTM step, written out. The gates' matrix product W [inputs; h] + b is split in two,
    as torch.nn.LSTM splits weight_ih and weight_hh: `ih` for the inputs known before an
    episode runs (the clip embedding and the label, which the MANN projects for all steps in one
    product) and `hh` for what comes from the previous step (the reads r_{t-1}, then h_{t-1})."""

    def __init__(self, input_size: int, hidden_size: int, recurrent_size: int = 0, forget_bias: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(recurrent_size + hidden_size, 4 * hidden_size, bias=False)
        bound = hidden_size ** -0.5  # torch.nn.LSTM's initialisation ...
        nn.init.uniform_(self.ih.weight, -bound, bound)
        nn.init.uniform_(self.hh.weight, -bound, bound)
        nn.init.zeros_(self.ih.bias)
        with torch.no_grad():  # ... with a positive forget-gate bias, so memory is kept early on
            self.ih.bias[hidden_size:2 * hidden_size] = forget_bias

    def cell(self, gates_in: Tensor, recurrent: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """gates_in (B, 4Hc) = ih(inputs); recurrent (B, recurrent_size + Hc) ending with h_{t-1};
        c (B, Hc) -> new (h, c)."""
        H = self.hidden_size
        z = torch.addmm(gates_in, recurrent, self.hh.weight.t())  # (B, 4Hc): gates_in + W_hh [recurrent]
        i, f, _, o = torch.sigmoid(z).chunk(4, dim=-1)  # torch's gate order i, f, g, o; one sigmoid for three
        c = f * c + i * torch.tanh(z[:, 2 * H:3 * H])
        h = o * torch.tanh(c)
        return h, c

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """The whole cell: x (B, in), h, c (B, Hc) -> new (h, c)."""
        return self.cell(self.ih(x), h, c)


class ReadHead(nn.Module):
    """nh read heads: a key (tanh) each, and a learned key strength beta (softplus) when
    `key_strength` > 0 (its initial value; Santoro's equations have none: beta = 1); content
    addressing by cosine similarity, then a weighted read."""

    def __init__(self, controller_size: int, n_heads: int, slot_dim: int, key_strength: float = 0.0):
        super().__init__()
        self.n_heads, self.slot_dim, self.learn_beta = n_heads, slot_dim, key_strength > 0
        self.fc = nn.Linear(controller_size, n_heads * (slot_dim + self.learn_beta))
        # Zero biases: at the start h is small, and a random bias would give every input nearly
        # the same key, which content addressing cannot tell apart.
        nn.init.zeros_(self.fc.bias)
        if self.learn_beta:
            with torch.no_grad():
                self.fc.bias.view(n_heads, slot_dim + 1)[:, -1] = math.log(math.expm1(key_strength))

    def key(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, Hc) -> key (B, nh, M), beta (B, nh)."""
        out = self.fc(h).view(h.shape[0], self.n_heads, -1)  # (B, nh, M [+ 1])
        if self.learn_beta:
            return torch.tanh(out[..., :-1]), F.softplus(out[..., -1])
        return torch.tanh(out), out.new_ones(out.shape[:2])

    def forward(self, memory: Tensor, key: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """-> read weights (B, nh, N), read vectors (B, nh, M)."""
        w = content_addressing(key, memory, beta)
        return w, memory_read(w, memory)


class LRUAWriteHead(nn.Module):
    """Santoro's write: each head writes to a sigmoid-gated mix of the slots it read last step
    and the least-used slots. What it writes is its read key (Santoro's text) or an add vector
    of its own (tanh; the published reproductions: tristandeleu/ntm-one-shot, snowkylin/ntm)."""

    def __init__(self, controller_size: int, n_heads: int, slot_dim: int = 0, add_vector: bool = False):
        super().__init__()
        self.n_heads, self.add_vector = n_heads, add_vector
        self.fc = nn.Linear(controller_size, n_heads * (1 + (slot_dim if add_vector else 0)))
        nn.init.zeros_(self.fc.bias)  # as ReadHead: an input-independent add vector would blur every slot

    def forward(self, h: Tensor, key: Tensor, memory: Tensor, usage: Tensor, read_weights_prev: Tensor
                ) -> tuple[Tensor, Tensor]:
        """h (B, Hc), key (B, nh, M) -> (memory (B, N, M), write weights (B, nh, N))."""
        out = self.fc(h).view(h.shape[0], self.n_heads, -1)  # (B, nh, 1 [+ M])
        content = torch.tanh(out[..., 1:]) if self.add_vector else key
        return lrua_write(memory, usage, read_weights_prev, out[..., 0], content)


class NTMWriteHead(nn.Module):
    """Graves's write heads: content addressing, interpolation with the last weights,
    circular shift, sharpening; then erase and add."""

    def __init__(self, controller_size: int, n_heads: int, slot_dim: int, shift_range: int = 1):
        super().__init__()
        self.n_heads, self.slot_dim, self.n_shifts = n_heads, slot_dim, 2 * shift_range + 1
        # per head: key M, beta 1, gate 1, shift 2R+1, gamma 1, erase M, add M
        self.sizes = [slot_dim, 1, 1, self.n_shifts, 1, slot_dim, slot_dim]
        self.fc = nn.Linear(controller_size, n_heads * sum(self.sizes))

    def forward(self, h: Tensor, memory: Tensor, w_prev: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, Hc), memory (B, N, M), w_prev (B, nh, N) -> (memory, write weights (B, nh, N))."""
        out = self.fc(h).view(h.shape[0], self.n_heads, -1)  # (B, nh, sum(sizes))
        k, beta, g, s, gamma, e, a = out.split(self.sizes, dim=-1)
        w = content_addressing(torch.tanh(k), memory, F.softplus(beta[..., 0]))
        w = interpolate(w, w_prev, torch.sigmoid(g[..., 0]))
        w = circular_shift(w, torch.softmax(s, dim=-1))
        w = sharpen(w, 1 + F.softplus(gamma[..., 0]))
        return ntm_write(memory, w, torch.sigmoid(e), torch.tanh(a)), w


class MANNState(NamedTuple):
    """Everything the MANN carries from one step to the next; reset for each episode."""

    h: Tensor  # (B, Hc) controller output
    c: Tensor  # (B, Hc) controller cell
    memory: Tensor  # (B, N, M)
    read_weights: Tensor  # (B, nh, N)
    reads: Tensor  # (B, nh, M) read vectors, fed to the controller at the next step
    write_weights: Tensor  # (B, nh, N)
    usage: Tensor  # (B, N) LRUA usage weights


class MANN(nn.Module):
    """Santoro et al.'s memory-augmented network: an LSTM controller, an external memory
    read by content, written by LRUA or by NTM heads; logits from [controller, reads].
    With read_heads = 0 it is a plain LSTM (the memory-free baseline)."""

    def __init__(self, cfg: MANNConfig, input_dim: int, n_way: int):
        super().__init__()
        if cfg.write not in ("lrua", "ntm"):
            raise ValueError(f"unknown MANN write {cfg.write!r}; choose lrua or ntm")
        if cfg.write_content not in ("add", "key"):
            raise ValueError(f"unknown MANN write_content {cfg.write_content!r}; choose add or key")
        if cfg.read_order not in ("after_write", "before_write"):
            raise ValueError(f"unknown MANN read_order {cfg.read_order!r}; choose after_write or before_write")
        if cfg.read_heads < 0 or n_way < 1:
            raise ValueError(f"need read_heads >= 0 and n_way >= 1 (got {cfg.read_heads}, {n_way})")
        self.cfg, self.n_way = cfg, n_way
        nh, M, Hc = cfg.read_heads, cfg.slot_dim, cfg.controller_size
        self.input_proj = nn.Linear(input_dim, cfg.input_proj) if cfg.input_proj > 0 else nn.Identity()
        x_dim = cfg.input_proj if cfg.input_proj > 0 else input_dim
        self.controller = LSTMController(x_dim + n_way, Hc, recurrent_size=nh * M)
        if nh > 0:
            self.read_head = ReadHead(Hc, nh, M, cfg.key_strength)
            if cfg.write == "lrua":
                self.write_head = LRUAWriteHead(Hc, nh, M, add_vector=cfg.write_content == "add")
            else:
                self.write_head = NTMWriteHead(Hc, nh, M, cfg.shift_range)
        self.out = nn.Linear(Hc + nh * M, n_way)

    def initial_state(self, x: Tensor) -> MANNState:
        """An empty memory, on x's device and dtype, x (B, ...). The read and write weights
        start on slot 0 (snowkylin/ntm's zero state): from uniform weights every slot would be
        written alike, and content and location addressing could never tell slots apart."""
        B, cfg = x.shape[0], self.cfg
        nh, N, M, Hc = cfg.read_heads, cfg.n_slots, cfg.slot_dim, cfg.controller_size
        on_first = x.new_zeros(B, nh, N)
        on_first[:, :, 0] = 1
        return MANNState(h=x.new_zeros(B, Hc), c=x.new_zeros(B, Hc), memory=x.new_zeros(B, N, M),
                         read_weights=on_first, reads=x.new_zeros(B, nh, M), write_weights=on_first.clone(),
                         usage=x.new_zeros(B, N))

    def compile_step(self, device_type: str = "cpu") -> None:
        """torch.compile the recurrent step, the body of the time loop that runs S times a
        forward: its ~60 small operations fuse into a few kernels (1.2-1.3x on a CPU). On CUDA,
        mode "reduce-overhead" also captures it as CUDA graphs (CUDAGraph Trees record one per
        time step and replay them), so that the step stops being bound by kernel launches."""
        mode = "reduce-overhead" if device_type == "cuda" else None
        self.step = torch.compile(self.step, mode=mode, dynamic=False)

    def step(self, gates_in: Tensor, state: MANNState) -> MANNState:
        """One time step. gates_in (B, 4Hc) = controller.ih([x_t, y_t]), the controller's input
        part (see forward). Order (Santoro sec. 3): controller; write (from the t-1 weights);
        read by content (M_t, or M_{t-1} with read_order "before_write"); usage update."""
        B = gates_in.shape[0]
        h, c = self.controller.cell(gates_in, torch.cat([state.reads.flatten(1), state.h], dim=-1), state.c)
        if self.cfg.read_heads == 0:  # a plain LSTM
            return state._replace(h=h, c=c)
        key, beta = self.read_head.key(h)  # (B, nh, M), (B, nh)
        if self.cfg.read_order == "before_write":
            w_read, reads = self.read_head(state.memory, key, beta)  # (B, nh, N), (B, nh, M)
        if self.cfg.write == "lrua":
            memory, w_write = self.write_head(h, key, state.memory, state.usage, state.read_weights)
        else:
            memory, w_write = self.write_head(h, state.memory, state.write_weights)
        if self.cfg.read_order == "after_write":
            w_read, reads = self.read_head(memory, key, beta)
        usage = lrua_usage(state.usage, w_read, w_write, self.cfg.gamma)  # (B, N)
        return MANNState(h, c, memory, w_read, reads, w_write, usage)

    def forward(self, x: Tensor, label_in: Tensor, state: MANNState | None = None) -> tuple[Tensor, MANNState]:
        """x (B, S, input_dim) clip embeddings; label_in (B, S) long, the label shown with
        each step, -1 for none. -> (logits (B, S, K), final state).

        Both layouts of an episode: support/query (support steps carry their own label,
        queries -1) and Santoro's sequence (label_in[:, t] = y_{t-1}, -1 at t = 0).
        A new episode starts from `initial_state` (state=None).

        Only the time loop is sequential. What does not depend on the recurrence runs once for
        all S steps: the input projection of [x_t, y_t] (one matrix product instead of S small
        ones) and the output layer on [h_t, r_t]."""
        B, S, _ = x.shape
        if label_in.shape != (B, S):
            raise ValueError(f"label_in must be (B, S) = ({B}, {S}); got {tuple(label_in.shape)}")
        # checked where it costs nothing: on a GPU, reading min/max back would stall every step
        # (an out-of-range label still fails there, in one_hot's device-side check)
        if label_in.device.type == "cpu" and label_in.numel() and (label_in.min() < -1 or label_in.max() >= self.n_way):
            raise ValueError(f"labels must lie in -1..{self.n_way - 1}; got {label_in.min()}..{label_in.max()}")
        state = self.initial_state(x) if state is None else state
        y = F.one_hot(label_in.clamp_min(0), self.n_way).to(x.dtype) * (label_in >= 0)[..., None]  # (B, S, K)
        gates_in = self.controller.ih(torch.cat([self.input_proj(x), y], dim=-1))  # (B, S, 4Hc)
        outputs = []
        for g in gates_in.unbind(1):  # unbind: one backward node for all steps, not S slices
            state = self.step(g, state)
            outputs.append(torch.cat([state.h, state.reads.flatten(1)], dim=-1))  # (B, Hc + nh*M)
        return self.out(torch.stack(outputs, dim=1)), state  # (B, S, K)


# -----------------------------------------------------------------------------
# Backbones for stage 3


BACKBONES = ("mae", "scratch", "pixels")


class Backbone(nn.Module):
    """Clip batch (B, C, T, H, W) -> embeddings (B, out_dim). "mae" and "scratch" wrap a
    VideoViT as `vit` (its `embed`; the caller loads MAE weights or not); "pixels"
    average-pools each frame to pixels_size^2 and flattens over T (Santoro's setting: raw pixels),
    in `channels` channels: 1 averages the colour channels (grey data, as Santoro's Omniglot)."""

    def __init__(self, kind: str, vit_cfg: ViTConfig, pixels_size: int = 8, channels: int | None = None,
                 pool: str = "mean"):
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        self.kind, self.pixels_size, self.pool = kind, pixels_size, pool
        self.channels = vit_cfg.in_chans if channels is None else channels
        if self.channels not in (1, vit_cfg.in_chans):
            raise ValueError(f"pixels backbone: channels must be 1 or {vit_cfg.in_chans}, got {self.channels}")
        if kind == "pixels":
            self.vit = None
            self.out_dim = self.channels * vit_cfg.num_frames * pixels_size ** 2
        else:
            self.vit = VideoViT(vit_cfg)
            self.out_dim = self.vit.embed_dim(pool)

    def forward(self, video: Tensor) -> Tensor:
        if self.vit is None:
            T, s = video.shape[2], self.pixels_size
            if self.channels == 1:
                video = video.mean(1, keepdim=True)  # (B, 1, T, H, W)
            return F.adaptive_avg_pool3d(video, (T, s, s)).flatten(1)  # (B, C*T*s*s)
        return self.vit.embed(video, self.pool)  # (B, out_dim)


def build_backbone(kind: str, vit_cfg: ViTConfig, pixels_size: int = 8, channels: int | None = None,
                   pool: str = "mean") -> Backbone:
    """The stage-3 backbone of one kind (see Backbone); `pool` is how a ViT's tokens become one
    vector (VideoViT.embed; the pixels backbone ignores it)."""
    return Backbone(kind, vit_cfg, pixels_size, channels, pool)


class MetaLearner(nn.Module):
    """Stage 3 as one module (one state dict): the backbone, a LayerNorm on its embeddings,
    and the MANN. The backbone is called on its own (`.backbone(video)`), so frozen embeddings
    can be computed once and cached.

    The norm puts every backbone (pixels, ViT features) on one scale, and its gain starts at
    input_norm / sqrt(D), so that an embedding enters the controller with length `input_norm`,
    a few times the label one-hot's length 1: at LayerNorm's usual gain of 1 (length sqrt(D))
    the image drowns the label at the LSTM's gates and the MANN stays at counting labels.

    `input_dropout` drops features of the normed embedding in training (inverted dropout, each
    feature of each step on its own): with a frozen backbone the MANN reads the same few cached
    embeddings of each meta-train clip at every step, and with a few labelled clips a class it
    learns them by heart; dropping features makes every presentation a new view of the clip.

    `input_mean` (out_dim,), a buffer (saved, never trained), is subtracted before the norm: zero
    as built; train.py sets it to the mean embedding of the pretraining pool for a frozen backbone
    (meta.center_inputs; SimpleShot's centring, Wang et al. 2019, 1911.04623)."""

    def __init__(self, backbone: Backbone, mann: MANN, input_norm: float = 4.0, input_dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("input_mean", torch.zeros(backbone.out_dim))
        self.norm = nn.LayerNorm(backbone.out_dim)
        with torch.no_grad():
            self.norm.weight.fill_(input_norm / math.sqrt(backbone.out_dim))
        self.drop = nn.Dropout(input_dropout)
        self.mann = mann

    def forward(self, x: Tensor, label_in: Tensor, state: MANNState | None = None) -> tuple[Tensor, MANNState]:
        """x (B, S, out_dim) embeddings from the backbone; as MANN.forward otherwise."""
        return self.mann(self.drop(self.norm(x - self.input_mean)), label_in, state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the twelfth session has no input_mean: it was trained uncentred
        state_dict.setdefault(prefix + "input_mean", torch.zeros_like(self.input_mean))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def episode_loss(model: nn.Module, x: Tensor, ep) -> tuple[Tensor, Tensor]:
    """Cross-entropy averaged over an episode batch's scored steps (`ep`: a data.Episode);
    returns (loss, per-step correct (B, S) bool). The scored steps are weighted by a mask
    rather than picked by boolean indexing, which would read the mask's count back from the
    GPU every step."""
    logits, _ = model(x, ep.label_in)  # (B, S, n_way)
    logits = logits.float()
    scored = ep.is_query.float()  # (B, S)
    ce = F.cross_entropy(logits.flatten(0, 1), ep.target.clamp_min(0).flatten(), reduction="none")  # (B*S,)
    loss = (ce.view_as(scored) * scored).sum() / scored.sum().clamp_min(1)
    return loss, logits.argmax(-1) == ep.target


# =============================================================================
# NOT THE CORE. Everything from here to the end of the file loads other repositories'
# published checkpoints into our VideoMAE (train.py --init / --pretrained). It implements no paper:
# it is key renaming and tensor bookkeeping, and a reader of the papers can stop here.
# =============================================================================
# Loading published checkpoints: mae_st (its own form and PySlowFast's) and VideoMAE
#
# `load_published` takes a checkpoint dict read with weights_only (stmeta.load_checkpoint), finds
# its tensors, recognises the family by key names, renames the keys onto our VideoMAE, reads the
# architecture off the tensor shapes, converts the tensors whose form differs (Conv3d tubelet
# kernels, separate or bias-split q/k/v, layer scales), resizes the position tables to the run's
# clips, and checks every shape against our model built from what it read. Nothing here is
# copied: it is written from reading facebookresearch/mae_st (models_mae.py, models_vit.py,
# util/video_vit.py, util/pos_embed.py), facebookresearch/SlowFast (models/masked.py,
# head_helper.MSSeparateHead) and MCG-NJU/VideoMAE (modeling_pretrain.py, modeling_finetune.py).
#
# Pixel order: mae_st's and PySlowFast's patchify ("nctuhpwq->nthwupqc") and VideoMAE's target
# ("b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", flattened p then c) both lay a patch out
# as (t, row, col, C), channel fastest: our `patchify` order, so decoder_pred loads row for row.

PUBLISHED_FAMILIES = {
    "mae_st": "mae_st MAE pretraining (models_mae.py)",
    "mae_st_slowfast": "mae_st MAE pretraining in PySlowFast form (the released mae_pretrain_vit_*_k*.pth)",
    "mae_st_vit": "mae_st / PySlowFast fine-tuned ViT (encoder only)",
    "videomae": "VideoMAE pretraining (modeling_pretrain.py)",
    "videomae_vit": "VideoMAE fine-tuned ViT (modeling_finetune.py; encoder only)",
}

# Head counts are not stored in a checkpoint (they do not change any tensor's shape): the
# published tables for the standard widths, else the repository's own constructor default.
_VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-S/B/L/H, in mae_st, VideoMAE and PySlowFast
_VIDEOMAE_DECODER_HEADS = {192: 3, 384: 6, 512: 8, 640: 8}  # pretrain_videomae_{small,base,large,huge}
_DEFAULT_HEADS = {  # (encoder, decoder) constructor defaults; None: PySlowFast's decoder uses width // 64
    "mae_st": (16, 16), "mae_st_slowfast": (16, None), "mae_st_vit": (12, 16),
    "videomae": (12, 8), "videomae_vit": (12, 8)}

_BLOCK = re.compile(r"((?:encoder\.blocks|decoder_blocks)\.\d+)\.(.*)")  # our block keys: (block, parameter)
# The parameters a transformer block may hold, in any of the published forms (keys after "blocks.i.")
_BLOCK_KEYS = {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.q.weight", "attn.q.bias",
               "attn.k.weight", "attn.k.bias", "attn.v.weight", "attn.v.bias", "attn.qkv.weight",
               "attn.qkv.bias", "attn.q_bias", "attn.v_bias", "attn.proj.weight", "attn.proj.bias",
               "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "gamma_1", "gamma_2"}


def published_state_dict(ck: dict, path: str) -> tuple[dict[str, Tensor], str]:
    """The tensors of a published checkpoint, as float32, and where they were: under "model"
    (mae_st, VideoMAE), "model_state" (PySlowFast), "module" (DeepSpeed) or at the top level.
    A "module." prefix on every key (saved from DistributedDataParallel) is removed."""
    for where in ("model", "model_state", "module", "state_dict"):
        if isinstance(ck.get(where), dict) and any(isinstance(v, Tensor) for v in ck[where].values()):
            sd, found = ck[where], f"under {where!r}"
            break
    else:
        sd, found = ck, "at the top level"
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors under 'model', 'model_state', 'module' or at the top level "
                              f"(top-level keys: {', '.join(map(str, list(ck)[:8])) or 'none'})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, found


def published_family(sd: dict[str, Tensor], path: str) -> str:
    """Which published layout the keys follow (a key of PUBLISHED_FAMILIES), or a CheckpointError
    that lists what was found."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)
    if has("encoder.blocks.") and has("decoder_blocks."):
        raise CheckpointError(f"{path}: this is one of our own VideoMAE state dicts, not a published file; "
                              f"pass the checkpoint train.py wrote (it carries the config)")
    if has("encoder.blocks.") and has("encoder.patch_embed."):
        return "videomae"
    if has("pred_head."):
        return "mae_st_slowfast"
    if has("decoder_blocks.") or "decoder_pred.weight" in sd:
        return "mae_st"
    if has("blocks.0.attn.q.") and "patch_embed.proj.weight" in sd:
        return "mae_st_vit"
    if "blocks.0.attn.qkv.weight" in sd and "patch_embed.proj.weight" in sd:
        return "videomae_vit"
    some = ", ".join(list(sd)[:6])
    raise CheckpointError(f"{path}: not a video MAE checkpoint we know (mae_st, its PySlowFast form, or VideoMAE, "
                          f"pretrained or fine-tuned): {len(sd)} tensors, e.g. {some}")


def published_name(key: str, family: str) -> str | None:
    """Our VideoMAE's name for one published key (the tensor not yet converted), or None when
    our model has no place for it."""
    renames = {  # prefix in the file -> prefix in our VideoMAE, checked in order
        "videomae": [("encoder.head.", None), ("encoder.", "encoder."), ("decoder.blocks.", "decoder_blocks."),
                     ("decoder.norm.", "decoder_norm."), ("decoder.head.", "decoder_pred."),
                     ("encoder_to_decoder.", "decoder_embed."), ("mask_token", "mask_token")],
        "videomae_vit": [("fc_norm.", "encoder.norm.")],  # VideoMAE pools, then fc_norm: our `embed`
        "mae_st_slowfast": [("dec_pos_embed_", "decoder_pos_embed_"), ("pred_head.projections.0.", "decoder_pred.")],
    }
    for src, dst in renames.get(family, []):
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    if family == "videomae":
        return None
    if family == "mae_st_slowfast" and key.startswith("pred_head.transforms.0."):
        j, rest = key[len("pred_head.transforms.0."):].split(".", 1)  # blocks 0..n-1, then the LayerNorm
        return f"decoder_norm.{rest}" if "." not in rest else f"decoder_blocks.{j}.{rest}"
    if key.startswith(("decoder_", "mask_token")) and family in ("mae_st", "mae_st_slowfast"):
        return key
    if key.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")):
        return "encoder." + key
    return None


def rename_published(sd: dict[str, Tensor], family: str, path: str
                     ) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str]]:
    """-> (tensors under our names, still in the file's form; origin {our key: file key};
    ignored {file key: why}). A block parameter we have no place for is an error: leaving it
    out would change what the block computes."""
    out, origin, ignored = {}, {}, {}
    for key, value in sd.items():
        name = published_name(key, family)
        if name is None:
            head = key.split(".")[0] in ("head", "fc_norm") or key.startswith("encoder.head.")
            ignored[key] = "a classification head, not part of an MAE" if head else "not part of our MAE"
            continue
        block = _BLOCK.match(name)
        if block and block.group(2) not in _BLOCK_KEYS:
            raise CheckpointError(f"{path}: {key}: a block parameter our ViT has no place for (relative positions, "
                                  f"pooling attention and the like are not supported)")
        out[name], origin[name] = value, key
    return out, origin, ignored


def fuse_qkv(attn: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, str]:
    """One attention's q/k/v as our fused Linear: (weight (3*inner, D), bias (3*inner,) or None,
    how). `attn` holds the keys after "attn.": mae_st's separate q, k, v Linears; a fused qkv
    with its own bias (timm); or VideoMAE's bias-free qkv with q_bias and v_bias, whose k bias
    is zero (VideoMAE's forward uses cat(q_bias, zeros, v_bias))."""
    if "q.weight" in attn:
        weight = torch.cat([attn["q.weight"], attn["k.weight"], attn["v.weight"]])  # (3*inner, D)
        bias = torch.cat([attn["q.bias"], attn["k.bias"], attn["v.bias"]]) if "q.bias" in attn else None
        return weight, bias, "q, k, v concatenated"
    if "q_bias" in attn:
        bias = torch.cat([attn["q_bias"], torch.zeros_like(attn["v_bias"]), attn["v_bias"]])  # (3*inner,)
        return attn["qkv.weight"], bias, "bias = cat(q_bias, zeros, v_bias)"
    return attn["qkv.weight"], attn.get("qkv.bias"), "as is"


def convert_published(sd: dict[str, Tensor], origin: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors in our form: the Conv3d tubelet kernel as a Linear on patch vectors, every
    attention's q/k/v fused, VideoMAE's layer scales (gamma_1, gamma_2) folded into attn.proj
    and mlp.fc2 (gamma * (W x + b) = (gamma W) x + gamma b). -> (state, origin with how)."""
    sd, origin = dict(sd), dict(origin)
    kernel = sd["encoder.patch_embed.proj.weight"]  # (D, C, t, p, p)
    sd["encoder.patch_embed.proj.weight"] = conv3d_to_linear_weight(kernel)  # (D, t*p*p*C)
    origin["encoder.patch_embed.proj.weight"] += (f", Conv3d kernel {tuple(kernel.shape)} as a Linear on patch "
                                                  f"vectors (t, row, col, C)")
    blocks = sorted({m.group(1) for m in map(_BLOCK.match, sd) if m})  # "encoder.blocks.0", "decoder_blocks.0", ...
    for b in blocks:
        pre = f"{b}.attn."
        attn = {k[len(pre):]: sd.pop(k) for k in list(sd)
                if k.startswith(pre) and k[len(pre):] not in ("proj.weight", "proj.bias")}  # q/k/v in any form
        if not attn:
            continue
        src = {k: origin.pop(pre + k) for k in attn}
        weight, bias, how = fuse_qkv(attn)
        sd[f"{b}.attn.qkv.weight"] = weight
        origin[f"{b}.attn.qkv.weight"] = " + ".join(v for k, v in src.items() if "weight" in k) + f" ({how})"
        if bias is not None:
            sd[f"{b}.attn.qkv.bias"] = bias
            origin[f"{b}.attn.qkv.bias"] = " + ".join(v for k, v in src.items() if "bias" in k) + f" ({how})"
        for gamma, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            if f"{b}.{gamma}" in sd:
                g, g_src = sd.pop(f"{b}.{gamma}"), origin.pop(f"{b}.{gamma}")  # (D,)
                sd[f"{b}.{layer}.weight"] = g[:, None] * sd[f"{b}.{layer}.weight"]
                sd[f"{b}.{layer}.bias"] = g * sd[f"{b}.{layer}.bias"]
                for part in ("weight", "bias"):
                    origin[f"{b}.{layer}.{part}"] += f" (times layer scale {g_src})"
    if "decoder_embed.weight" in sd and "decoder_embed.bias" not in sd:  # VideoMAE's encoder_to_decoder
        sd["decoder_embed.bias"] = sd["decoder_embed.weight"].new_zeros(sd["decoder_embed.weight"].shape[0])
        origin["decoder_embed.bias"] = "zeros (encoder_to_decoder has no bias)"
    return sd, origin


def _pos_kind(sd: dict[str, Tensor], prefix: str, fixed: str) -> str:
    if f"{prefix}_spatial" in sd:
        return "separable"
    return "joint" if prefix in sd else fixed


def _pos_grid(sd: dict[str, Tensor], prefix: str, kind: str, cls: bool, t: int, p: int,
              want: tuple[int, int, int] | None, path: str) -> tuple[int, int, int]:
    """The token grid (gt, gh, gw) a position table was trained on. A separable table says it;
    a joint one only gives gt*gh*gw, so: the requested grid if it fits, else the released size
    (16 frames of 224 px) if it fits, else the only square factorisation, else an error asking
    for the size. VideoMAE's fixed table is not stored: 16 frames of 224 px, its released size."""
    if kind == "separable":
        hw, gt = sd[f"{prefix}_spatial"].shape[1], sd[f"{prefix}_temporal"].shape[1]
        gh = math.isqrt(hw)
        if gh * gh != hw:
            raise CheckpointError(f"{path}: {prefix}_spatial has {hw} positions, not a square grid")
        return gt, gh, gh
    if kind != "joint":
        return 16 // t, 224 // p, 224 // p
    n = sd[prefix].shape[1] - int(cls)
    options = [(n // (s * s), s, s) for s in range(1, math.isqrt(n) + 1) if n % (s * s) == 0]
    for grid in (want, (16 // t, 224 // p, 224 // p)):
        if grid in options:
            return grid
    if len(options) == 1:
        return options[0]
    raise CheckpointError(f"{path}: {prefix} holds {n} positions, which fit several token grids (t, h, w): "
                          f"{options}; pass the checkpoint's own img_size and num_frames (train.py: "
                          f"--model.encoder.img_size, --model.encoder.num_frames)")


def _heads(width: int, given: int | None, table: dict[int, int], default: int, path: str,
           default_is: str = "the repository's default") -> tuple[int, str]:
    """(heads, where the number comes from): given, the standard table, or the largest count up
    to the repository's default that divides the width."""
    if given:
        if width % given:
            raise CheckpointError(f"{path}: {given} heads do not divide the attention width {width}")
        return given, "as given"
    if width in table:
        return table[width], "the standard table"
    return next(h for h in range(min(default, width), 0, -1) if width % h == 0), default_is


def _mlp_ratio(fc1: Tensor, width: int, key: str, path: str) -> float:
    ratio = fc1.shape[0] / width
    if int(width * ratio) != fc1.shape[0]:
        raise CheckpointError(f"{path}: {key} {tuple(fc1.shape)}: an MLP of {fc1.shape[0]} units on width {width} "
                              f"is not one our Mlp (int(width * ratio)) can build")
    return ratio


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _attn_width(sd: dict[str, Tensor], blk: str) -> int:
    """An attention's inner width (heads x head size), from its q (mae_st) or fused qkv weight."""
    q = sd.get(f"{blk}attn.q.weight")
    return q.shape[0] if q is not None else sd[f"{blk}attn.qkv.weight"].shape[0] // 3


def _qkv_bias(sd: dict[str, Tensor], blk: str) -> bool:
    return any(f"{blk}attn.{b}" in sd for b in ("q.bias", "qkv.bias", "q_bias"))


def published_config(sd: dict[str, Tensor], family: str, path: str, img_size: int | None, num_frames: int | None,
                     num_heads: int | None, decoder_heads: int | None, norm_eps: float | None = None
                     ) -> tuple[MAEConfig, tuple[int, int, int], list[str]]:
    """Our MAEConfig for the renamed (not yet converted) tensors, at the requested clip size
    (None: the checkpoint's own), the checkpoint's own grid (gt, gh, gw), and notes for the report."""
    kernel = sd.get("encoder.patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 5 or kernel.shape[3] != kernel.shape[4]:
        raise CheckpointError(f"{path}: patch_embed.proj.weight should be a Conv3d tubelet kernel (D, C, t, p, p); "
                              f"found {None if kernel is None else tuple(kernel.shape)}")
    D, C, t, p = kernel.shape[:4]
    cls = "encoder.cls_token" in sd
    fixed = "sincos" if family.startswith("videomae") else "none"
    kind = _pos_kind(sd, "encoder.pos_embed", fixed)
    if kind == "none":
        raise CheckpointError(f"{path}: no position table (pos_embed or pos_embed_spatial/temporal) in this "
                              f"mae_st file")
    want = None if img_size is None or num_frames is None else (num_frames // t, img_size // p, img_size // p)
    grid = _pos_grid(sd, "encoder.pos_embed", kind, cls, t, p, want, path)
    frames, size = num_frames or grid[0] * t, img_size or grid[1] * p
    if frames % t:
        raise CheckpointError(f"{path}: clips of {frames} frames do not split into this checkpoint's tubelets of {t} "
                              f"frames (its Conv3d kernel is {tuple(kernel.shape)}; mae_st's released models use "
                              f"t = 2, its code's default is 4): set num_frames (--model.encoder.num_frames) to a "
                              f"multiple of {t}")
    if size % p:
        raise CheckpointError(f"{path}: {size} px clips do not split into this checkpoint's {p}-px patches: set "
                              f"img_size (--model.encoder.img_size) to a multiple of {p}, e.g. "
                              f"{max(p, round(size / p) * p)}")
    blk = "encoder.blocks.0."
    bias, inner = _qkv_bias(sd, blk), _attn_width(sd, blk)
    enc_default, dec_default = _DEFAULT_HEADS[family]
    nh, nh_from = _heads(inner, num_heads, _VIT_HEADS, enc_default, path)
    enc = ViTConfig(img_size=size, num_frames=frames, in_chans=C, patch_size=p, tubelet_size=t, width=D,
                    depth=_count(sd, "encoder.blocks."), num_heads=nh, head_dim=inner // nh,
                    mlp_ratio=_mlp_ratio(sd[f"{blk}mlp.fc1.weight"], D, "blocks.0.mlp.fc1.weight", path),
                    qkv_bias=bias, spt=False, lsa=False, attention="joint", pos_embed=kind, cls_token=cls,
                    # the released models' factories: partial(nn.LayerNorm, eps=1e-6); the bare classes: 1e-5
                    norm_eps=1e-6 if norm_eps is None else norm_eps)
    notes = [f"encoder: width {D}, depth {enc.depth}, {nh} head(s) ({nh_from}; a checkpoint does not store head "
             f"counts), MLP {sd[f'{blk}mlp.fc1.weight'].shape[0]}, q/k/v bias {bias}, cls token {cls}, "
             f"{kind} positions, tubelet {t} x {p} x {p}, {C} channels, LayerNorm eps {enc.norm_eps:g} "
             f"({'as given' if norm_eps is not None else 'as the released models; their classes default to 1e-5'})"]
    if nh_from != "as given" and inner not in _VIT_HEADS:
        notes.append(f"warning: width {inner} is not a published ViT width, so {nh} encoder heads is a guess (the "
                     f"repository's constructor default); a model built with another count computes something "
                     f"else: pass num_heads (--model.encoder.num_heads=N)")
    if family == "mae_st_vit" and not cls:
        notes.append("note: without a cls token mae_st's models_vit still pools x[:, 1:] (it drops the first patch "
                     "token); our `embed` averages every token")
    if family == "videomae_vit" and "encoder.norm.weight" in sd and not any(k.startswith("fc_norm.") for k in sd):
        notes.append("note: no fc_norm, so this VideoMAE model was built with use_mean_pooling=False and its feature "
                     "is norm(x)[:, 0]; our `embed` is norm(mean of the tokens)")
    mask_type = "tube" if family.startswith("videomae") else "random"
    if "decoder_pred.weight" not in sd:  # a fine-tuned ViT: a fresh decoder as the pretraining recipe builds it
        if family == "videomae_vit":
            Dd, t_pred = D // 2, t
            dh = _heads(Dd, decoder_heads, _VIDEOMAE_DECODER_HEADS, dec_default, path)[0]
        else:  # mae_st's recipe: 512 wide, 16 heads, half the frames predicted
            Dd, dh, t_pred = 512, _heads(512, decoder_heads, {}, 16, path)[0], t // 2 if t % 2 == 0 else t
        cfg = MAEConfig(encoder=enc, decoder_width=Dd, decoder_depth=4, decoder_heads=dh, decoder_head_dim=Dd // dh,
                        decoder_mlp_ratio=4.0, decoder_qkv_bias=True, mask_ratio=0.9, mask_type=mask_type,
                        norm_pix_loss=True, pred_t_dim=0 if t_pred == t else t_pred * frames // t)
        notes.append(f"decoder: none in the file; a fresh one as the pretraining recipe builds it (width {Dd}, "
                     f"depth 4, {dh} heads), left at its initial values")
        return cfg, grid, notes
    dblk = "decoder_blocks.0."
    Dd = sd["decoder_embed.weight"].shape[0]
    dinner = _attn_width(sd, dblk)
    table = _VIDEOMAE_DECODER_HEADS if family == "videomae" else {512: 16}  # mae_st's recipe: 512 wide, 16 heads
    if dec_default is None:  # PySlowFast's MSSeparateHead: num_heads = dim_out // 64
        dh, dh_from = _heads(dinner, decoder_heads, {}, max(dinner // 64, 1), path, "PySlowFast: width // 64")
    else:
        dh, dh_from = _heads(dinner, decoder_heads, table, dec_default, path)
    out = sd["decoder_pred.weight"].shape[0]
    t_pred = out // (p * p * C)
    if t_pred < 1 or t_pred * p * p * C != out or t % t_pred:
        raise CheckpointError(f"{path}: decoder_pred predicts {out} numbers per token, which is not a whole number of "
                              f"frames dividing the tubelet of {t} ({p} x {p} x {C} per frame)")
    dkind = _pos_kind(sd, "decoder_pos_embed", "sincos" if family == "videomae" else kind)
    tables = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("decoder_pos_embed")}
    dgrid = _pos_grid(sd, "decoder_pos_embed", dkind, cls, t, p, grid, path) if tables else grid
    if dkind != "sincos" and dgrid != grid:
        raise CheckpointError(f"{path}: the decoder's position tables {tables} are for the token grid {dgrid} "
                              f"(t, h, w), the encoder's for {grid}")
    cfg = MAEConfig(encoder=enc, decoder_width=Dd, decoder_depth=_count(sd, "decoder_blocks."), decoder_heads=dh,
                    decoder_head_dim=dinner // dh,
                    decoder_mlp_ratio=_mlp_ratio(sd[f"{dblk}mlp.fc1.weight"], Dd, "decoder fc1", path),
                    decoder_qkv_bias=_qkv_bias(sd, dblk),
                    mask_ratio=0.9, mask_type=mask_type, norm_pix_loss=True,
                    pred_t_dim=0 if t_pred == t else t_pred * frames // t)
    if dh_from not in ("as given", "the standard table", "PySlowFast: width // 64"):
        notes.append(f"warning: {dh} decoder heads is a guess ({dh_from}) for the attention width {dinner}; pass "
                     f"decoder_heads (--model.decoder_heads=N) if the model was built with another count")
    notes.append(f"decoder: width {Dd}, depth {cfg.decoder_depth}, {dh} head(s) ({dh_from}), {dkind} positions, "
                 f"predicts {t_pred} of every {t} frames"
                 + (f" ({cfg.pred_t_dim} of {frames})" if cfg.pred_t_dim else ""))
    if dkind != kind:
        notes.append(f"positions: the encoder's are {kind} and the decoder's {dkind}; our VideoMAE uses one kind for "
                     f"both, so both become joint tables holding the same numbers (exact at load; during "
                     f"fine-tuning every position then moves on its own)")
    return cfg, grid, notes


def resize_spatial(table: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """(N, gh*gw, D) positions on a gh x gw grid -> (N, gh'*gw', D), bicubic with
    align_corners=False, as mae_st's and DeiT's interpolate_pos_embed. The same size is returned
    unchanged."""
    if tuple(src) == tuple(dst):
        return table
    N, _, D = table.shape
    x = table.reshape(N, src[0], src[1], D).permute(0, 3, 1, 2)  # (N, D, gh, gw)
    x = F.interpolate(x, size=tuple(dst), mode="bicubic", align_corners=False)  # (N, D, gh', gw')
    return x.permute(0, 2, 3, 1).reshape(N, dst[0] * dst[1], D)  # (N, gh'*gw', D)


def resize_temporal(table: Tensor, dst: int) -> Tensor:
    """(N, gt, D) positions over gt time slices -> (N, gt', D), linear with align_corners=False.
    The same size is returned unchanged."""
    if table.shape[1] == dst:
        return table
    x = F.interpolate(table.transpose(1, 2), size=dst, mode="linear", align_corners=False)  # (N, D, gt')
    return x.transpose(1, 2)  # (N, gt', D)


def resize_grid_table(table: Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> Tensor:
    """A joint table (1, gt*gh*gw, D) in (gt, gh, gw) order -> (1, gt'*gh'*gw', D): each time
    slice resized in space (bicubic), then each position in time (linear)."""
    gt, gh, gw = src
    x = resize_spatial(table.reshape(gt, gh * gw, -1), (gh, gw), dst[1:])  # (gt, hw', D)
    x = resize_temporal(x.transpose(0, 1), dst[0]).transpose(0, 1)  # (gt', hw', D)
    return x.reshape(1, dst[0] * dst[1] * dst[2], -1)  # (1, L', D)


def resize_positions(sd: dict[str, Tensor], prefix: str, kind: str, cls: bool, src: tuple[int, int, int],
                     dst: tuple[int, int, int]) -> list[str]:
    """Resize one learned position table in place (separable or joint; the class position is
    kept); -> report lines. Fixed sin-cos tables are rebuilt by the model for its own grid."""
    if src == dst or kind not in ("separable", "joint") or not any(k.startswith(prefix) for k in sd):
        return []
    (gt, gh, gw), (gt2, gh2, gw2) = src, dst
    if kind == "separable":
        sd[f"{prefix}_spatial"] = resize_spatial(sd[f"{prefix}_spatial"], (gh, gw), (gh2, gw2))
        sd[f"{prefix}_temporal"] = resize_temporal(sd[f"{prefix}_temporal"], gt2)
        return ([f"{prefix}_spatial {gh}x{gw} -> {gh2}x{gw2} (bicubic)"] if (gh, gw) != (gh2, gw2) else []) + \
            ([f"{prefix}_temporal {gt} -> {gt2} (linear)"] if gt != gt2 else [])
    n = int(cls)
    table = sd[prefix]
    sd[prefix] = torch.cat([table[:, :n], resize_grid_table(table[:, n:], src, dst)], dim=1)
    return [f"{prefix} {gt}x{gh}x{gw} -> {gt2}x{gh2}x{gw2} (bicubic in space, linear in time"
            f"{', class position kept' if cls else ''})"]


def joint_positions(sd: dict[str, Tensor], prefix: str, kind: str, cls: bool, grid: tuple[int, int, int],
                    dim: int) -> None:
    """Replace one position table, in place, by the joint table (1, [1+]L, D) holding the same
    numbers: a separable one summed out (the class position first), VideoMAE's sin-cos one
    written down. A joint one is left as it is."""
    if kind == "separable":
        table = separable_pos_embed(sd.pop(f"{prefix}_spatial"), sd.pop(f"{prefix}_temporal"))  # (1, L, D)
        sd[prefix] = torch.cat([sd.pop(f"{prefix}_class"), table], dim=1) if cls else table  # (1, [1+]L, D)
    elif kind == "sincos":
        sd[prefix] = sincos_videomae(grid[0] * grid[1] * grid[2], dim)  # (1, L, D)


def _grouped(origin: dict[str, str]) -> list[str]:
    """'our key <- file key' lines, one per kind of block parameter: blocks.{i} (i = 0-23)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for ours, src in origin.items():
        m = re.search(r"blocks\.(\d+)\.", ours)
        if m is None:
            groups[(ours, src)] = []
            continue
        i = m.group(1)  # the block index, written {i} in both keys (PySlowFast's decoder: transforms.0.i)
        kind = tuple(re.sub(rf"(blocks|transforms\.0)\.{i}\.", r"\1.{i}.", key) for key in (ours, src))
        groups.setdefault(kind, []).append(int(i))
    lines = []
    for (ours, src), idx in groups.items():
        if len(idx) == 1:
            ours, src = ours.replace("{i}", str(idx[0])), src.replace("{i}", str(idx[0]))
        lines.append(f"  {ours} <- {src}" + (f"  (i = {min(idx)}-{max(idx)})" if len(idx) > 1 else ""))
    return lines


def _summary(keys: list[str]) -> list[str]:
    """Every key when there are a few; else one entry per module: "decoder_blocks.* (48 tensors)"."""
    if len(keys) <= 12:
        return keys
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:2 if k.startswith("encoder.") else 1]), []).append(k)
    return [ks[0] if len(ks) == 1 else f"{head}.* ({len(ks)} tensors)" for head, ks in groups.items()]


def fit_positions(state: dict[str, Tensor], origin: dict[str, str], cfg: MAEConfig, family: str,
                  src_grid: tuple[int, int, int]) -> list[str]:
    """Resize the learned position tables from the checkpoint's grid to cfg's, in place; where
    the encoder's and the decoder's tables are of different kinds (PySlowFast: separable and
    joint), make both joint, since our VideoMAE uses one kind for both. -> report lines."""
    enc = cfg.encoder
    grid = (enc.num_frames // enc.tubelet_size, enc.img_size // enc.patch_size, enc.img_size // enc.patch_size)
    dkind = _pos_kind(state, "decoder_pos_embed", "sincos" if family == "videomae" else enc.pos_embed)
    lines = []
    for prefix, kind in (("encoder.pos_embed", enc.pos_embed), ("decoder_pos_embed", dkind)):
        lines += [f"resized: {r}" for r in resize_positions(state, prefix, kind, enc.cls_token, src_grid, grid)]
    if "decoder_pred.weight" not in state or dkind == enc.pos_embed:
        return lines
    for prefix, kind, dim in (("encoder.pos_embed", enc.pos_embed, enc.width),
                              ("decoder_pos_embed", dkind, cfg.decoder_width)):
        if kind != "joint":
            parts = [origin.pop(k) for k in (f"{prefix}_class", f"{prefix}_spatial", f"{prefix}_temporal")
                     if k in origin]
            joint_positions(state, prefix, kind, enc.cls_token, grid, dim)
            origin[prefix] = (" + ".join(parts) + " (summed into one joint table)" if parts else
                              "VideoMAE's fixed sin-cos table, written down as a learned joint table")
    enc.pos_embed = "joint"
    return lines


def check_published_shapes(state: dict[str, Tensor], origin: dict[str, str], cfg: MAEConfig, path: str) -> list[str]:
    """Every tensor against our VideoMAE built from cfg (on the meta device: no memory): a
    CheckpointError naming the file's key, ours and both shapes at the first difference.
    -> every key of our model's state dict, in its order."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in VideoMAE(cfg).state_dict().items()}
    for key, value in state.items():
        if key not in want:
            raise CheckpointError(f"{path}: {origin.get(key, key)} maps to {key}, which our model built from this "
                                  f"file's shapes does not have")
        if value.shape != want[key]:
            hint = ("patch size and tubelet (the Conv3d kernel is (D, C, t, p, p))" if "patch_embed" in key else
                    "pred_t_dim and the tubelet" if "decoder_pred" in key else
                    "num_frames / tubelet_size and img_size / patch_size" if "pos_embed" in key else
                    "the file's other tensors")
            raise CheckpointError(f"{path}: {origin.get(key, key)} -> {key}: shape {tuple(value.shape)} in the file, "
                                  f"{tuple(want[key])} in our model (set from {hint})")
    return list(want)


def published_report(path: str, family: str, n: int, found: str, cfg: MAEConfig, src_grid: tuple[int, int, int],
                     lines: list[str], origin: dict[str, str], ignored: dict[str, str], missing: list[str]) -> str:
    """What load_published did, for a person: the architecture it read, the clip grids, what
    was resized, every tensor mapped (block parameters one line per kind), ignored and missing."""
    enc = cfg.encoder
    (gt, gh, gw), t, p = src_grid, enc.tubelet_size, enc.patch_size
    assumed = ", assumed: VideoMAE does not store its table" if enc.pos_embed == "sincos" else ""
    out = [f"{path}: {PUBLISHED_FAMILIES[family]}; {n} tensors {found}"]
    out += [ln for ln in lines if not ln.startswith("resized:")]
    out.append(f"clips: the checkpoint's grid {gt}x{gh}x{gw} ({gt * t} frames of {gh * p} px{assumed}) -> ours "
               f"{enc.num_frames // t}x{enc.img_size // p}x{enc.img_size // p} ({enc.num_frames} frames of "
               f"{enc.img_size} px)")
    out += [ln for ln in lines if ln.startswith("resized:")]
    if enc.pos_embed == "sincos":
        out.append("fixed sin-cos positions: rebuilt for our grid (VideoMAE rebuilds them for any size too)")
    out += {"videomae": ["note: VideoMAE's pixel targets are normalised per channel within a patch; our "
                         "norm_pix_loss normalises over the whole patch, so its decoder starts in a slightly "
                         "different target space"],
            "mae_st_slowfast": ["note: PySlowFast's targets are every t-th frame (0, 2, ..., 14); ours are mae_st's "
                                "linspace(0, T-1, pred_t_dim) (0, 2, ..., 12, 15)"],
            "videomae_vit": ["note: fc_norm -> encoder.norm: VideoMAE pools the tokens, then applies fc_norm, which "
                             "is what our `embed` does"]}.get(family, [])
    out.append(f"mapped {len(origin)} tensors (our key <- file key):")
    out += _grouped(origin)
    for why in dict.fromkeys(ignored.values()):
        keys = [k for k, w in ignored.items() if w == why]
        out.append(f"ignored {len(keys)} ({why}): {', '.join(keys)}")
    reasons = {"decoder_cls_token": "PySlowFast's decoder carries the encoder's own cls output instead"} \
        if family == "mae_st_slowfast" else {}
    out.append(f"missing {len(missing)} (left at their initial values): " +
               ", ".join(k + (f" ({reasons[k]})" if k in reasons else "") for k in _summary(missing))
               if missing else "missing: none")
    return "\n".join(out)


def load_published(path: str, ck: dict, img_size: int | None = None, num_frames: int | None = None,
                   num_heads: int | None = None, decoder_heads: int | None = None, norm_eps: float | None = None
                   ) -> tuple[MAEConfig, dict, str]:
    """A published video MAE checkpoint as (our MAEConfig, a state dict for our VideoMAE, a report).

    ck: the dict from stmeta.load_checkpoint(path). img_size / num_frames: the clips the model
    will see (None: the checkpoint's own, 224 px and 16 frames for the released models); learned
    position tables are resized to that grid. num_heads / decoder_heads: the attention head
    counts, which a checkpoint does not store (None: the published table). norm_eps: the
    LayerNorms' epsilon, not stored either (None: 1e-6, as the released models). The state holds every
    tensor the file gives, in our form; the report lists what was mapped, ignored and missing.
    Any inconsistency raises stmeta.CheckpointError naming the file, the key and the shapes.
    """
    sd, found = published_state_dict(ck, path)
    family = published_family(sd, path)
    named, origin, ignored = rename_published(sd, family, path)
    cfg, src_grid, notes = published_config(named, family, path, img_size, num_frames, num_heads, decoder_heads,
                                            norm_eps)
    state, origin = convert_published(named, origin)
    notes += fit_positions(state, origin, cfg, family, src_grid)
    keys = check_published_shapes(state, origin, cfg, path)
    missing = [k for k in keys if k not in state]
    state = {k: state[k] for k in keys if k in state}  # in our model's order
    origin = {k: origin[k] for k in state}
    report = published_report(path, family, len(sd), found, cfg, src_grid, notes, origin, ignored, missing)
    return cfg, state, report
