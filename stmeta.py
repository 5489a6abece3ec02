"""stmeta: the shared spine of the project.

Config dataclasses and named presets (the paper's Tables 1 and 2 as defaults), the
`--key=value` override parser, device / precision / DDP set-up, seeding, atomic checkpoint
save and safe (`weights_only=True`) load, the JSON-lines logger with its terminal progress
line, and the few PNG pictures we draw with pillow.

Paper: Waseem & Muthukumar, "Semi-Supervised Meta Learning for Spatiotemporal Learning".
Model papers the configs describe: SPT/LSA 2112.13492, MAE-ST 2205.09113, VideoMAE
2203.12602, TimeSformer 2102.05095, NTM 1410.5401, MANN 1605.06065.

This file imports nothing else of the project; data.py, models.py, train.py and eval.py
import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Kinetics pixel statistics, as mae_st and VideoMAE normalise video (0..1 scale).
MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)

# -----------------------------------------------------------------------------
# Model configs


@dataclass
class ViTConfig:
    """A video ViT encoder (also used for the MAE decoder's block stack widths)."""

    img_size: int = 64  # paper 4.1: 64x64 clips
    num_frames: int = 16  # Table 1 / mae_st: 16 frames sampled ...
    in_chans: int = 3
    patch_size: int = 8  # p: p x p pixels per token
    tubelet_size: int = 2  # t: frames per token
    width: int = 192  # D, the authors' small ViT
    depth: int = 9
    num_heads: int = 12
    head_dim: int = 16  # attention inner width = num_heads * head_dim (need not equal D)
    mlp_ratio: float = 2.0
    qkv_bias: bool = False  # the authors' SPT/LSA ViT has no q/k/v bias; mae_st has one
    spt: bool = True  # shifted patch tokenization (Lee et al. 2021)
    # Lee et al.'s code: 4 diagonal shifts by p/2 ("diagonal_half", the default); the seed
    # paper's authors' code: 4 cardinal shifts by p/2 ("cardinal_half"); vit-pytorch: 4
    # cardinal shifts by 1 pixel ("cardinal_1").
    spt_shift: str = "diagonal_half"
    lsa: bool = True  # locality self-attention: learnable temperature + masked diagonal
    attention: str = "joint"  # "joint" space-time (MAE-ST) | "divided" (TimeSformer)
    pos_embed: str = "separable"  # "separable" learnable space + time (mae_st) | "sincos" fixed 3-D (VideoMAE)
    cls_token: bool = False
    drop_path: float = 0.0
    dropout: float = 0.0  # on the attention projection and MLP outputs
    attn_dropout: float = 0.0
    norm_eps: float = 1e-6


@dataclass
class MAEConfig:
    """A video masked autoencoder: an encoder ViT plus a narrower decoder."""

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder_width: int = 96  # the authors' decoder
    decoder_depth: int = 3
    decoder_heads: int = 16
    decoder_head_dim: int = 16  # inner width 256, wider than the decoder itself
    decoder_mlp_ratio: float = 2.0
    decoder_qkv_bias: bool = False
    mask_ratio: float = 0.9  # MAE-ST's default; 0.8 and 0 (plain autoencoder) in section 4
    mask_type: str = "random"  # "random" (MAE-ST) | "tube" (VideoMAE; required with divided attention)
    norm_pix_loss: bool = True  # per-patch normalised target (MAE, VideoMAE)
    pred_t_dim: int = 0  # frames the decoder predicts; 0 = all (mae_st predicts 8 of 16)


@dataclass
class MANNConfig:
    """Santoro et al. 2016 memory-augmented network; defaults are theirs (section 4)."""

    controller_size: int = 200  # LSTM units
    n_slots: int = 128
    slot_dim: int = 40
    read_heads: int = 4
    write: str = "lrua"  # "lrua" (Santoro) | "ntm" (Graves et al. 2014)
    gamma: float = 0.95  # LRUA usage decay
    shift_range: int = 1  # NTM circular shift over {-1, 0, +1}
    input_proj: int = 0  # >0: project the clip embedding to this width before the LSTM


# -----------------------------------------------------------------------------
# Training configs (one per stage), and the data they read


@dataclass
class DataConfig:
    """How clips are drawn from the cache. Input size and frame count come from the model."""

    sampling_rate: int = 4  # Table 1: every 4th cached frame (10 FPS cache -> 2.5 FPS)
    rand_augment: str = ""  # e.g. "rand-m7-mstd0.5-inc1" (Table 1); "" = off (Table 2)
    random_erase: float = 0.0  # probability; Table 2: 0.25
    scale_min: float = 0.5  # random resized crop scale range (train only)
    hflip: bool = True
    num_views: int = 1  # evaluation: K evenly spaced temporal windows, logits averaged
    workers: int = 2
    labeled_fraction: float = 1.0  # semi-supervised: keep this fraction of labels per class


@dataclass
class PretrainConfig:
    """MAE pretraining (stage 1, and the first half of stage 2). mae_st's recipe."""

    epochs: int = 50
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 8
    blr: float = 1.6e-3  # mae_st: lr = blr * effective batch / 256
    lr: float = 0.0  # >0: absolute lr, ignores blr
    weight_decay: float = 0.05
    beta2: float = 0.95  # mae_st uses betas (0.9, 0.95)
    warmup_epochs: int = 5
    accum_steps: int = 1
    clip_grad: float = 0.0  # 0 = off
    eval_every: int = 0  # steps; 0 = once per epoch
    ckpt_every: int = 0  # steps; 0 = once per epoch


@dataclass
class FinetuneConfig:
    """Encoder + classification head. Defaults: Table 2 (training from scratch)."""

    epochs: int = 50  # Table 2
    max_steps: int = 0
    batch_size: int = 4  # Table 2
    lr: float = 1e-3  # Table 2
    blr: float = 0.0  # Table 1 gives a base lr (0.0024): lr = blr * effective batch / 256
    weight_decay: float = 0.005  # Table 2
    beta2: float = 0.999
    warmup_epochs: int = 10  # Table 2
    layer_decay: float = 1.0  # Table 1: 0.75 (only meaningful for a pretrained encoder)
    drop_path: float = 0.1  # Table 2 "rate of stochastic depth"
    head_dropout: float = 0.0  # Table 1: 0.5
    mixup: float = 0.5  # Table 2: mixup alpha
    cutmix: float = 0.0
    mixup_prob: float = 1.0  # Table 2 "mixup interpolation coefficient 1.0"
    label_smoothing: float = 0.1  # Tables 1 and 2
    accum_steps: int = 1
    clip_grad: float = 0.0
    eval_every: int = 0
    ckpt_every: int = 0


@dataclass
class MetaConfig:
    """Stage 3: episodes for the MANN."""

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 1  # queries per class in the support/query layout
    layout: str = "support_query"  # "support_query" | "sequence" (Santoro: x_t with y_{t-1})
    seq_shots: int = 10  # sequence layout: presentations per class
    backbone: str = "mae"  # "mae" | "scratch" (meta-learning only ablation) | "pixels" (Santoro)
    freeze_backbone: bool = True  # frozen: embeddings computed once and cached
    pixels_size: int = 8  # "pixels" backbone: frames downsampled to this many pixels a side
    steps: int = 20000
    batch_size: int = 16  # episodes per step
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # end-to-end fine-tuning of the backbone
    weight_decay: float = 0.0
    warmup_steps: int = 500
    clip_grad: float = 1.0
    accum_steps: int = 1
    eval_every: int = 1000
    ckpt_every: int = 1000
    val_episodes: int = 200  # during training, from held-out classes
    test_episodes: int = 1000  # final evaluation
    pretrain_steps: int = 0  # when no --pretrained: MAE pretraining steps first (0 = pretrain.epochs)


@dataclass
class Config:
    """Everything one run needs; saved in every checkpoint, so a model can be rebuilt."""

    preset: str = "paper"
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA if supported) | "bf16" | "fp16" | "fp32"
    compile: bool = False
    model: MAEConfig = field(default_factory=MAEConfig)
    mann: MANNConfig = field(default_factory=MANNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)


