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

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    # "separable": learnable space + time (mae_st's default); "joint": one learnable vector per token
    # (mae_st, sep_pos_embed=False); "sincos": fixed, VideoMAE's table, a 1-D sinusoid over the flat
    # token index; "sincos3d": fixed, factorised over (t, h, w). The fixed ones are not in the state dict.
    pos_embed: str = "separable"
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
    # norm_pix_loss divides by sqrt(var + norm_pix_eps), var in normalised-pixel units. MAE,
    # mae_st and VideoMAE use 1e-6: a flat patch's pixel noise becomes a unit-variance target.
    norm_pix_eps: float = 1e-6
    pred_t_dim: int = 0  # frames the decoder predicts; 0 = all (mae_st predicts 8 of 16)
    # Motion targets (as MotionMAE, Yang et al. 2022): each masked token also predicts its frame
    # differences (frame t minus frame t-1 of the predicted frames, 0 for the first), normalised
    # like the pixels; the loss averages the two halves. Off: the paper's MAE-ST predicts pixels.
    diff_target: bool = False


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
    # What an LRUA head writes: "add", an add vector of its own (tristandeleu/ntm-one-shot and
    # snowkylin/ntm), or "key", its read key (Santoro's text). README, implementation notes.
    write_content: str = "add"
    read_order: str = "after_write"  # read M_t (Santoro's eqs.) | "before_write": read M_{t-1}
    # 0: softmax of the cosine, as Santoro; > 0: a learned key strength beta (softplus), starting here.
    # The presets use 10: on Omniglot the MANN leaves ln(n_way) 2-3x sooner (README, implementation notes).
    key_strength: float = 0.0


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
    # The clips MAE pretraining may see (labels never used): "meta_train" = the meta-train
    # classes' clips and every unlabelled clip; "all" = also the held-out classes' clips
    # (transductive: their labels stay unused, but their images are seen before evaluation).
    pool: str = "meta_train"


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

    # what a checkpoint saved before these fields existed was trained with (config_from_dict)
    SAVED_BEFORE: ClassVar[dict] = {"pool": "mean", "k_shot_max": 0, "center_inputs": False}

    n_way: int = 5
    k_shot: int = 1
    # Meta-train on K drawn for each batch from k_shot..k_shot_max (data.ShotMix), so the MANN has
    # seen the longer support sets it is tested with (it is scored at 1 and 5 shots); validation
    # stays at k_shot; 0 or k_shot: K = k_shot only. The sequence layout ignores it (seq_shots).
    # On the glyph benchmark a MANN meta-trained on 1-shot episodes alone gets 53-59% at 5-shot,
    # below its own 1-shot figure; trained on K = 1..5, 82% (README, Results).
    k_shot_max: int = 5
    n_query: int = 1  # queries per class in the support/query layout
    layout: str = "support_query"  # "support_query" | "sequence" (Santoro: x_t with y_{t-1})
    seq_shots: int = 10  # sequence layout: presentations per class
    backbone: str = "mae"  # "mae" | "scratch" (meta-learning only ablation) | "pixels" (Santoro)
    freeze_backbone: bool = True  # frozen: embeddings computed once and cached
    # How the ViT's tokens become a clip's embedding (models.VideoViT.embed): "mean" of all tokens
    # (mae_st's pooling, for classification; 128 features on the cpu preset), or keep part of the
    # token grid: "space" (time-averaged, at each of the h*w positions: 2,048 features on the cpu
    # preset, 12,288 on the paper's), "time" (each time slice), "tokens" (all). The MANN learns its
    # own metric on what it reads: on the glyph benchmark "space" gives it 74.7% at 1-shot against
    # 66.3% for "mean", from the same MAE (README, Results).
    pool: str = "space"
    pixels_size: int = 8  # "pixels" backbone: frames downsampled to this many pixels a side
    pixels_channels: int = 0  # "pixels" backbone: 1 (grey) or 3; 0 = 1 for a grey cache, else 3
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
    # When no --pretrained and true: after MAE pretraining, fine-tune the encoder with a
    # classification head on the meta-train classes (stage 2's recipe) before meta-training. Off by
    # default: the paper goes from the MAE, pretrained without labels, to the MANN. Labels of the
    # meta-train classes are fair game in meta-learning, and this phase is what makes the action
    # benchmark (classes defined by motion alone) separable; README, Results, reports it as an arm.
    classify: bool = False
    # The MANN's input: each clip embedding is LayerNorm'ed, and the norm's gain starts at
    # input_norm / sqrt(D), so every embedding reaches the controller with length input_norm
    # (the label one-hot has length 1). A gain of 1, LayerNorm's default, gives length sqrt(D):
    # 20-35x the label for 400-1,200 pixels, and the MANN never gets past counting labels
    # (README, implementation notes).
    input_norm: float = 4.0
    # Centre the frozen embeddings before that norm: subtract their mean over the MAE's pretraining
    # pool (labels unused; models.MetaLearner.input_mean), as SimpleShot centres features for
    # nearest-neighbour few-shot (Wang et al. 2019, 1911.04623). The MAE's clip embeddings share
    # one direction (two random clips' normed embeddings have a cosine of 0.66 on the glyphs, 0.80
    # on the Omniglot-moving benchmark; 0.0 once centred) that the MANN's keys otherwise have to
    # unlearn: centred, it leaves ln 5 up to three times sooner (README, Results: centring).
    # Frozen backbones only (end to end the features move); false: as before the twelfth session.
    center_inputs: bool = True
    # false: with a frozen backbone, the norm's gain and bias stay at their start (a fixed scale),
    # so the backward pass skips the gradient of the LSTM's input product with respect to its
    # 2,048-wide input. The gain is redundant with the input weights it multiplies.
    learn_input_norm: bool = True
    # Dropout on the normed embedding the MANN reads, in training only (models.MetaLearner): a
    # regulariser for few labelled clips a class (--labeled-fraction), where the MANN otherwise
    # fits the meta-train clips' cached embeddings (README, Results: with fewer labels).
    input_dropout: float = 0.0
    # Augmented views of the meta-train clips for a frozen backbone: > 1 embeds every meta-train
    # clip this many times (the centred, unaugmented view and train_views - 1 views with the
    # training augmentation: a random window, random resized crop, flip where the data allows),
    # and each clip of a training episode reads one of its views, drawn at random. 1: the single
    # centred embedding. Held-out classes always read the centred view.
    train_views: int = 1
    # Semi-supervised meta-training on views (Khodadadeh et al. 2019, UMTRA): > 0 draws this share
    # of the meta-train batches from episodes whose classes are single clips of the pretraining
    # pool (labelled or not; labels unused) and whose instances are distinct views of them
    # (data.ViewEpisodes), K = k_shot..k_shot_max as far as train_views allows. Needs
    # train_views >= k_shot + n_query. 0: labelled episodes only.
    view_episodes: float = 0.0
    # Semi-supervised meta-training (Hsu et al. 2019, CACTUs): > 0 clusters the frozen embeddings
    # of every clip MAE pretraining may use (labels unused) into this many k-means clusters, and
    # draws a `cluster_share` of the meta-train batches from episodes whose classes are the
    # clusters, so the unlabelled clips feed the MANN as well as the MAE. 0: labelled episodes only.
    clusters: int = 0
    cluster_share: float = 0.5
    # Santoro's augmentation of the meta-train classes, drawn anew for every episode: each class
    # also appears rotated by 90, 180 and 270 degrees as three new classes, and every example is
    # translated by up to max_shift pixels (edges replicated). Held-out classes are never augmented.
    rotate_classes: bool = False
    max_shift: int = 0


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


