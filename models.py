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
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stmeta import MAEConfig, MANNConfig, ViTConfig

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

    def forward(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """video (B, C, T, H, W) -> (B, L', D); ids_keep (B, L') embeds only those tokens."""
        x = patchify(video, self.tubelet, self.patch)  # (B, L, P)
        return self.proj(gather_tokens(x, ids_keep))  # (B, L', D)


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

    def forward(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """video (B, C, T, H, W) -> (B, L', D); the shifts see the whole frame, the norm and
        projection only the kept tokens (masked tokens cost nothing)."""
        x = shift_stack(video, self.shifts)  # (B, 5C, T, H, W)
        x = patchify(x, self.tubelet, self.patch)  # (B, L, 5P)
        return self.proj(self.norm(gather_tokens(x, ids_keep)))  # (B, L', D)


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
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)
        if lsa:  # Lee et al. call it `scale`: it multiplies the logits
            self.temperature = nn.Parameter(torch.full((num_heads,), head_dim ** -0.5))
        self.fast = True  # F.scaled_dot_product_attention; False: attention_reference

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, L, hs)
        p = self.attn_dropout if self.training else 0.0
        mask_diagonal = self.lsa and L > 1
        if not self.fast:
            scale = self.temperature if self.lsa else self.head_dim ** -0.5
            out = attention_reference(q, k, v, scale, mask_diagonal, p)  # (B, nh, L, hs)
        elif self.lsa:
            q = q * self.temperature.to(q.dtype).view(1, -1, 1, 1)  # (B, nh, L, hs): temperature folded into q
            allowed = ~torch.eye(L, dtype=torch.bool, device=x.device) if mask_diagonal else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.head_dim ** -0.5)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, nh*hs)
        return self.proj_drop(self.proj(out))  # (B, L, D)


def set_fast_attention(module: nn.Module, fast: bool) -> None:
    """Switch every Attention in `module` between the fused kernel and the written-out one."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fast = fast


# -----------------------------------------------------------------------------
# Transformer block: pre-norm, joint or divided space-time attention (TimeSformer sec. 3)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p,
    scaling the kept ones by 1/(1-p). x (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)  # (B, 1, ..)
    return x * keep / (1 - p)


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

    def embed(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, D): mean over tokens (cls excluded), then the final norm, as
        mae_st's fine-tuning ViT pools. The Classifier's features, and stage 3's embedding."""
        x = self.forward_features(video)[:, int(self.cfg.cls_token):]  # (B, L, D)
        return self.norm(x.mean(dim=1))  # (B, D)


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
        self.decoder_pred = nn.Linear(Dd, self.t_pred * enc.patch_size ** 2 * enc.in_chans)
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
        """The pixels each token predicts: (target (B, L, P'), mean, var (B, L, 1)); per-patch
        normalised when norm_pix_loss (mean and var are then the patch's own statistics)."""
        T = video.shape[2]
        if self.pred_frames != T:  # mae_st: pred_t_dim frames evenly spread over the clip
            idx = torch.linspace(0, T - 1, self.pred_frames, device=video.device).long()
            video = video.index_select(2, idx)  # (B, C, T', H, W)
        target = patchify(video, self.t_pred, self.cfg.encoder.patch_size)  # (B, L, P')
        mean = target.mean(dim=-1, keepdim=True)  # (B, L, 1)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as mae_st
        if self.cfg.norm_pix_loss:
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target, mean, var

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
        if self.cfg.norm_pix_loss:
            pred = pred * (var + 1e-6) ** 0.5 + mean
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
        loss. T' as in `reconstruct`. The paper's Table 3 reads this at every 20th frame."""
        pred, mask, ratio = self._predict(video, mask_ratio, generator)
        target, _, _ = self.target(video)
        B, C, T, H, W = video.shape
        p = self.cfg.encoder.patch_size
        err = unpatchify((pred - target) ** 2, self.t_pred, p, C, self.pred_frames, H, W)  # (B, C, T', H, W)
        if ratio == 0:
            return err.mean(dim=(1, 3, 4))  # (B, T')
        weight = unpatchify(mask[:, :, None].expand(-1, -1, self.t_pred * p * p * C), self.t_pred, p, C,
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
    dot = torch.einsum("bhm,bnm->bhn", key, memory)  # (B, nh, N)
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
    return torch.einsum("bhn,bnm->bhm", w, memory)


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


def lrua_write(memory: Tensor, usage_prev: Tensor, read_weights_prev: Tensor, alpha: Tensor, key: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Least recently used access (Santoro sec. 3.2), nh heads at once.

    w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}, with w^lu_{t-1} the
    nh least-used slots of w^u_{t-1}; the single least-used slot is cleared, then
    M_t(i) = M_{t-1}(i) + sum_h w^w_{t,h}(i) k_{t,h}.
    memory (B, N, M), usage_prev (B, N), read_weights_prev (B, nh, N), alpha (B, nh)
    (a logit), key (B, nh, M) -> (memory (B, N, M), write weights (B, nh, N)).
    """
    nh = key.shape[1]
    w_lu = least_used(usage_prev, nh)[:, None, :]  # (B, 1, N)
    a = torch.sigmoid(alpha)[..., None]  # (B, nh, 1)
    w_write = a * read_weights_prev + (1 - a) * w_lu  # (B, nh, N)
    cleared = memory * (1 - least_used(usage_prev, 1))[..., None]  # (B, N, M)
    return cleared + torch.einsum("bhn,bhm->bnm", w_write, key), w_write