# -----------------------------------------------------------------------------
# Presets: named functions; parameter counts are checked by tests/test_models.py


def mae_paper_count() -> MAEConfig:
    """The configuration behind the paper's "3,109,008 parameters" (section 4.1):
    patch 4, tubelet 1, no SPT, no LSA. 3,109,008 weights and biases in its layers."""
    enc = ViTConfig(patch_size=4, tubelet_size=1, spt=False, lsa=False)
    return MAEConfig(encoder=enc)


def mae_paper() -> MAEConfig:
    """The paper's small SPT/LSA video MAE at 64x64, 16 frames, patch 8, tubelet 2
    (512 tokens). ~3.2 M parameters; its encoder + 26-class head ~2.7 M (section 5)."""
    return MAEConfig(encoder=ViTConfig())


def mae_cpu() -> MAEConfig:
    """A CPU demo MAE: 32x32, 8 frames, patch 8, tubelet 2 (64 tokens), width 128."""
    enc = ViTConfig(img_size=32, num_frames=8, patch_size=8, tubelet_size=2, width=128, depth=4,
                    num_heads=4, head_dim=32, mlp_ratio=2.0)
    return MAEConfig(encoder=enc, decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_head_dim=16,
                     mask_ratio=0.75)


def mae_tiny() -> MAEConfig:
    """For tests: 16x16, 4 frames, patch 4, tubelet 2 (32 tokens), width 32, depth 2."""
    enc = ViTConfig(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, width=32, depth=2,
                    num_heads=2, head_dim=16, mlp_ratio=2.0)
    return MAEConfig(encoder=enc, decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_head_dim=8,
                     mask_ratio=0.75)