# Every string field with a fixed set of values, and what each may be.
CHOICES = {
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "model.encoder.attention": ("joint", "divided"),
    "model.encoder.pos_embed": ("separable", "joint", "sincos", "sincos3d"),
    "model.encoder.spt_shift": ("diagonal_half", "cardinal_half", "cardinal_1"),
    "model.mask_type": ("random", "tube"),
    "pretrain.pool": ("meta_train", "all"),
    "mann.write": ("lrua", "ntm"),
    "mann.write_content": ("add", "key"),
    "mann.read_order": ("after_write", "before_write"),
    "meta.layout": ("support_query", "sequence"),
    "meta.backbone": ("mae", "scratch", "pixels"),
    "meta.pool": ("mean", "space", "time", "tokens"),
}


# The semi-supervised recipe (README, Results: "Meta-training on the unlabelled clips too"): a
# stage-3 run on a frozen backbone with --labeled-fraction below 1 takes these values for each
# field its command line leaves unset (train.semi_supervised_recipe). Measured on the glyph
# benchmark: with 2 to 5 labelled clips a class labelled episodes alone fit them (41.8 / 48.9% at
# 1-shot against the recipe's 60.4 / 65.9), at half the labels the recipe is level or better
# (67.7 / 77.2 at 1- / 5-shot against 67.3 / 74.7), with every label it loses (66.5 against the
# defaults' 75.5), so it stays off there; on the hidden-style benchmark, 2 labelled clips a class
# collapse the MANN to one class (20.3) and the recipe gets 67.9.
SEMI_SUPERVISED = {"meta.input_dropout": 0.5, "meta.train_views": 8, "meta.view_episodes": 0.5}


def label_free(mc: MetaConfig) -> bool:
    """Every meta-train batch is episodes without labels: view episodes only (check_config makes
    sure there are views for them) or cluster episodes only."""
    return mc.view_episodes == 1 or (mc.clusters > 0 and mc.cluster_share == 1)