def lrua_usage(usage_prev: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """w^u_t = gamma w^u_{t-1} + sum_h w^r_{t,h} + sum_h w^w_{t,h} (Santoro sec. 3.2). (B, N)."""
    return gamma * usage_prev + read_weights.sum(dim=1) + write_weights.sum(dim=1)


# -----------------------------------------------------------------------------
# MANN: controller, heads, the network


class LSTMController(nn.Module):
    """One LSTM step, written out: the four gates from a single matrix product."""

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)
        bound = hidden_size ** -0.5  # torch.nn.LSTM's initialisation ...
        nn.init.uniform_(self.gates.weight, -bound, bound)
        nn.init.zeros_(self.gates.bias)
        with torch.no_grad():  # ... with a positive forget-gate bias, so memory is kept early on
            self.gates.bias[hidden_size:2 * hidden_size] = forget_bias

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, in), h, c (B, Hc) -> new (h, c)."""
        i, f, g, o = self.gates(torch.cat([x, h], dim=-1)).chunk(4, dim=-1)  # 4 x (B, Hc)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ReadHead(nn.Module):
    """nh read heads: a key (tanh) and a key strength beta (softplus) each; content
    addressing by cosine similarity, then a weighted read."""

    def __init__(self, controller_size: int, n_heads: int, slot_dim: int):
        super().__init__()
        self.n_heads, self.slot_dim = n_heads, slot_dim
        self.fc = nn.Linear(controller_size, n_heads * (slot_dim + 1))

    def key(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, Hc) -> key (B, nh, M), beta (B, nh)."""
        out = self.fc(h).view(h.shape[0], self.n_heads, self.slot_dim + 1)  # (B, nh, M+1)
        return torch.tanh(out[..., :-1]), F.softplus(out[..., -1])

    def forward(self, memory: Tensor, key: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """-> read weights (B, nh, N), read vectors (B, nh, M)."""
        w = content_addressing(key, memory, beta)
        return w, memory_read(w, memory)


class LRUAWriteHead(nn.Module):
    """Santoro's write: each head writes its read key to a sigmoid-gated mix of the slots
    it read last step and the least-used slots."""

    def __init__(self, controller_size: int, n_heads: int):
        super().__init__()
        self.alpha = nn.Linear(controller_size, n_heads)

    def forward(self, h: Tensor, key: Tensor, memory: Tensor, usage: Tensor, read_weights_prev: Tensor
                ) -> tuple[Tensor, Tensor]:
        """-> (memory (B, N, M), write weights (B, nh, N))."""
        return lrua_write(memory, usage, read_weights_prev, self.alpha(h), key)


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
    read by content, written by LRUA or by NTM heads; logits from [controller, reads]."""

    def __init__(self, cfg: MANNConfig, input_dim: int, n_way: int):
        super().__init__()
        if cfg.write not in ("lrua", "ntm"):
            raise ValueError(f"unknown MANN write {cfg.write!r}; choose lrua or ntm")
        self.cfg, self.n_way = cfg, n_way
        nh, M, Hc = cfg.read_heads, cfg.slot_dim, cfg.controller_size
        self.input_proj = nn.Linear(input_dim, cfg.input_proj) if cfg.input_proj > 0 else nn.Identity()
        x_dim = cfg.input_proj if cfg.input_proj > 0 else input_dim
        self.controller = LSTMController(x_dim + n_way + nh * M, Hc)
        self.read_head = ReadHead(Hc, nh, M)
        if cfg.write == "lrua":
            self.write_head = LRUAWriteHead(Hc, nh)
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

    def step(self, x: Tensor, y: Tensor, state: MANNState) -> tuple[Tensor, MANNState]:
        """One time step: x (B, in), y (B, K) label one-hot (zeros = no label) -> logits (B, K).
        Order: controller; write (from t-1 weights); read M_t by content; usage update."""
        B = x.shape[0]
        inputs = torch.cat([x, y, state.reads.flatten(1)], dim=-1)  # (B, in + K + nh*M)
        h, c = self.controller(inputs, state.h, state.c)  # (B, Hc) each
        key, beta = self.read_head.key(h)  # (B, nh, M), (B, nh)
        if self.cfg.write == "lrua":
            memory, w_write = self.write_head(h, key, state.memory, state.usage, state.read_weights)
        else:
            memory, w_write = self.write_head(h, state.memory, state.write_weights)
        w_read, reads = self.read_head(memory, key, beta)  # (B, nh, N), (B, nh, M)
        usage = lrua_usage(state.usage, w_read, w_write, self.cfg.gamma)
        logits = self.out(torch.cat([h, reads.reshape(B, -1)], dim=-1))  # (B, K)
        return logits, MANNState(h, c, memory, w_read, reads, w_write, usage)

    def forward(self, x: Tensor, label_in: Tensor, state: MANNState | None = None) -> tuple[Tensor, MANNState]:
        """x (B, S, input_dim) clip embeddings; label_in (B, S) long, the label shown with
        each step, -1 for none. -> (logits (B, S, K), final state).

        Both layouts of an episode: support/query (support steps carry their own label,
        queries -1) and Santoro's sequence (label_in[:, t] = y_{t-1}, -1 at t = 0).
        A new episode starts from `initial_state` (state=None)."""
        B, S, _ = x.shape
        if label_in.shape != (B, S):
            raise ValueError(f"label_in must be (B, S) = ({B}, {S}); got {tuple(label_in.shape)}")
        if label_in.numel() and (label_in.min() < -1 or label_in.max() >= self.n_way):
            raise ValueError(f"labels must lie in -1..{self.n_way - 1}; got {label_in.min()}..{label_in.max()}")
        state = self.initial_state(x) if state is None else state
        x = self.input_proj(x)  # (B, S, in')
        y = F.one_hot(label_in.clamp_min(0), self.n_way).to(x.dtype) * (label_in >= 0)[..., None]  # (B, S, K)
        logits = []
        for t in range(S):
            out, state = self.step(x[:, t], y[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1), state  # (B, S, K)


# -----------------------------------------------------------------------------
# Backbones for stage 3


BACKBONES = ("mae", "scratch", "pixels")


class Backbone(nn.Module):
    """Clip batch (B, C, T, H, W) -> embeddings (B, out_dim). "mae" and "scratch" wrap a
    VideoViT as `vit` (its `embed`; the caller loads MAE weights or not); "pixels"
    average-pools each frame to pixels_size^2 and flattens over T (Santoro's setting: raw pixels)."""

    def __init__(self, kind: str, vit_cfg: ViTConfig, pixels_size: int = 8):
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")
        self.kind, self.pixels_size = kind, pixels_size
        if kind == "pixels":
            self.vit = None
            self.out_dim = vit_cfg.in_chans * vit_cfg.num_frames * pixels_size ** 2
        else:
            self.vit = VideoViT(vit_cfg)
            self.out_dim = vit_cfg.width

    def forward(self, video: Tensor) -> Tensor:
        if self.vit is None:
            T, s = video.shape[2], self.pixels_size
            return F.adaptive_avg_pool3d(video, (T, s, s)).flatten(1)  # (B, C*T*s*s)
        return self.vit.embed(video)  # (B, D)


def build_backbone(kind: str, vit_cfg: ViTConfig, pixels_size: int = 8) -> Backbone:
    """The stage-3 backbone of one kind (see Backbone)."""
    return Backbone(kind, vit_cfg, pixels_size)


class MetaLearner(nn.Module):
    """Stage 3 as one module (one state dict): the backbone, a LayerNorm on its embeddings
    (pixels and ViT features differ in scale), and the MANN. The backbone is called on its
    own (`.backbone(video)`), so frozen embeddings can be computed once and cached."""

    def __init__(self, backbone: Backbone, mann: MANN):
        super().__init__()
        self.backbone = backbone
        self.norm = nn.LayerNorm(backbone.out_dim)
        self.mann = mann

    def forward(self, x: Tensor, label_in: Tensor, state: MANNState | None = None) -> tuple[Tensor, MANNState]:
        """x (B, S, out_dim) embeddings from the backbone; as MANN.forward otherwise."""
        return self.mann(self.norm(x), label_in, state)