def vit_published(size: str, **overrides) -> ViTConfig:
    """Standard ViT widths for published video MAE checkpoints (mae_st, VideoMAE):
    patch 16, tubelet 2, 224 px, 16 frames, MLP ratio 4, q/k/v with bias, no SPT/LSA.
    B 768/12/12 (~86 M), L 1024/24/16 (~303 M), H 1280/32/16 (~632 M, patch 14), S 384/12/6."""
    widths = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "H": (1280, 32, 16)}
    if size not in widths:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(widths)}")
    width, depth, heads = widths[size]
    cfg = ViTConfig(img_size=224, num_frames=16, patch_size=14 if size == "H" else 16, tubelet_size=2,
                    width=width, depth=depth, num_heads=heads, head_dim=width // heads, mlp_ratio=4.0,
                    qkv_bias=True, spt=False, lsa=False, attention="joint", pos_embed="separable")
    return dataclasses.replace(cfg, **overrides)


def preset_paper() -> Config:
    """The paper's settings (for CUDA): the 3.2 M SPT/LSA MAE, Tables 1-2, Santoro's MANN."""
    return Config(preset="paper", model=mae_paper())


def preset_cpu() -> Config:
    """A demo that runs end to end on a 2-core CPU in minutes: small MAE, short schedules."""
    return Config(
        preset="cpu",
        model=mae_cpu(),
        mann=MANNConfig(controller_size=128, n_slots=64, slot_dim=40, read_heads=4),
        data=DataConfig(sampling_rate=2, workers=2),
        pretrain=PretrainConfig(epochs=4, batch_size=16, blr=1.5e-3 * 256 / 16 / 16, warmup_epochs=1),
        finetune=FinetuneConfig(epochs=4, batch_size=16, warmup_epochs=1),
        meta=MetaConfig(steps=1500, batch_size=16, warmup_steps=100, eval_every=250, ckpt_every=250,
                        val_episodes=200, test_episodes=1000),
    )


def preset_tiny() -> Config:
    """For tests: everything a few seconds long."""
    return Config(
        preset="tiny",
        model=mae_tiny(),
        mann=MANNConfig(controller_size=32, n_slots=16, slot_dim=8, read_heads=2),
        data=DataConfig(sampling_rate=1, workers=0),
        pretrain=PretrainConfig(epochs=1, max_steps=4, batch_size=4, lr=1e-3, warmup_epochs=0),
        finetune=FinetuneConfig(epochs=1, max_steps=4, batch_size=4, warmup_epochs=0),
        meta=MetaConfig(steps=6, batch_size=4, warmup_steps=1, eval_every=3, ckpt_every=3, val_episodes=8,
                        test_episodes=16),
    )


PRESETS = {"paper": preset_paper, "cpu": preset_cpu, "tiny": preset_tiny}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