def check_config(cfg: Config) -> None:
    """Every field's own range, and the cross-checks within the config, before any work:
    raises Refused naming the first bad value and what would be valid. The checks that need
    the data (episode shape against the held-out classes) are in train.py."""
    flat = flatten_config(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise Refused(f"--{key}={flat[key]}: not one of {', '.join(allowed)}")
    for key, v in flat.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise Refused(f"--{key}={v}: must be a finite number")
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise Refused(f"--{key}={flat[key]}: {what}")
    positive = [k for k, v in flat.items() if isinstance(v, int) and not isinstance(v, bool) and k.endswith(
        tuple("." + n for n in (
            "img_size", "num_frames", "in_chans", "patch_size", "tubelet_size", "width", "depth", "num_heads",
            "head_dim", "batch_size", "accum_steps", "n_way", "k_shot", "n_query", "seq_shots", "sampling_rate",
            "num_views", "controller_size", "n_slots", "slot_dim", "val_episodes", "test_episodes", "steps",
            "pixels_size", "decoder_width", "decoder_depth", "decoder_heads", "decoder_head_dim")))]
    for key in positive:
        need(flat[key] >= 1, key, "must be at least 1")
    nonneg = [k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k not in positive]
    for key in nonneg:
        need(flat[key] >= 0, key, "must not be negative")
    for key in ("model.mask_ratio",):
        need(0 <= flat[key] < 1, key, "must be in [0, 1): the fraction of tokens hidden from the encoder")
    for key in ("data.labeled_fraction",):
        need(0 < flat[key] <= 1, key, "must be in (0, 1]")
    for key in [k for k in flat if k.endswith(("drop_path", "dropout", "random_erase", "mixup_prob",
                                                "label_smoothing", "scale_min", "gamma"))]:
        need(0 <= flat[key] <= 1, key, "must be in [0, 1]")
    need(cfg.meta.n_way >= 2, "meta.n_way", "an episode needs at least 2 classes")
    for key in ("meta.eval_every", "meta.ckpt_every"):
        need(flat[key] >= 1, key, "must be at least 1 (steps)")
    for key in ("meta.lr", "meta.input_norm"):
        need(flat[key] > 0, key, "must be positive")
    need(0 <= cfg.meta.cluster_share <= 1, "meta.cluster_share", "must be in [0, 1]: the share of batches "
         "drawn from cluster episodes")
    need(cfg.meta.train_views >= 1, "meta.train_views", "at least 1 (1: the centred view only)")
    need(0 <= cfg.meta.view_episodes <= 1, "meta.view_episodes", "must be in [0, 1]: the share of batches "
         "drawn from view episodes")
    need(cfg.meta.view_episodes == 0 or cfg.meta.train_views >= cfg.meta.k_shot + cfg.meta.n_query,
         "meta.view_episodes", f"needs meta.train_views >= k_shot + n_query ({cfg.meta.k_shot + cfg.meta.n_query}): "
         f"a view episode shows distinct views of each clip (got train_views {cfg.meta.train_views})")
    need(cfg.meta.clusters == 0 or cfg.meta.clusters >= cfg.meta.n_way, "meta.clusters",
         f"0 (off) or at least meta.n_way ({cfg.meta.n_way}): an episode draws its classes from the clusters")
    need(cfg.mann.read_heads >= 0, "mann.read_heads", "0 (an LSTM with no memory) or more")
    need(cfg.meta.pixels_channels in (0, 1, 3), "meta.pixels_channels", "0 (auto), 1 or 3")
    need(cfg.meta.k_shot_max == 0 or cfg.meta.k_shot_max >= cfg.meta.k_shot, "meta.k_shot_max",
         f"0 (K = k_shot always) or at least meta.k_shot ({cfg.meta.k_shot})")
    enc = cfg.model.encoder
    need(enc.img_size % enc.patch_size == 0, "model.encoder.img_size",
         f"must be a multiple of the patch size {enc.patch_size}")
    need(enc.num_frames % enc.tubelet_size == 0, "model.encoder.num_frames",
         f"must be a multiple of the tubelet size {enc.tubelet_size}")
    tokens = (enc.img_size // enc.patch_size) ** 2 * (enc.num_frames // enc.tubelet_size)
    per_frame = (enc.img_size // enc.patch_size) ** 2
    kept = int(tokens * (1 - cfg.model.mask_ratio)) if cfg.model.mask_type == "random" else \
        int(per_frame * (1 - cfg.model.mask_ratio)) * (enc.num_frames // enc.tubelet_size)
    need(kept >= 1, "model.mask_ratio", f"leaves no visible token of {tokens} (at most "
         f"{1 - 1 / (per_frame if cfg.model.mask_type == 'tube' else tokens):.4f})")
    need(not (enc.attention == "divided" and cfg.model.mask_type != "tube"), "model.mask_type",
         "divided space-time attention needs tube masking (the same tokens visible in every frame)")
    need(cfg.model.pred_t_dim <= enc.num_frames, "model.pred_t_dim", f"at most num_frames ({enc.num_frames})")


# -----------------------------------------------------------------------------
# Presets: named functions; parameter counts are checked by tests/test_models.py


def mae_paper_count() -> MAEConfig:
    """The configuration behind the paper's "3,109,008 parameters" (section 4.1):
    patch 4, tubelet 1, no SPT, no LSA. 3,109,008 weights and biases in its layers
    (3,187,440 with positional embeddings and the mask token); its encoder with a 26-class
    head is the paper's "2.7 M" (2,682,842)."""
    enc = ViTConfig(patch_size=4, tubelet_size=1, spt=False, lsa=False)
    return MAEConfig(encoder=enc)


def mae_paper() -> MAEConfig:
    """The paper's small SPT/LSA video MAE at 64x64, 16 frames, patch 8, tubelet 2
    (512 tokens). 3,505,020 layer parameters (3,525,852 in all): SPT's 1,920-wide patch
    vectors cost 298,752 more than a plain embedding (3,206,112 with SPT and LSA off).
    Its encoder + 26-class head: 3,046,214."""
    return MAEConfig(encoder=ViTConfig())


def mae_cpu() -> MAEConfig:
    """A CPU demo MAE: 32x32, 8 frames, patch 8, tubelet 2 (64 tokens), width 128, depth 4.
    878,296 layer parameters (882,200 in all)."""
    enc = ViTConfig(img_size=32, num_frames=8, patch_size=8, tubelet_size=2, width=128, depth=4,
                    num_heads=4, head_dim=32, mlp_ratio=2.0)
    return MAEConfig(encoder=enc, decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_head_dim=16,
                     mask_ratio=0.9)


def mae_tiny() -> MAEConfig:
    """For tests: 16x16, 4 frames, patch 4, tubelet 2 (32 tokens), width 32, depth 2.
    37,686 layer parameters (38,566 in all)."""
    enc = ViTConfig(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, width=32, depth=2,
                    num_heads=2, head_dim=16, mlp_ratio=2.0)
    return MAEConfig(encoder=enc, decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_head_dim=8,
                     mask_ratio=0.75)


def vit_published(size: str, **overrides) -> ViTConfig:
    """Standard ViT widths for published video MAE checkpoints (mae_st, VideoMAE):
    patch 16, tubelet 2, 224 px, 16 frames, MLP ratio 4, q/k/v with bias, no SPT/LSA.
    Encoder layer parameters: S 384/12/6 21,884,544; B 768/12/12 86,236,416;
    L 1024/24/16 303,885,312; H 1280/32/16 (patch 14) 631,187,200."""
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
    return Config(preset="paper", model=mae_paper(), mann=MANNConfig(key_strength=10.0))


def preset_cpu() -> Config:
    """A demo that runs end to end on a 2-core CPU in minutes: the small MAE at 32x32, short
    schedules. Deviations from the paper's tables, for speed on a CPU: an absolute lr of 1e-3
    for the MAE (mask ratio 0.9, MAE-ST's default), and classification fine-tuning without mixup
    or drop path at lr 2e-3 (with Table 2's mixup 0.5 the small model barely moves in 8 epochs).
    The MANN meta-trains 8,000 steps: at 5,000 (1.6x faster) it loses 4 / 6 points and no longer
    beats the pixels backbone's MANN at 1-shot (71.2 against 70.6%; README, Results); with centred
    inputs, at 6,000 it loses 1.0 / 0.6 points and the pixels MANN at 6,000 overlaps it at 1-shot
    (74.7 +- 1.3 against 72.3 +- 1.3). At lr 2e-3
    it had not left ln 5 by step 3,300. No projection before the LSTM (mann.input_proj=256 is
    1.25x faster a step at the same accuracy on 1- to 5-shot episodes, but on 1-shot episodes
    alone it did not leave ln 5)."""
    return Config(
        preset="cpu",
        model=mae_cpu(),
        mann=MANNConfig(controller_size=128, n_slots=64, slot_dim=40, read_heads=4, key_strength=10.0),
        data=DataConfig(sampling_rate=2, workers=2),
        pretrain=PretrainConfig(epochs=15, batch_size=16, lr=1e-3, warmup_epochs=1),
        finetune=FinetuneConfig(epochs=10, batch_size=16, lr=2e-3, warmup_epochs=1, mixup=0.0, drop_path=0.0),
        meta=MetaConfig(steps=8000, batch_size=16, warmup_steps=200, eval_every=1000, ckpt_every=1000,
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
                        test_episodes=16, k_shot_max=0),
    )


def preset_omniglot() -> Config:
    """Santoro et al.'s Omniglot experiment (sec. 4.1): 20 x 20 grey images as raw pixels, the
    sequence layout (x_t with y_{t-1}, every step scored), 5 classes x 10 instances (50 steps),
    controller 200, memory 128 x 40, 4 read heads, LRUA gamma 0.95, batches of 16 episodes,
    meta-train classes rotated into new classes and translated. Adam at 1e-3 (Santoro's
    reproductions; the paper gives no optimiser settings). The ViT fields describe a small
    encoder at 20 px (5 x 5 tokens of 4 px) for `--backbone mae|scratch` on the same data.
    Use it with a cache of one-frame clips: `python data.py prepare --source folder:OMNIGLOT
    --size 20 --out CACHE`. The MANN reads the pixels uncentred (center_inputs off), as Santoro's
    does and as the README's Omniglot figures were measured."""
    enc = ViTConfig(img_size=20, num_frames=1, in_chans=3, patch_size=4, tubelet_size=1, width=128, depth=4,
                    num_heads=4, head_dim=32, mlp_ratio=2.0)
    return Config(
        preset="omniglot",
        model=MAEConfig(encoder=enc, decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_head_dim=16,
                        mask_ratio=0.75),
        mann=MANNConfig(controller_size=200, n_slots=128, slot_dim=40, read_heads=4, write="lrua", gamma=0.95,
                        key_strength=10.0),
        data=DataConfig(sampling_rate=1, hflip=False, workers=0),
        pretrain=PretrainConfig(epochs=10, batch_size=64, lr=1e-3, warmup_epochs=1),
        finetune=FinetuneConfig(epochs=10, batch_size=64, lr=2e-3, warmup_epochs=1, mixup=0.0, drop_path=0.0),
        meta=MetaConfig(layout="sequence", n_way=5, seq_shots=10, backbone="pixels", pixels_size=20, pixels_channels=1,
                        steps=15000, batch_size=16, lr=1e-3, warmup_steps=0, clip_grad=0.0, eval_every=500,
                        ckpt_every=500, val_episodes=320, test_episodes=1000, classify=False,
                        rotate_classes=True, max_shift=2, center_inputs=False),
    )


PRESETS = {"paper": preset_paper, "cpu": preset_cpu, "tiny": preset_tiny, "omniglot": preset_omniglot}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def training_config(preset: str | None, device: torch.device, recipe: str = "table2", verbose: bool = False
                    ) -> Config:
    """The config a training run starts from: the preset (by default the paper's on CUDA and
    the cpu demo elsewhere) with its fine-tuning recipe (Table 2, or Table 1 for a pretrained
    MAE). train.py applies the command line on top; eval.py's speed benchmark uses it as is."""
    if preset is None:
        preset = "paper" if device.type == "cuda" else "cpu"
        if verbose:
            why = "a CUDA GPU is available" if device.type == "cuda" else f"running on {device.type}, not CUDA"
            print(f"preset: {preset} ({why}; choose with --preset)")
    elif verbose:
        print(f"preset: {preset}")
    cfg = get_preset(preset)
    if recipe == "table1":
        cfg.finetune = finetune_table1()
        cfg.data.rand_augment, cfg.data.random_erase = "rand-m7-mstd0.5-inc1", 0.0  # Table 1
    elif preset == "paper":
        cfg.data.random_erase = 0.25  # Table 2
    return cfg


def finetune_table1() -> FinetuneConfig:
    """Table 1: fine-tuning a pre-trained MAE (mae_st's fine-tuning recipe at 64 px)."""
    return FinetuneConfig(epochs=50, batch_size=2, lr=0.0, blr=0.0024, weight_decay=0.05, warmup_epochs=5,
                          layer_decay=0.75, drop_path=0.1, head_dropout=0.5, mixup=0.8, cutmix=1.0,
                          label_smoothing=0.1)


def finetune_table2() -> FinetuneConfig:
    """Table 2: training a video autoencoder + head from scratch (the dataclass defaults)."""
    return FinetuneConfig()


# -----------------------------------------------------------------------------
# Config <-> dict, and the --key=value override parser


def config_to_dict(cfg) -> dict:
    """Nested plain dict (JSON- and weights_only-safe)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from a dict; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    # a field added with a default that changes behaviour: a config saved before it existed meant
    # the old behaviour (e.g. MetaConfig.pool: runs before it read the mean of the tokens)
    kwargs = {k: v for k, v in getattr(cls, "SAVED_BEFORE", {}).items() if k not in d}
    for name, value in d.items():
        sub = _dataclass_type(cls, name)
        kwargs[name] = config_from_dict(sub, value) if sub is not None else value
    return cls(**kwargs)


def _dataclass_type(cls, name):
    """The dataclass type of field `name` of `cls`, or None for a plain field."""
    default = getattr(cls(), name)
    return type(default) if dataclasses.is_dataclass(default) else None


def flatten_config(cfg, prefix: str = "") -> dict[str, Any]:
    """{"model.encoder.depth": 9, ...}: every leaf field under its dotted path."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(flatten_config(value, key + "."))
        else:
            out[key] = value
    return out


def _convert(text: str, current: Any, key: str):
    """Parse `text` to the type of the field's current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}={text}: expected true or false")
    for typ in (int, float):
        if isinstance(current, typ):
            try:
                return typ(text)
            except ValueError:
                raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None
    return text


def resolve_key(cfg, key: str) -> str:
    """A full dotted path, or any unique suffix of one ("depth" is ambiguous, "encoder.depth" is not)."""
    keys = list(flatten_config(cfg))
    if key in keys:
        return key
    matches = [k for k in keys if k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        close = [k for k in keys if key.split(".")[-1] in k][:8]
        hint = f"; did you mean one of: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint} (python train.py --help lists them all)")
    raise ValueError(f"config key {key!r} is ambiguous: {', '.join(matches)}")


def set_config(cfg, key: str, value: Any) -> None:
    """Set a dotted key on a nested config, converting strings to the field's type."""
    full = resolve_key(cfg, key)
    *parents, leaf = full.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    current = getattr(obj, leaf)
    if isinstance(value, str) and not isinstance(current, str):
        value = _convert(value, current, key)
    setattr(obj, leaf, value)


def apply_overrides(cfg, args: list[str]) -> list[str]:
    """Apply every `--key=value` in args to cfg; return the rest untouched."""
    rest = []
    for a in args:
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
            set_config(cfg, key.replace("-", "_"), value)
        else:
            rest.append(a)
    return rest


def diff_configs(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Leaf fields that differ between two nested config dicts: [(key, a, b)]."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a), flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


# -----------------------------------------------------------------------------
# Device, precision, distributed


def pick_device(name: str = "auto", verbose: bool = True) -> torch.device:
    """cuda, then mps, then cpu; says why. A named device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            dev, why = torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev, why = torch.device("mps"), "Apple MPS is available"
        else:
            dev, why = torch.device("cpu"), "no CUDA or MPS device found"
        if verbose:
            print(f"device: {dev} ({why})")
        return dev
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA device that supports it, fp32 everywhere else."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision {precision!r}: choose auto, bf16, fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision; nullcontext() for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, str]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a no-op.
    Returns the Dist info and the device name this rank should use."""
    if "RANK" not in os.environ:
        return Dist(), device_name
    import torch.distributed as tdist
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
        device_name = f"cuda:{dist.local_rank}"
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist, device_name


def cleanup_distributed(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist
        # Every rank reaches the same point first: gloo aborts ("terminate called without an
        # active exception") when one rank tears its group down while another still talks to it.
        tdist.barrier()
        tdist.destroy_process_group()


# -----------------------------------------------------------------------------
# Seeding and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one step's masking / mixup / episodes: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + step) % (2**63 - 1))


def rng_state() -> dict:
    """Global RNG states, in a form torch.load(weights_only=True) accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Checkpoints: one dict, written atomically, loaded without executing code


class InputError(Exception):
    """A mistake in what the user gave (a file, a folder, a value): the command-line entry points
    print it as one `error:` line and exit with code 2, never as a traceback."""


class CheckpointError(InputError):
    """A checkpoint file that cannot be read safely (missing, empty, corrupt, or needing code)."""


class Refused(SystemExit):
    """A request refused before (or instead of) doing any work: exit code 2, the message one
    line on stderr. A SystemExit, so a caller of main() sees it as argparse's errors."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2

    def __str__(self) -> str:
        return str(self.args[0])


def cli(main) -> None:
    """Run a command-line entry point: the project's own errors become one `error:` line on
    stderr and exit code 2 (usage errors, as argparse); anything else is a bug and keeps its
    traceback."""
    try:
        main()
    except (Refused, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; a run continues from its last checkpoint with --resume", file=sys.stderr)
        sys.exit(130)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (episodes, views, clips, shots)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class RunLock:
    """One process per run folder: <folder>/run.lock holds the owner's host and pid, created
    with O_EXCL. A lock whose process is gone (killed, crashed) on this host is taken over;
    a live one refuses the second process before it writes anything."""

    def __init__(self, folder: str):
        self.folder, self.path, self.held = folder, os.path.join(folder, "run.lock"), False

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        me = f"{_host()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_text(self.path)
                host, _, pid = owner.partition(" ")
                if host == _host() and pid.isdigit() and not _alive(int(pid)):
                    os.remove(self.path)  # its process is gone: a stale lock
                    continue
                raise Refused(f"{self.folder} is in use by another run (process {pid or '?'} on "
                              f"{host or '?'}, {self.path}); wait for it, or choose another --out "
                              f"(delete the lock file only if that process is gone)") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise Refused(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held and _read_text(self.path) == f"{_host()} {os.getpid()}":
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else "localhost"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fingerprint(path: str | None, names: tuple[str, ...] | None = None) -> str | None:
    """A cheap fingerprint of an input file or folder: the size and a CRC of the first and last
    MiB of each file (a folder's files in name order, or only `names`). Enough to see that --data or
    --pretrained now points at different content, without reading gigabytes."""
    if path is None:
        return None
    files = ([path] if os.path.isfile(path) else
             sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))
                    and not n.endswith(".tmp") and (names is None or n in names)) if os.path.isdir(path) else [])
    crc, total = 0, 0
    for name in files:
        size = os.path.getsize(name)
        total += size
        crc = zlib.crc32(f"{os.path.basename(name)}:{size}".encode(), crc)
        with open(name, "rb") as f:
            crc = zlib.crc32(f.read(1 << 20), crc)
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                crc = zlib.crc32(f.read(), crc)
    return f"{len(files)} file(s), {total} bytes, crc {crc:08x}"


def truncate_log(path: str, step: int) -> int:
    """Drop the lines of log.jsonl past `step` (a resumed run's checkpoint): the killed process
    logged them, and the resumed one logs those steps again. Returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) < len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


def remove_temporaries(folder: str) -> list[str]:
    """Delete *.tmp files a killed process left in a run folder (half-written checkpoints)."""
    if not os.path.isdir(folder):
        return []
    gone = [n for n in os.listdir(folder) if n.endswith(".tmp")]
    for n in gone:
        os.remove(os.path.join(folder, n))
    return gone


def save_checkpoint(path: str, obj: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash mid-write never leaves a half-written checkpoint under the real name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj, **kw) -> None:
    """JSON written to a temporary file and renamed over `path`: a kill mid-write leaves the
    previous file (or none), never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never code.
    Every failure becomes one CheckpointError that names the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        text = str(e).strip()
        # torch's weights_only refusal is a page of advice; the line that matters names the global
        lines = ([ln.strip() for ln in text.splitlines() if "unsupported global" in ln.lower()]
                 or [ln.strip() for ln in text.splitlines() if ln.strip()])
        msg = lines[0].replace("WeightsUnpickler error: ", "") if lines else ""
        msg = msg if len(msg) > 12 else f"{type(e).__name__}: {msg}".rstrip(": ")  # e.g. a bare "101" says nothing
        if len(msg) > 300:  # cut at a word, never mid-word
            msg = msg[:300].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt, or it needs "
                              f"code execution to load, which we refuse): {msg}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    return obj


# -----------------------------------------------------------------------------
# Logging: one terminal line plus the same dict appended to log.jsonl


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 22 -> '22nd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def format_line(record: dict) -> str:
    """`step 1200/20000 | loss 0.412 | 38 ms/it | eta 4m`-style line from a record."""
    parts = []
    for k, v in record.items():
        if k in ("time", "total"):
            continue
        if k == "step" and "total" in record:
            parts.append(f"step {v}/{record['total']}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, list) and all(isinstance(x, float) for x in v):
            parts.append(f"{k} [" + " ".join(f"{x:.3g}" for x in v) + "]")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


class RunLog:
    """Prints one line per record and appends it as JSON to <run>/log.jsonl. `RunLog.prefix`
    (set by train.py per phase: "phase 2/3 classification | ") starts every printed line."""

    prefix = ""

    def __init__(self, path: str | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if path and enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, record: dict, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        if echo:
            print(RunLog.prefix + format_line(record), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A progress line: done/total, rate and ETA. Rewrites one line on a terminal; prints a
    plain line every few seconds otherwise (CI logs, pipes)."""

    def __init__(self, total: int, desc: str = "", unit: str = "clips", every: float = 5.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.start = self.last = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= (0.2 if self.tty else self.every) and self.done < self.total:
            self.last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.desc}{' ' if self.desc else ''}{self.done}/{self.total} {self.unit} | "
                f"{rate:.1f} {self.unit}/s | {'elapsed ' + format_duration(elapsed) if final else 'eta ' + format_duration(eta)}")
        if self.tty:
            print("\r" + line.ljust(78), end="\n" if final else "", flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._print(final=True)


# -----------------------------------------------------------------------------
# Pictures with pillow: line charts, bar charts, heat maps, frame grids, GIFs

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v != 0 and abs(v) >= 1e3 and abs(v) < 1e7 and float(v).is_integer():
        return f"{v:,.0f}"  # 50,000 episodes, not 5.0e+04
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.1e}"
    return f"{v:g}"


def line_chart(path: str, series: dict[str, tuple[list, list]], title: str = "", xlabel: str = "",
               ylabel: str = "", size: tuple[int, int] = (640, 400), logy: bool = False,
               refs: dict[str, float] | None = None, y_from: float | None = None,
               xticks: dict[float, str] | None = None) -> None:
    """One PNG with a line per series: {name: (xs, ys)}, axes with ticks, and a legend.
    `refs` are labelled dashed horizontal lines (chance, ln(n_way), a baseline), always inside
    the y-range; `y_from` fixes the bottom of the y-axis (e.g. 0 for an accuracy), so that a
    flat curve at a reference line is not zoomed into something that looks like learning;
    `xticks` ({x: label}) replaces the x-axis's numbers (categories placed at 0, 1, 2, ...)."""
    from PIL import Image, ImageDraw
    W, H = size
    font, small = _font(13), _font(11)
    # the legend: rows of its own under the title, as many as the names need, so it never covers a line
    rows, width = [[]], 0.0
    for name in series:
        w = 28 + small.getlength(name) + 16
        if rows[-1] and width + w > W - 8:
            rows.append([])
            width = 0.0
        rows[-1].append((name, w))
        width += w
    left, right, top, bottom = 64, 16, 40 + 14 * len(rows), 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if logy:
        pts = [(x, math.log10(y)) for x, y in pts if y > 0]
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    refs = {k: (math.log10(v) if logy else v) for k, v in (refs or {}).items()
            if math.isfinite(v) and (v > 0 or not logy)}
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = [p[1] for p in pts] + list(refs.values())
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    if y_from is not None and not logy:
        y0 = min(y_from, y1 - pad)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom))

    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            _, yy = px(x0, t)
            d.line([(left, yy), (W - right, yy)], fill=(232, 232, 232))
            label = _fmt_tick(10 ** t) if logy else _fmt_tick(t)
            d.text((left - 6, yy), label, fill="black", font=small, anchor="rm")
    for t, label in (xticks.items() if xticks else ((t, _fmt_tick(t)) for t in _nice_ticks(x0, x1))):
        if x0 <= t <= x1:
            xx, _ = px(t, y0)
            d.line([(xx, H - bottom), (xx, H - bottom + 4)], fill="black")
            d.text((xx, H - bottom + 6), label, fill="black", font=small, anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for name, v in refs.items():  # dashed, grey, labelled at the right end of the line
        _, yy = px(x0, v)
        for xa in range(left, W - right, 8):
            d.line([(xa, yy), (min(xa + 4, W - right), yy)], fill=(120, 120, 120), width=1)
        d.text((W - right - 4, yy - 2), name, fill=(90, 90, 90), font=small, anchor="rb")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        line = [(x, (math.log10(y) if logy else y)) for x, y in zip(xs, ys)
                if y is not None and math.isfinite(y) and (y > 0 or not logy)]
        xy = [px(x, y) for x, y in line]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for p in xy if len(xy) <= 30 else []:
            d.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=color)
    i = 0
    for r, row in enumerate(rows):  # each row centred above the plot
        lx, ly = max(4, (left + W - right - sum(w for _, w in row)) / 2), 36 + 14 * r
        for name, w in row:
            d.line([(lx, ly), (lx + 20, ly)], fill=PALETTE[i % len(PALETTE)], width=3)
            d.text((lx + 25, ly), name, fill="black", font=small, anchor="lm")
            lx, i = lx + w, i + 1
    d.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    d.text(((left + W - right) / 2, H - 8), xlabel, fill="black", font=font, anchor="mb")
    ylab = Image.new("RGB", (H, 18), "white")
    ImageDraw.Draw(ylab).text((H / 2, 9), ylabel, fill="black", font=font, anchor="mm")
    img.paste(ylab.rotate(90, expand=True), (2, 0))
    img.save(path)


def bar_chart(path: str, names: list[str], values: list[float], errors: list[float] | None = None,
              title: str = "", ylabel: str = "", hline: float | None = None, hline_label: str = "",
              size: tuple[int, int] = (640, 400)) -> None:
    """Bars with optional +-error whiskers (e.g. 95% CI) and an optional reference line (chance)."""
    from PIL import Image, ImageDraw
    W, H = size
    font, small = _font(13), _font(11)
    n = max(len(values), 1)
    # the chance label sits in the right margin; each bar's name wraps to its slot's pixel width
    right = 16 + (int(small.getlength(hline_label)) + 8 if hline is not None and hline_label else 0)
    left, top = 64, 36
    slot = (W - left - right) / n
    wrapped = [_wrap(name, small, slot - 6) for name in names]
    bottom = 16 + 13 * max([len(w) for w in wrapped] + [2])
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    errors = errors or [0.0] * len(values)
    hi = max([v + e for v, e in zip(values, errors)] + [hline or 0.0]) * 1.1 or 1.0
    lo = min(0.0, min(values))

    def py(v):
        return top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom)

    for t in _nice_ticks(lo, hi):
        if lo <= t <= hi:
            d.line([(left, py(t)), (W - right, py(t))], fill=(232, 232, 232))
            d.text((left - 6, py(t)), _fmt_tick(t), fill="black", font=small, anchor="rm")
    for i, (lines, v, e) in enumerate(zip(wrapped, values, errors)):
        cx = left + slot * (i + 0.5)
        bw = slot * 0.6
        d.rectangle([cx - bw / 2, py(v), cx + bw / 2, py(lo)], fill=PALETTE[i % len(PALETTE)])
        if e:
            d.line([(cx, py(v - e)), (cx, py(v + e))], fill="black", width=2)
            for yy in (py(v - e), py(v + e)):
                d.line([(cx - 6, yy), (cx + 6, yy)], fill="black", width=2)
        d.text((cx, py(v + e) - 4), f"{v:.3g}", fill="black", font=small, anchor="mb")
        for j, part in enumerate(lines):
            d.text((cx, H - bottom + 6 + 13 * j), part, fill="black", font=small, anchor="mt")
    if hline is not None:
        d.line([(left, py(hline)), (W - right, py(hline))], fill=(200, 0, 0), width=1)
        d.text((W - right + 6, py(hline)), hline_label, fill=(200, 0, 0), font=small, anchor="lm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    ylab = Image.new("RGB", (H, 18), "white")
    ImageDraw.Draw(ylab).text((H / 2, 9), ylabel, fill="black", font=font, anchor="mm")
    img.paste(ylab.rotate(90, expand=True), (2, 0))
    img.save(path)


def _wrap(text: str, font, width: float) -> list[str]:
    """Words into lines no wider than `width` pixels in `font` (a longer single word stays whole)."""
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and font.getlength(f"{cur} {w}") > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines


def heatmap(path: str, matrix, row_names: list[str], col_names: list[str], title: str = "",
            xlabel: str = "predicted", ylabel: str = "true", cell: int = 0) -> None:
    """A confusion-matrix style picture: rows normalised by the caller, values in [0, 1]."""
    from PIL import Image, ImageDraw
    m = np.asarray(matrix, dtype=np.float64)
    n_r, n_c = m.shape
    cell = cell or max(4, min(28, 560 // max(n_r, n_c)))
    label_w = 8 + 6 * min(24, max((len(s) for s in row_names), default=0)) if cell >= 10 else 30
    top, left = 40, label_w
    W, H = left + cell * n_c + 20, top + cell * n_r + (label_w if cell >= 10 else 30)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    small = _font(10)
    vmax = m.max() if m.size and m.max() > 0 else 1.0
    for i in range(n_r):
        for j in range(n_c):
            v = m[i, j] / vmax
            c = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            d.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1], fill=c)
    if cell >= 10:
        for i, name in enumerate(row_names):
            d.text((left - 4, top + i * cell + cell / 2), name[:24], fill="black", font=small, anchor="rm")
        lab = Image.new("RGB", (label_w, cell * n_c), "white")
        ld = ImageDraw.Draw(lab)
        for j, name in enumerate(col_names):
            ld.text((label_w - 4, j * cell + cell / 2), name[:24], fill="black", font=small, anchor="rm")
        img.paste(lab.rotate(90, expand=True), (left, top + cell * n_r + 2))
    d.rectangle([left, top, left + cell * n_c, top + cell * n_r], outline="black")
    d.text((W / 2, 6), title, fill="black", font=_font(13), anchor="mt")
    d.text((W / 2, 22), f"rows: {ylabel}, columns: {xlabel}", fill="black", font=small, anchor="mt")
    img.save(path)


def frame_grid(path: str, rows: list[list[np.ndarray]], row_names: list[str] | None = None,
               col_names: list[str] | None = None, scale: int = 2) -> None:
    """Rows of uint8 (H, W, 3) frames, enlarged `scale` times (nearest), with labels."""
    from PIL import Image, ImageDraw
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    left = 8 + 7 * max((len(s) for s in row_names), default=0) if row_names else 4
    top = 20 if col_names else 4
    W, H = left + (w + 2) * max(len(r) for r in rows), top + (h + 2) * len(rows)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    small = _font(11)
    for i, row in enumerate(rows):
        for j, frame in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(frame)).resize((w, h), Image.NEAREST)
            img.paste(tile, (left + j * (w + 2), top + i * (h + 2)))
        if row_names:
            d.text((4, top + i * (h + 2) + h / 2), row_names[i], fill="black", font=small, anchor="lm")
    for j, name in enumerate(col_names or []):
        d.text((left + j * (w + 2) + w / 2, 4), name, fill="black", font=small, anchor="mt")
    img.save(path)


def save_gif(path: str, frames: list[np.ndarray], fps: float = 10.0, scale: int = 2) -> None:
    """An animated GIF from uint8 (H, W, 3) frames, looping forever."""
    from PIL import Image
    imgs = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    if scale != 1:
        imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
