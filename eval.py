"""eval.py: measurement and reports for runs made by train.py.

    python eval.py recon    --run runs/stage1     per-frame reconstruction loss (paper Table 3), pictures (Fig. 3)
    python eval.py classify --run runs/stage2     top-1 / top-5, per-class accuracy, confusion matrix
    python eval.py fewshot  --run runs/stage3     N-way K-shot accuracy with 95% CI on held-out classes: MANN,
                                                  nearest class mean, logistic regression on the same embeddings
    python eval.py ablation --both runs/stage3 --meta-only runs/stage3-scratch
                                                  meta-learning only vs representation only vs both
    python eval.py export   --run runs/stage3     latent embedding of every clip to .npy with its labels
    python eval.py probe    --run runs/stage3/pretrain   frozen features on held-out classes (class means,
                                                  logistic regression) beside pixel and motion floors
    python eval.py speed --preset paper           benchmark of every hot path: training steps (clips/s, FLOP/s against
                                                  the matmul peak, vs timm-style blocks), attention kernels, data
                                                  loading, peak memory; --compile, --json FILE, --md FILE

Every subcommand writes its tables and pictures into <run>/report.md (each subcommand owns one
section, rewritten when it runs again). Evaluation episodes come from a fixed generator, so
every model is scored on the same episodes. eval.py never trains, except fitting the
few-shot baselines (class means, logistic regression) on each episode's support set.

Paper: Waseem & Muthukumar, "Semi-Supervised Meta Learning for Spatiotemporal Learning",
sections 1 and 5; per-instance accuracy as in Santoro et al. 2016 (1605.06065).

Where things are: `fewshot` (the held-out evaluation train.py ends with) -> `evaluate_methods`
(N-way K-shot: the MANN beside `ncm_predict` and `logreg_fit` on the same embeddings) and
`evaluate_sequence` (Santoro's layout, by presentation, beside `label_count_correct`, the
predictor that never looks at the input); `ablation` puts arms side by side with their budgets.
The speed benchmark at the end is fenced off as not the core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
import stmeta

EPISODE_SEED = 20240601  # evaluation episodes: the same for every run and every model

# -----------------------------------------------------------------------------
# Runs, checkpoints and the report


def find_checkpoint(run: str, prefer: str = "best.pt") -> str:
    """A checkpoint file, or the best (else last) checkpoint in a run folder."""
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise stmeta.Refused(f"--run {run}: no such run folder or checkpoint file")
    for name in (prefer, "last.pt", "best.pt"):
        path = os.path.join(run, name)
        if os.path.exists(path):
            return path
    raise stmeta.Refused(f"--run {run}: no best.pt or last.pt in this folder (was the run started?)")


def load_run(run: str, kinds: tuple[str, ...], prefer: str = "best.pt") -> tuple[dict, stmeta.Config, str]:
    """(checkpoint, config, run folder). Stage-2/3 folders keep their MAE phase in pretrain/."""
    path = find_checkpoint(run, prefer)
    try:
        ck = stmeta.load_checkpoint(path)
    except stmeta.CheckpointError as e:
        raise stmeta.Refused(str(e)) from None
    if ck.get("kind") not in kinds and os.path.isdir(run) and "mae" in kinds:
        sub = os.path.join(run, "pretrain")
        if os.path.isdir(sub):
            return load_run(sub, kinds, prefer)
    if ck.get("kind") not in kinds:
        raise stmeta.Refused(f"{path} holds a {ck.get('kind')!r} checkpoint; this command needs one of {kinds}")
    cfg = stmeta.config_from_dict(stmeta.Config, ck["config"])
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    return ck, cfg, folder


def build_model(ck: dict, cfg: stmeta.Config, cache=None):
    """Rebuild the architecture from the saved config, then load the weights."""
    kind = ck["kind"]
    if kind == "mae":
        model = models.VideoMAE(cfg.model)
    elif kind == "classifier":
        n_cls = ck["model"]["head.weight"].shape[0]
        model = models.Classifier(cfg.model.encoder, n_cls, dropout=cfg.finetune.head_dropout)
    elif kind == "mann":
        backbone = models.build_backbone(cfg.meta.backbone, cfg.model.encoder, pixels_size=cfg.meta.pixels_size,
                                         channels=cfg.meta.pixels_channels or None, pool=cfg.meta.pool)
        mann = models.MANN(cfg.mann, input_dim=backbone.out_dim, n_way=cfg.meta.n_way)
        model = models.MetaLearner(backbone, mann, input_norm=cfg.meta.input_norm,
                                   input_dropout=cfg.meta.input_dropout)
    else:
        raise stmeta.Refused(f"unknown checkpoint kind {kind!r}")
    model.load_state_dict(ck["model"])
    return model.eval()


def open_cache(ck: dict, override: str | None) -> data.ClipCache:
    path = override or ck.get("data")
    if not path or not os.path.isdir(path):
        raise stmeta.Refused(f"the run's data folder {path!r} is not there; pass --data DIR")
    return data.ClipCache(path)


def update_report(folder: str, section: str, body: str, header: str) -> str:
    """Replace (or append) one section of <folder>/report.md, leaving the others as they are."""
    path = os.path.join(folder, "report.md")
    text = open(path).read() if os.path.exists(path) else f"# stmeta report: {folder}\n\n{header}\n"
    begin, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def run_header(ck: dict, cfg: stmeta.Config, cache, device) -> str:
    return (f"Run: a `{ck['kind']}` checkpoint at step {ck.get('step')}/{ck.get('total')}, preset `{cfg.preset}`, "
            f"seed {cfg.seed}. Data: {cache.summary()} ({cache.root}). Evaluated on {device_label(device)} with "
            f"PyTorch {torch.__version__}, {datetime.date.today().isoformat()}.")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' if n > 1 else ''})"


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def frames_to_input(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) cached frames -> the model's input (C, T, size, size): resized and
    normalised exactly as data.ClipDataset does in evaluation."""
    x = data.resize(frames.permute(0, 3, 1, 2).float().div(255), size)  # (T, C, size, size)
    x = (x - torch.tensor(stmeta.MEAN).view(1, 3, 1, 1)) / torch.tensor(stmeta.STD).view(1, 3, 1, 1)
    return x.permute(1, 0, 2, 3).contiguous()  # (C, T, size, size)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) normalised -> (T, H, W, 3) uint8 for pictures."""
    mean = torch.tensor(stmeta.MEAN).view(3, 1, 1, 1)
    std = torch.tensor(stmeta.STD).view(3, 1, 1, 1)
    x = (video.float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)


# -----------------------------------------------------------------------------
# recon: per-frame reconstruction loss over whole cached clips (paper Table 3, Fig. 3)


def window_starts(n_frames: int, span: int, rate: int) -> list[int]:
    """Start offsets of windows (num_frames frames, `rate` apart, `span` long) that together
    cover every cached frame exactly once: offsets o + k*span for o in 0..rate-1."""
    starts = []
    for base in range(0, n_frames, span):
        for o in range(rate):
            starts.append(base + o)
    return starts


@torch.no_grad()
def frame_losses(model, clips: np.ndarray, cfg: stmeta.Config, device, mask_ratio: float, seed: int) -> np.ndarray:
    """Reconstruction loss of every cached frame of every clip: (N, F). Each clip is covered
    by windows of the model's input (num_frames at the sampling rate); a window that runs past
    the end repeats the last frame, and those padded frames are not scored."""
    enc = cfg.model.encoder
    T, rate = enc.num_frames, cfg.data.sampling_rate
    N, Fr = clips.shape[:2]
    span = T * rate
    out = np.full((N, Fr), np.nan)
    for n in range(N):
        video = torch.from_numpy(np.ascontiguousarray(clips[n]))  # (F, H, W, 3) uint8
        for w, s in enumerate(window_starts(Fr, span, rate)):
            idx = [min(s + i * rate, Fr - 1) for i in range(T)]
            x = frames_to_input(video[idx], enc.img_size).unsqueeze(0).to(device)  # (1, C, T, H, W)
            g = torch.Generator().manual_seed(seed * 100_003 + n * 1_009 + w)  # CPU: same masks on any device
            loss = model.per_frame_loss(x, mask_ratio=mask_ratio, generator=g)[0].float().cpu().numpy()  # (T,)
            for i, f in enumerate(idx):
                if s + i * rate < Fr:
                    out[n, f] = loss[i]
    return out


def cmd_recon(args) -> dict:
    ck, cfg, folder = load_run(args.run, ("mae",))
    device = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(ck, args.data)
    model = build_model(ck, cfg).to(device)
    mask_ratio = cfg.model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    if not 0 <= mask_ratio < 1:  # also nan
        raise stmeta.Refused(f"--mask-ratio {mask_ratio}: must be in [0, 1)")
    pool = cache.indices(class_split=args.split, labelled_only=False) if args.split != "all" else \
        np.arange(len(cache.labels))
    pool = pool[: args.clips]
    clips = cache.clips[pool]
    rows = {"this model": frame_losses(model, clips, cfg, device, mask_ratio, args.seed)}
    init = ck.get("init")
    start = None
    if init and os.path.exists(init):
        start_ck = stmeta.load_checkpoint(init)
        if start_ck.get("kind") == "mae":
            start = build_model(start_ck, stmeta.config_from_dict(stmeta.Config, start_ck["config"]))
            start_name = f"start ({os.path.basename(init)})"
        else:
            enc = cfg.model.encoder  # the published model at this run's clip size, as train.py built it
            m_cfg, state, _ = models.load_published(init, start_ck, img_size=enc.img_size,
                                                    num_frames=enc.num_frames, num_heads=enc.num_heads,
                                                    decoder_heads=cfg.model.decoder_heads)
            torch.manual_seed(cfg.seed)  # tensors the file lacks start where training started them
            start = models.VideoMAE(m_cfg)
            start.load_state_dict(state, strict=False)
            start_name = f"start (published {os.path.basename(init)})"
    else:
        torch.manual_seed(cfg.seed)  # train.py builds its model right after seeding with cfg.seed
        start = models.VideoMAE(cfg.model)
        start_name = "start (random init)"
    rows[start_name] = frame_losses(start.eval().to(device), clips, cfg, device, mask_ratio, args.seed)

    Fr = clips.shape[1]
    marks = [f for f in (20, 40, 60, 80, 100) if f <= Fr] or [Fr]
    body = [f"## Reconstruction (eval.py recon)\n",
            f"Mean squared error of the reconstruction per cached frame (the loss the MAE trains on: "
            f"{'per-patch normalised pixels' if cfg.model.norm_pix_loss else 'normalised pixels'}, masked patches "
            f"only, mask ratio {mask_ratio}), averaged over {len(pool)} clips of the `{args.split}` split; each "
            f"{Fr}-frame clip is covered by windows of {cfg.model.encoder.num_frames} frames at sampling rate "
            f"{cfg.data.sampling_rate}. Same masks for both models. Paper Table 3 reports this at every 20th frame.\n",
            "| model | " + " | ".join(f"frame {f}" for f in marks) + " | all frames |",
            "|---|" + "---|" * (len(marks) + 1)]
    summary = {}
    for name, fl in rows.items():
        per_frame = np.nanmean(fl, axis=0)
        overall = float(np.nanmean(fl))
        summary[name] = {"per_frame": per_frame.tolist(), "overall": overall}
        body.append(f"| {name} | " + " | ".join(f"{per_frame[f - 1]:.4f}" for f in marks) + f" | {overall:.4f} |")
    chart = os.path.join(folder, "recon_per_frame.png")
    stmeta.line_chart(chart, {k: (list(range(1, Fr + 1)), v["per_frame"]) for k, v in summary.items()},
                      title="reconstruction loss per frame", xlabel="frame", ylabel="MSE")
    body.append(f"\n![per-frame loss](recon_per_frame.png)\n")

    # Figure 3: one clip, original / masked / reconstruction at every 20th frame (within one window)
    enc = cfg.model.encoder
    T, rate = enc.num_frames, cfg.data.sampling_rate
    idx = [min(i * rate, Fr - 1) for i in range(T)]
    x = frames_to_input(torch.from_numpy(np.ascontiguousarray(clips[0]))[idx], enc.img_size).unsqueeze(0)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        recon, mask = model.reconstruct(x.to(device), mask_ratio=mask_ratio, generator=g)
    orig = to_uint8(x[0])
    rec = to_uint8(recon[0].cpu())
    masked = (orig * (1 - mask[0, 0].cpu().numpy()[..., None])).astype(np.uint8)
    pasted = np.where(mask[0, 0].cpu().numpy()[..., None] > 0, rec, orig)
    cols = sorted(set(np.linspace(0, T - 1, min(T, 5)).round().astype(int)))
    stmeta.frame_grid(os.path.join(folder, "recon_grid.png"),
                      [[orig[c] for c in cols], [masked[c] for c in cols], [rec[c] for c in cols],
                       [pasted[c] for c in cols]],
                      ["original", "masked", "reconstruction", "recon + visible"],
                      [f"frame {idx[c] + 1}" for c in cols], scale=max(1, 128 // enc.img_size))
    side = [np.concatenate([orig[t], masked[t], pasted[t]], axis=1) for t in range(T)]
    stmeta.save_gif(os.path.join(folder, "recon.gif"), side, fps=10 / rate, scale=max(1, 128 // enc.img_size))
    body.append(f"Clip {int(pool[0])} ({cache.classes[cache.labels[pool[0]]] if cache.labels[pool[0]] >= 0 else 'unlabelled'}): "
                f"original, masked input, reconstruction, and reconstruction with the visible patches pasted back "
                f"(paper Fig. 3). Animated: `recon.gif` (original | masked | reconstruction).\n")
    body.append("![reconstruction](recon_grid.png)\n")
    path = update_report(folder, "recon", "\n".join(body), run_header(ck, cfg, cache, device))
    print("\n".join(body[2:2 + 2 + len(rows)]))
    print(f"report: {path}")
    return summary


# -----------------------------------------------------------------------------
# classify: top-1 / top-5, per-class accuracy, confusion matrix


@torch.no_grad()
def cmd_classify(args) -> dict:
    ck, cfg, folder = load_run(args.run, ("classifier",))
    device = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(ck, args.data)
    model = build_model(ck, cfg).to(device)
    names = ck.get("classes") or []
    class_ids = [cache.classes.index(c) for c in names]
    label_map = {c: i for i, c in enumerate(class_ids)}
    idx = np.array([i for i in cache.indices(clip_split=args.split) if cache.labels[i] in label_map])
    if len(idx) == 0:
        raise stmeta.Refused(f"no labelled clips of this classifier's classes in the {args.split!r} split")
    enc = cfg.model.encoder
    views = args.views if args.views is not None else cfg.data.num_views
    ds = data.ClipDataset(cache, idx, num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate,
                          size=enc.img_size, train=False, num_views=views, label_map=label_map)
    probs, labels = [], []
    dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=cfg.data.workers)
    for video, label in dl:
        video = video.to(device)
        if video.dim() == 6:  # (B, V, C, T, H, W): average the views' probabilities
            B, V = video.shape[:2]
            p = model(video.flatten(0, 1)).float().softmax(-1).view(B, V, -1).mean(1)
        else:
            p = model(video).float().softmax(-1)
        probs.append(p.cpu())
        labels.append(label)
    probs, labels = torch.cat(probs), torch.cat(labels)
    n_cls = probs.shape[1]
    top = probs.topk(min(5, n_cls), dim=-1).indices
    top1 = (top[:, 0] == labels).float().mean().item()
    top5 = (top == labels[:, None]).any(-1).float().mean().item()
    conf = torch.zeros(n_cls, n_cls)
    conf.index_put_((labels, top[:, 0]), torch.ones(len(labels)), accumulate=True)
    per_class = (conf.diag() / conf.sum(1).clamp(min=1)).tolist()
    counts = conf.sum(1).tolist()
    stmeta.heatmap(os.path.join(folder, "confusion.png"), (conf / conf.sum(1, keepdim=True).clamp(min=1)).numpy(),
                   names, names, title=f"confusion ({args.split} split, {len(labels)} clips)")
    body = [f"## Classification (eval.py classify)\n",
            f"{len(labels)} clips of the `{args.split}` split, {n_cls} classes, {views} view(s) per clip "
            f"(probabilities averaged).\n",
            "| top-1 | top-5 | chance top-1 |", "|---|---|---|",
            f"| {100 * top1:.1f}% | {100 * top5:.1f}% | {100 / n_cls:.1f}% |\n",
            "![confusion matrix](confusion.png)\n", "| class | clips | accuracy |", "|---|---|---|"]
    order = np.argsort(per_class)
    for c in order:
        body.append(f"| {names[c]} | {int(counts[c])} | {100 * per_class[c]:.1f}% |")
    path = update_report(folder, "classify", "\n".join(body), run_header(ck, cfg, cache, device))
    print(f"top-1 {100 * top1:.1f}% | top-5 {100 * top5:.1f}% | {len(labels)} clips, {n_cls} classes")
    print(f"report: {path}")
    return {"top1": top1, "top5": top5, "per_class": dict(zip(names, per_class))}


# -----------------------------------------------------------------------------
# fewshot: MANN and two non-meta-learned baselines on the same fixed episodes


@torch.no_grad()
def run_embeddings(model, cache, cfg: stmeta.Config, device, indices: np.ndarray, batch: int = 64) -> torch.Tensor:
    """(N, D) backbone embeddings (centred window, no augmentation) for the given clips; rows
    of clips not in `indices` stay zero."""
    enc = cfg.model.encoder
    out = torch.zeros(len(cache.labels), model.backbone.out_dim)
    ds = data.ClipDataset(cache, indices, num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate,
                          size=enc.img_size, train=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cfg.data.workers)
    rows = []
    prog = stmeta.Progress(len(ds), "embedding held-out clips")
    for video, _ in dl:
        rows.append(model.backbone(video.to(device)).float().cpu())
        prog.update(video.shape[0])
    out[torch.as_tensor(indices)] = torch.cat(rows)
    return out


def baseline_input(emb: torch.Tensor) -> torch.Tensor:
    """What the non-meta-learned baselines fit: the embeddings LayerNorm'ed as the MANN's input
    is (MetaLearner.norm, without its learned gain and bias), so every method reads the same
    features. For raw pixels this matters: the cosine of two white-background images is mostly
    their shared background, the cosine of two normalised ones is the correlation of their ink."""
    return F.layer_norm(emb.float(), emb.shape[-1:])


def ncm_predict(emb: torch.Tensor, ep, n_way: int) -> torch.Tensor:
    """Nearest class mean by cosine similarity, fitted on each episode's labelled steps.
    emb (B, S, D) -> predictions (B, S)."""
    z = F.normalize(emb, dim=-1)
    shown = (ep.label_in >= 0) & ~ep.is_query if ep.is_query.any() else ep.label_in >= 0
    onehot = F.one_hot(ep.target.clamp(min=0), n_way).float() * shown[..., None]  # (B, S, n)
    means = torch.einsum("bsn,bsd->bnd", onehot, z) / onehot.sum(1)[..., None].clamp(min=1)  # (B, n, D)
    return torch.einsum("bsd,bnd->bsn", z, F.normalize(means, dim=-1)).argmax(-1)


LOGREG_SCALE = 10.0  # cosine features live in [-1, 1]; a temperature lets the fit become confident


def logreg_fit(z: torch.Tensor, target: torch.Tensor, fit: torch.Tensor, n_way: int, steps: int = 100,
               wd: float = 1e-2, init: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS on the steps where `fit` is True, all episodes
    at once (a block-diagonal problem). z (B, S, D) unit-length features, target and fit (B, S)
    -> (W (B, D, K), b (B, 1, K)); `init` warm-starts from an earlier fit."""
    B, S, D = z.shape
    W0, b0 = init if init is not None else (z.new_zeros(B, D, n_way), z.new_zeros(B, 1, n_way))
    W, b = W0.detach().clone().requires_grad_(), b0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = LOGREG_SCALE * torch.bmm(z, W) + b  # (B, S, n)
        # the sum over episodes of each episode's own penalised loss, so wd means the same for any B
        loss = (F.cross_entropy(logits[fit], target[fit], reduction="sum") + wd * (W * W).sum()) / B
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def logreg_predict(emb: torch.Tensor, ep, n_way: int, steps: int = 100, wd: float = 1e-2) -> torch.Tensor:
    """Logistic regression fitted on each episode's support set. emb (B, S, D) -> predictions (B, S).

    With the L2 penalty the optimal weights lie in the span of the n support features (the
    representer theorem: W = Q C for an orthonormal basis Q of that span, and ||W|| = ||C||), so
    when D > n the same problem is solved on the n coordinates z Q: the same optimum, at a cost that
    no longer grows with D (2,048 features: 20x faster here). Every episode has n support steps."""
    z = F.normalize(emb, dim=-1)
    fit = ~ep.is_query
    B, S, D = z.shape
    n = int(fit[0].sum())
    if D > n and bool((fit.sum(1) == n).all()):
        Q = torch.linalg.qr(z[fit].view(B, n, D).transpose(1, 2)).Q  # (B, D, n), orthonormal columns
        z = torch.bmm(z, Q)  # (B, S, n): each step's coordinates in the span
    W, b = logreg_fit(z, ep.target, fit, n_way, steps, wd)
    return (LOGREG_SCALE * torch.bmm(z, W) + b).argmax(-1)


def episode_accuracy(pred: torch.Tensor, ep) -> torch.Tensor:
    """Accuracy per episode over its scored steps: (B,)."""
    ok = (pred == ep.target) & ep.is_query
    return ok.sum(1).float() / ep.is_query.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate_methods(model, emb: torch.Tensor, cache, cfg: stmeta.Config, shots, episodes: int, methods,
                     batch: int = 100, n_query: int | None = None) -> dict:
    """{method: {shot: {mean, ci95, episodes, layout}}} on fixed support/query episodes of the
    meta-test classes. `emb` holds every clip's backbone embedding."""
    mc = cfg.meta
    pool = cache.indices(class_split="meta_test")
    classes = cache.classes_in("meta_test")
    results = {m: {} for m in methods}
    for k in shots:
        sampler = data.EpisodeSampler(cache, pool, classes, n_way=mc.n_way, k_shot=k, n_query=n_query or mc.n_query,
                                      layout="support_query")
        g = torch.Generator().manual_seed(EPISODE_SEED + 7 * k)
        accs = {m: [] for m in methods}
        kinds = {m: set() for m in methods}  # the distinct predictions of each episode's queries
        done = 0
        prog = stmeta.Progress(episodes, f"evaluating {mc.n_way}-way {k}-shot ({', '.join(methods)})", unit="episodes")
        while done < episodes:
            prog.update(min(batch, episodes - done))
            ep = sampler.sample(min(batch, episodes - done), g)
            x = emb[ep.clips]  # (B, S, D)
            xb = baseline_input(x)
            for m in methods:
                if m == "mann":
                    dev = next(model.parameters()).device
                    logits, _ = model(x.to(dev), ep.label_in.to(dev))
                    pred = logits.float().argmax(-1).cpu()
                elif m == "ncm":
                    pred = ncm_predict(xb, ep, mc.n_way)
                elif m == "logreg":
                    pred = logreg_predict(xb, ep, mc.n_way)
                else:
                    raise stmeta.Refused(f"unknown method {m!r}")
                accs[m].append(episode_accuracy(pred, ep))
                kinds[m] |= {len(set(p[q].tolist())) for p, q in zip(pred, ep.is_query)}
            done += ep.clips.shape[0]
        for m in methods:
            mean, ci = mean_ci(torch.cat(accs[m]).numpy())
            # one class for every query of every episode: 1/n_way +- 0, a collapsed model, not chance
            results[m][k] = {"mean": mean, "ci95": ci, "episodes": episodes, "layout": "support_query",
                             "collapsed": kinds[m] == {1} and mc.n_way > 1}
    return results


# -- Santoro's sequence layout: every step scored, accuracy by presentation of a class


SANTORO_TABLE1 = {  # Santoro et al. 2016, Table 1: 5 classes, accuracy (%) at the 1st, 2nd, 3rd, 4th, 5th, 10th instance
    "MANN (LRUA), Santoro et al. 2016": (36.4, 82.8, 91.0, 92.6, 94.9, 98.1),
    "LSTM, Santoro et al. 2016": (24.4, 49.5, 55.3, 61.0, 63.6, 62.5),
}
SANTORO_INSTANCES = (1, 2, 3, 4, 5, 10)


def label_count_correct(ep, n_way: int, per_class: int) -> torch.Tensor:
    """The predictor that never looks at the input and only counts labels: every class of an
    episode appears per_class times, so at step t it names the label with the most appearances
    left, argmax_c (per_class - n_c(<t)), choosing uniformly among ties (a label not shown yet
    ties with every other unseen one). Computed exactly, not trained: (B, S) float, the
    probability that this choice is right (chance-weighted on ties)."""
    onehot = F.one_hot(ep.target, n_way)  # (B, S, K)
    left = per_class - (onehot.cumsum(1) - onehot)  # (B, S, K): appearances still to come, before step t
    best = left == left.max(-1, keepdim=True).values
    return best.gather(-1, ep.target[..., None])[..., 0].float() / best.sum(-1)


def ncm_sequence_predict(emb: torch.Tensor, ep, n_way: int) -> torch.Tensor:
    """Nearest class mean in the sequence layout: at step t the means of the classes whose
    labels were shown before t (cosine). A class not shown yet cannot be named, so its first
    presentation is always wrong (but at t = 0, which guesses label 0). emb (B, S, D) -> (B, S)."""
    z = F.normalize(emb.float(), dim=-1)
    onehot = F.one_hot(ep.target, n_way).float()  # (B, S, K)
    sums = torch.einsum("bsk,bsd->bskd", onehot, z).cumsum(1)  # (B, S, K, D) inclusive
    before = torch.cat([torch.zeros_like(sums[:, :1]), sums[:, :-1]], 1)  # sums over steps < t
    seen = torch.cat([torch.zeros_like(onehot[:, :1]), onehot.cumsum(1)[:, :-1]], 1) > 0  # (B, S, K)
    sim = torch.einsum("bsd,bskd->bsk", z, F.normalize(before, dim=-1))
    return sim.masked_fill(~seen, -math.inf).nan_to_num(neginf=-1e9).argmax(-1)


def logreg_sequence_predict(emb: torch.Tensor, ep, n_way: int, steps: int = 20) -> torch.Tensor:
    """Logistic regression in the sequence layout: for each step t, fitted on the steps before t
    (all episodes at once) and applied to x_t. Each fit starts from the one before it, one more
    example later, so `steps` L-BFGS iterations suffice (the first fit gets 100). emb (B, S, D) -> (B, S)."""
    z = F.normalize(emb.float(), dim=-1)
    B, S, _ = z.shape
    pred = torch.zeros(B, S, dtype=torch.long)
    fit = None
    for t in range(1, S):
        known = torch.ones(B, t, dtype=torch.bool)
        fit = logreg_fit(z[:, :t], ep.target[:, :t], known, n_way, steps=100 if fit is None else steps, init=fit)
        pred[:, t] = (LOGREG_SCALE * torch.bmm(z[:, t:t + 1], fit[0]) + fit[1])[:, 0].argmax(-1)
    return pred


def by_presentation(correct: torch.Tensor, instance: torch.Tensor, n: int) -> torch.Tensor:
    """correct (B, S) float, instance (B, S) the presentation index (0 = first) -> (B, n): each
    episode's accuracy at the 1st ... n-th presentation of its classes (NaN where it has none)."""
    inst = F.one_hot(instance.clamp(max=n - 1), n).float()  # (B, S, n)
    return torch.einsum("bs,bsn->bn", correct.float(), inst) / inst.sum(1)


SEQUENCE_METHODS = ("mann", "label_count", "ncm", "logreg")


@torch.no_grad()
def evaluate_sequence(model, emb: torch.Tensor, cache, cfg: stmeta.Config, episodes: int, methods=SEQUENCE_METHODS,
                      batch: int = 100) -> dict:
    """{method: {mean, ci95, per_instance, per_instance_ci95, episodes, layout}} on fixed
    sequence-layout episodes of the meta-test classes: accuracy over all steps and at every
    presentation (1st ... seq_shots-th), mean +- 95% CI over episodes, the same episodes for
    every method and every run."""
    mc = cfg.meta
    sampler = data.EpisodeSampler(cache, cache.indices(class_split="meta_test"), cache.classes_in("meta_test"),
                                  n_way=mc.n_way, k_shot=mc.k_shot, n_query=mc.n_query, layout="sequence",
                                  seq_shots=mc.seq_shots)
    g = torch.Generator().manual_seed(EPISODE_SEED + 1)
    rows = {m: ([], []) for m in methods}  # per episode: overall accuracy, accuracy by presentation
    done = 0
    prog = stmeta.Progress(episodes, f"evaluating by presentation ({', '.join(methods)})", unit="episodes")
    while done < episodes:
        prog.update(min(batch, episodes - done))
        ep = sampler.sample(min(batch, episodes - done), g)
        x = emb[ep.clips]  # (B, S, D)
        xb = baseline_input(x)
        for m in methods:
            if m == "mann":
                dev = next(model.parameters()).device
                logits, _ = model(x.to(dev), ep.label_in.to(dev))
                correct = (logits.float().argmax(-1).cpu() == ep.target).float()
            elif m == "label_count":
                correct = label_count_correct(ep, mc.n_way, mc.seq_shots)
            elif m == "ncm":
                correct = (ncm_sequence_predict(xb, ep, mc.n_way) == ep.target).float()
            elif m == "logreg":
                correct = (logreg_sequence_predict(xb, ep, mc.n_way) == ep.target).float()
            else:
                raise stmeta.Refused(f"unknown method {m!r}")
            rows[m][0].append(correct.mean(1))
            rows[m][1].append(by_presentation(correct, ep.instance, mc.seq_shots))
        done += ep.clips.shape[0]
    results = {}
    for m, (overall, per) in rows.items():
        mean, ci = mean_ci(torch.cat(overall).numpy())
        per = torch.cat(per).numpy()  # (episodes, seq_shots)
        cols = [mean_ci(per[:, i]) for i in range(per.shape[1])]
        results[m] = {"mean": mean, "ci95": ci, "episodes": episodes, "layout": "sequence",
                      "per_instance": [c[0] for c in cols], "per_instance_ci95": [c[1] for c in cols]}
    return results


def sequence_table(rows: dict[str, dict], seq_shots: int, santoro: bool = True) -> list[str]:
    """Markdown: accuracy at Santoro's presentations (1st-5th, 10th) +- 95% CI, and overall."""
    cols = [i for i in SANTORO_INSTANCES if i <= seq_shots]
    out = ["| method | " + " | ".join(stmeta.ordinal(i) for i in cols) + " | all steps |",
           "|---|" + "--:|" * (len(cols) + 1)]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{100 * r['per_instance'][i - 1]:.1f} +- "
                                               f"{100 * r['per_instance_ci95'][i - 1]:.1f}" for i in cols)
                   + f" | {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} |")
    if santoro and seq_shots >= 10:
        for name, vals in SANTORO_TABLE1.items():
            out.append(f"| *{name} (their Omniglot test classes)* | " + " | ".join(f"{v:.1f}" for v in vals) + " | - |")
    return out


def collapsed(r: dict) -> str:
    """' (collapsed)' when an accuracy of 1/n_way +- 0 says every query got the same class."""
    return " (collapsed: one class for every query)" if r.get("collapsed") else ""


def shot_range(mc: stmeta.MetaConfig) -> str:
    """'1-shot', or '1- to 5-shot' for a run meta-trained on a mix of shot counts."""
    return f"{mc.k_shot}- to {mc.k_shot_max}-shot" if mc.k_shot_max > mc.k_shot else f"{mc.k_shot}-shot"


def describe_arm(ck: dict, cfg: stmeta.Config) -> dict[str, str]:
    """What a stage-3 run is, in words: its model (MANN, or the memory-free LSTM), the same
    without the shot range it meta-trained on ("kind": fewer labels clamp that range), and its
    encoder."""
    mc = cfg.meta
    kind = "LSTM, no memory" if cfg.mann.read_heads == 0 else f"MANN ({cfg.mann.write.upper()})"
    if mc.input_dropout:
        kind += f", input dropout {mc.input_dropout:g}"
    if mc.train_views > 1:
        kind += f", {mc.train_views} views a clip"
    if mc.view_episodes:  # semi-supervised meta-training: single clips as classes, their views as instances
        kind += f" + view episodes ({mc.view_episodes:.0%} of batches)"
    if mc.clusters:  # semi-supervised meta-training: the unlabelled clips' clusters as classes too
        kind += f" + cluster episodes ({mc.clusters} k-means clusters, {mc.cluster_share:.0%} of batches)"
    model = kind
    if mc.layout == "support_query" and mc.k_shot_max > mc.k_shot:
        model += f" meta-trained {shot_range(mc)}"
    encoder = encoder_name(ck, cfg)
    if mc.backbone != "pixels" and mc.pool != "mean":
        encoder += f", tokens pooled `{mc.pool}`"
    if mc.backbone == "mae" and not mc.freeze_backbone:
        encoder += ", fine-tuned end to end with the MANN"
    if ck.get("warm_start"):
        warm = f" (warm start: {os.path.basename(os.path.dirname(ck['warm_start']))})"
        model, kind = model + warm, kind + warm
    return {"model": model, "kind": kind, "encoder": encoder}


def describe_run(ck: dict, cfg: stmeta.Config, cache) -> str:
    """One sentence a person can judge a run by: model, encoder, data, preset and budget."""
    mc, what = cfg.meta, describe_arm(ck, cfg)
    eps = ck.get("step", 0) * mc.batch_size * mc.accum_steps
    seconds = ck.get("metrics", {}).get("train_seconds")
    took = f", {stmeta.format_duration(seconds)} of training" if seconds else ""
    aug = [w for w, on in (("rotated copies of the meta-train classes as new classes", mc.rotate_classes),
                            (f"shifts up to {mc.max_shift} px", mc.max_shift)) if on]
    aug = f"; augmented: {', '.join(aug)}" if aug else ""
    shots = f" (meta-trained {shot_range(mc)})" if mc.layout == "support_query" and mc.k_shot_max <= mc.k_shot else ""
    # the classification phase reads the labels whatever the MANN's batches did
    readers = ("" if not mc.classify else " (the classification phase; the MANN read none)" if stmeta.label_free(mc)
               else " (the classification phase and the MANN)")
    labels = (" Labels: none read (every meta-train batch is episodes without labels)." if stmeta.label_free(mc)
              and not mc.classify else f" Labels: {cfg.data.labeled_fraction:.0%} of each meta-train class's "
              f"clips{readers}." if cfg.data.labeled_fraction < 1 else "")
    mean = ck.get("model", {}).get("input_mean")
    centred = ", inputs centred on the pretraining pool's mean" if mean is not None and bool(mean.any()) else ""
    return (f"{what['model']} on {what['encoder']} ({'frozen' if mc.freeze_backbone else 'end to end'}{centred}), "
            f"preset `{cfg.preset}`, {mc.n_way}-way `{mc.layout}` episodes{shots}; budget {ck.get('step')} steps x "
            f"{mc.batch_size * mc.accum_steps} episodes = {eps:,} episodes{took}{aug}. Data: {cache.root}.{labels}")


def fewshot(run: str, device: str = "auto", cache=None, shots=(1, 5), episodes: int | None = None,
            methods=("mann", "ncm", "logreg"), data_dir: str | None = None) -> dict:
    """Score a stage-3 run on fixed held-out episodes and write its report section. Called by
    train.py at the end of stage 3 and by `python eval.py fewshot`.

    A run meta-trained in the support/query layout is scored on N-way K-shot episodes for each
    K in `shots`. A sequence-layout run (Santoro's) is scored in its own layout, by presentation,
    beside the image-blind label-count predictor, nearest class mean and logistic regression on
    the same inputs and episodes; its K-shot table then holds the baselines only (a sequence
    MANN is never shown a label on the step it has to classify)."""
    # last.pt, not best.pt: best.pt was chosen on validation episodes of these same held-out
    # classes, and scoring it on them would flatter it
    ck, cfg, folder = load_run(run, ("mann",), prefer="last.pt")
    dev = stmeta.pick_device(device, verbose=False)
    cache = cache or open_cache(ck, data_dir)
    model = build_model(ck, cfg).to(dev)
    episodes = episodes if episodes is not None else cfg.meta.test_episodes
    pool = cache.indices(class_split="meta_test")
    emb = run_embeddings(model, cache, cfg, dev, pool)
    mc = cfg.meta
    sequence = mc.layout == "sequence"
    shot_methods = tuple(m for m in methods if not (sequence and m == "mann"))
    res = evaluate_methods(model, emb, cache, cfg, shots, episodes, shot_methods) if shot_methods else {}
    if sequence:
        seq = evaluate_sequence(model, emb, cache, cfg, episodes,
                                tuple(m for m in SEQUENCE_METHODS if m in methods or m == "label_count"))
        for m, r in seq.items():
            res.setdefault(m, {})["sequence"] = r
    what = describe_arm(ck, cfg)
    names = {"mann": f"{what['model']} ({what['encoder']})",
             "label_count": "label counting (never looks at the input)",
             "ncm": f"nearest class mean ({what['encoder']})", "logreg": f"logistic regression ({what['encoder']})"}
    body = ["## Few-shot on held-out classes (eval.py fewshot)\n",
            f"{describe_run(ck, cfg, cache)}\n",
            f"{mc.n_way}-way episodes from the {len(cache.classes_in('meta_test'))} meta-test classes, "
            f"{episodes} fixed episodes per setting (seed {EPISODE_SEED}), mean accuracy +- 95% CI over episodes, "
            f"scored with the final checkpoint (last.pt). Chance: {100 / mc.n_way:.0f}%.\n"]
    if sequence:
        body += [f"Santoro's sequence layout: {mc.seq_shots} instances of each class in random order, the label of "
                 f"step t-1 shown with step t, every step scored; accuracy by presentation (the k-th time a class is shown):\n"]
        body += sequence_table({names[m]: res[m]["sequence"] for m in SEQUENCE_METHODS if "sequence" in res.get(m, {})},
                               mc.seq_shots)
        body.append("")
    if shot_methods:
        body += [f"Support/query episodes, {mc.n_query} query per class; the baselines are fitted on each "
                 f"episode's support set:\n",
                 "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for m in shot_methods:
            body.append(f"| {names[m]} | " + " | ".join(
                f"{100 * res[m][k]['mean']:.1f} +- {100 * res[m][k]['ci95']:.1f}{collapsed(res[m][k])}"
                if k in res[m] else "-" for k in shots) + " |")
    for png, what_png in (("learning_curve.png", "learning curve"), ("curves.png", "training curves"),
                          ("accuracy.png", "accuracy")):
        if os.path.exists(os.path.join(folder, png)):
            body.append(f"\n![{what_png}]({png})")
    path = update_report(folder, "fewshot", "\n".join(body), run_header(ck, cfg, cache, dev))
    stmeta.write_json(os.path.join(folder, "fewshot.json"), res, indent=2, default=str)
    print("\n".join(body[1:]))
    print(f"report: {path}")
    return res


def cmd_fewshot(args) -> dict:
    return fewshot(args.run, args.device, shots=tuple(args.shots), episodes=args.episodes,
                   methods=tuple(args.methods), data_dir=args.data)


# -----------------------------------------------------------------------------
# ablation: meta-learning only / representation only / both, on the same episodes


def encoder_name(ck: dict, cfg: stmeta.Config) -> str:
    """What a stage-3 run's backbone is, in a few words: MAE-pretrained, then (by default)
    classification-tuned on the meta-train classes; or whatever --pretrained gave it."""
    if cfg.meta.backbone != "mae":
        return {"scratch": "ViT from scratch", "pixels": "pixels"}[cfg.meta.backbone]
    if ck.get("init"):
        where = f"{os.path.basename(os.path.dirname(ck['init']))}/{os.path.basename(ck['init'])}"
        kind = {"mae": "MAE encoder" if cfg.meta.classify else "MAE encoder, no labels",
                "classifier": "encoder tuned on labels", "mann": "encoder of a stage-3 run",
                "published": "published encoder"}.get(ck.get("init_kind"), "encoder")  # runs before init_kind: "encoder"
        name = f"{kind} ({where})" if kind != "encoder" else f"encoder of {where}"
        # the classification phase tuned the --pretrained encoder before the MANN saw it
        return f"{name}, then tuned on meta-train labels" if cfg.meta.classify else name
    return "MAE encoder tuned on meta-train labels" if cfg.meta.classify else "MAE encoder, no labels"


def run_budget(ck: dict, cfg: stmeta.Config) -> str:
    """'2,000 steps x 16 = 32,000 episodes, 14m 40s': what an arm was trained with."""
    mc = cfg.meta
    eps = ck.get("step", 0) * mc.batch_size * mc.accum_steps
    seconds = ck.get("metrics", {}).get("train_seconds")
    budget = f"{ck.get('step', 0):,} steps x {mc.batch_size * mc.accum_steps} = {eps:,} episodes" + (
        f", {stmeta.format_duration(seconds)}" if seconds else "")
    warm = ck.get("warm_start")
    if warm and os.path.isfile(warm):  # the warm run's budget is part of this one's
        wck = stmeta.load_checkpoint(warm)
        budget += f" (+ its warm start: {run_budget(wck, stmeta.config_from_dict(stmeta.Config, wck['config']))})"
    return budget


def cmd_ablation(args) -> dict:
    """Every arm on the same fixed held-out episodes. --both is the full method (MAE + MANN), or
    whatever run the others are compared with; --meta-only the MANN on a ViT from scratch;
    --extra any other stage-3 runs (pixels, the MAE without labels, the memory-free LSTM with
    --mann.read_heads=0, ...) and stage-2 runs (an encoder tuned on the labels: nearest class mean
    and logistic regression on it, representation only given the labels). The non-meta-learned
    baselines (and, in the sequence layout, the label-count predictor) are computed on the --both
    run's embeddings."""
    both_ck, both_cfg, folder = load_run(args.both, ("mann",), prefer="last.pt")  # see fewshot()
    dev = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(both_ck, args.data)
    episodes = args.episodes if args.episodes is not None else both_cfg.meta.test_episodes
    pool = cache.indices(class_split="meta_test")
    mc = both_cfg.meta
    sequence = mc.layout == "sequence"

    def score(ck, cfg, methods):
        model = build_model(ck, cfg).to(dev)
        emb = run_embeddings(model, cache, cfg, dev, pool)
        if sequence:
            return evaluate_sequence(model, emb, cache, cfg, episodes, methods)
        return evaluate_methods(model, emb, cache, cfg, args.shots, episodes, [m for m in methods if m != "label_count"])

    arms = []  # (name, made by, budget, result)
    runs = ([("meta-learning only: ", args.meta_only)] if args.meta_only else []) + [("", e) for e in args.extra or []]
    for role, run in runs:
        ck, cfg, _ = load_run(run, ("mann", "classifier") if role == "" else ("mann",), prefer="last.pt")
        if ck["kind"] == "classifier":  # representation only given the labels: a stage-2 run's tuned encoder
            if sequence:
                raise stmeta.Refused(f"{run} is a stage-2 run: its class means score support/query episodes, and "
                                     f"{args.both} is a sequence-layout run")
            ck, cfg, _ = load_run(run, ("classifier",))  # the best.pt `eval.py probe` reads too
            emb = run_embeddings(encoder_of_run(ck, cfg, dev, mc.pool), cache, cfg, dev, pool)
            r = evaluate_methods(None, emb, cache, both_cfg, args.shots, episodes, ("ncm", "logreg"))
            name = f"representation only: {tuned_encoder_name(ck, cfg.data.labeled_fraction)}, tokens pooled `{mc.pool}`"
            budget = f"{ck.get('step', 0):,} classification steps on {cfg.data.labeled_fraction:.0%} of the labels"
            arms += [(f"{name} + nearest class mean", run, budget, r["ncm"]),
                     (f"{name} + logistic regression", run, budget, r["logreg"])]
            continue
        if (cfg.meta.n_way, cfg.meta.layout) != (mc.n_way, mc.layout):
            raise stmeta.Refused(f"{run} is a {cfg.meta.n_way}-way {cfg.meta.layout} run; {args.both} is "
                             f"{mc.n_way}-way {mc.layout}: arms must be scored on the same episodes")
        what = describe_arm(ck, cfg)
        arms.append((f"{role}{what['model']} on {what['encoder']}", run, run_budget(ck, cfg),
                     score(ck, cfg, ("mann",))["mann"]))
    res = score(both_ck, both_cfg, ("mann", "label_count", "ncm", "logreg") if sequence else ("mann", "ncm", "logreg"))
    what = describe_arm(both_ck, both_cfg)
    enc = what["encoder"]
    role = "both: " if both_cfg.meta.backbone == "mae" else ""
    rep = "representation only: " if both_cfg.meta.backbone == "mae" else ""
    if sequence:
        arms.append(("label counting (never looks at the input)", "-", "computed", res["label_count"]))
    else:  # the floors every representation must beat, on the same episodes
        for name, emb in floor_features(cache, both_cfg, pool).items():
            r = evaluate_methods(None, emb, cache, both_cfg, args.shots, episodes, ("ncm", "logreg"))
            arms += [(f"{name} + nearest class mean", "-", "-", r["ncm"]),
                     (f"{name} + logistic regression", "-", "-", r["logreg"])]
    arms.append((f"{rep}{enc} + nearest class mean", args.both, "-", res["ncm"]))
    arms.append((f"{rep}{enc} + logistic regression", args.both, "-", res["logreg"]))
    arms.append((f"{role}{what['model']} on {enc}", args.both, run_budget(both_ck, both_cfg), res["mann"]))

    body = ["## Ablation (eval.py ablation)\n",
            f"Every arm on the same {episodes} fixed {mc.n_way}-way `{mc.layout}` episodes of the held-out classes; "
            f"mean accuracy +- 95% CI over episodes. Chance {100 / mc.n_way:.0f}%. Budget: what each arm was trained "
            f"with (the baselines are fitted on each episode's labelled steps).\n"]
    if sequence:
        cols = [i for i in SANTORO_INSTANCES if i <= mc.seq_shots]
        body += ["| arm | made by | budget | " + " | ".join(stmeta.ordinal(i) for i in cols) + " | all steps |",
                 "|---|---|---|" + "--:|" * (len(cols) + 1)]
        for name, run, budget, r in arms:
            body.append(f"| {name} | `{run}` | {budget} | " + " | ".join(
                f"{100 * r['per_instance'][i - 1]:.1f} +- {100 * r['per_instance_ci95'][i - 1]:.1f}" for i in cols)
                + f" | {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} |")
        charts = [(f"ablation_{stmeta.ordinal(i)}.png", f"{stmeta.ordinal(i)} presentation", i - 1) for i in (1, 2)]
        for png, title, i in charts:
            stmeta.bar_chart(os.path.join(folder, png), [chart_label(a[0]) for a in arms],
                             [a[3]["per_instance"][i] for a in arms], [a[3]["per_instance_ci95"][i] for a in arms],
                             title=f"{mc.n_way}-way, held-out classes: accuracy at the {title}", ylabel="accuracy",
                             hline=1 / mc.n_way, hline_label="chance", size=(max(760, 80 * len(arms) + 120), 440))
            body.append(f"\n![{title}]({png})")
    else:
        body += ["| arm | made by | budget | " + " | ".join(f"{k}-shot" for k in args.shots) + " |",
                 "|---|---|---|" + "---|" * len(args.shots)]
        for name, run, budget, r in arms:
            body.append(f"| {name} | `{run}` | {budget} | " + " | ".join(
                f"{100 * r[k]['mean']:.1f} +- {100 * r[k]['ci95']:.1f}{collapsed(r[k])}" if k in r else "-"
                for k in args.shots) + " |")
        for k in args.shots:
            png = f"ablation_{k}shot.png"
            stmeta.bar_chart(os.path.join(folder, png), [chart_label(a[0]) for a in arms], [a[3][k]["mean"] for a in arms],
                             [a[3][k]["ci95"] for a in arms], title=f"{mc.n_way}-way {k}-shot, held-out classes",
                             ylabel="accuracy", hline=1 / mc.n_way, hline_label="chance",
                             size=(max(760, 80 * len(arms) + 120), 440))
            body.append(f"\n![{k}-shot ablation]({png})")
    path = update_report(folder, "ablation", "\n".join(body), run_header(both_ck, both_cfg, cache, dev))
    print("\n".join(body[2:4 + len(arms)]))
    print(f"report: {path}")
    return {name: r for name, _, _, r in arms}


# -----------------------------------------------------------------------------
# labels: the semi-supervised sweep, accuracy against the fraction of meta-train labels


def labels_used(cfg: stmeta.Config) -> float:
    """The fraction of meta-train labels a run read: --labeled-fraction, or 0 where every MANN
    batch is episodes without labels (view or cluster episodes only) and no classification
    phase tuned the encoder on them."""
    return 0.0 if stmeta.label_free(cfg.meta) and not cfg.meta.classify else cfg.data.labeled_fraction


def labels_chart_name(name: str) -> str:
    """An arm of the labels chart in a few words: what reads which features, and the recipe's
    parts that change between arms (the table keeps the whole name)."""
    name = chart_label(name)
    for pattern, short in ((r", tokens pooled `\w+`", ""), (r", no labels", ""), (r" \(100% of batches\)", " only"),
                           (r" \(\d+% of batches\)", ""), (r", input dropout [0-9.]+", ""),
                           (r", (\d+) views a clip", r", \1 views"), (r"MAE encoder", "MAE"),
                           (r" \(\d+ features(, \w+ pool)?\)", ""), (r"the MAE, tuned on the labels", "the MAE tuned on them")):
        name = re.sub(pattern, short, name)
    return name


def tuned_encoder_arms(run: str, ck: dict) -> dict[str, dict]:
    """A stage-2 run (an encoder tuned on a fraction of the meta-train labels) as two arms of the
    labels sweep, "representation only" given the same labels as the MANN arms: nearest class mean
    and logistic regression on its frozen features, from its `eval.py probe` (probe.json). This
    is Chen et al. 2019's Baseline (arXiv 1904.04232) on the MAE: supervised on the base classes,
    then a simple classifier on each episode's support set."""
    path = os.path.join(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run)), "probe.json")
    if not os.path.exists(path):
        raise stmeta.Refused(f"{run}: a stage-2 run with no probe.json (run `python eval.py probe --run {run}` first)")
    with open(path) as f:
        probe = json.load(f)
    found = [name for name in probe if name not in FLOORS.values()]
    if len(found) != 1:
        raise stmeta.Refused(f"{path}: expected one encoder among its features, found {found or 'none'}")
    res = {m: {int(k): v for k, v in r.items() if k.isdigit()} for m, r in probe[found[0]].items()}
    features = re.search(r"\(([^()]*)\)$", found[0])  # "(2048 features, space pool)": what the probe read
    encoder = tuned_encoder_name(ck) + (f" ({features.group(1)})" if features else "")
    return {f"representation only: {label} on the {encoder}": res[m]
            for m, label in (("ncm", "nearest class mean"), ("logreg", "logistic regression")) if m in res}


def tuned_encoder_name(ck: dict, fraction: float | None = None) -> str:
    """A stage-2 run's encoder in a few words: where it started, then tuned on the labels (on
    `fraction` of them, where the name must tell one run from another)."""
    init = ck.get("init")  # --pretrained; without it stage 2 pretrained its own MAE first
    start = "MAE encoder" if not init else (
        f"{ {'mae': 'MAE encoder', 'published': 'published encoder'}.get(ck.get('init_kind'), 'encoder')} "
        f"({os.path.basename(os.path.dirname(init))}/{os.path.basename(init)})")
    return f"{start}, tuned on {'the' if fraction is None else f'{fraction:.0%} of the'} labels"


def view_shot_range(ck: dict, mc: stmeta.MetaConfig) -> str:
    """The K range of a run's view episodes (train.py saves it; a run from before says so)."""
    k_max = ck.get("metrics", {}).get("view_k_shot_max")
    if k_max is None:
        return "K not recorded"
    return f"{mc.k_shot}- to {k_max}-shot" if k_max > mc.k_shot else f"{mc.k_shot}-shot"


def cmd_labels(args) -> dict:
    """Each arm's held-out accuracy against the fraction of meta-train labels its MANN was
    meta-trained with (`train.py --labeled-fraction F`; the MAE saw every clip, unlabelled), from
    the runs' own final evaluations (eval.py fewshot: the same fixed episodes for every run).
    Runs are grouped into arms by what they are (model and encoder), not by the shot range a
    run could meta-train on: fewer labelled clips clamp K (1..5 becomes 1..4 at 10%), and the
    table row says so. `--by model` groups by model and encoder only and names each run's recipe
    in its row: train.py's defaults take the semi-supervised recipe below 100% of the labels, so
    a sweep of the defaults is one line."""
    arms: dict[str, list[tuple[float, dict, str]]] = {}
    ncm: dict[str, dict] = {}  # encoder -> its nearest class mean (a run's fewshot.json)
    n_way = None
    for run in args.runs:
        ck, cfg, _ = load_run(run, ("mann", "classifier"), prefer="last.pt")
        if ck["kind"] == "classifier":  # representation only, with the same labels: the tuned encoder's probe
            if n_way not in (None, cfg.meta.n_way):
                raise stmeta.Refused(f"{run} is {cfg.meta.n_way}-way and an earlier run {n_way}-way: one sweep, "
                                     f"one episode shape")
            n_way = cfg.meta.n_way
            for name, r in tuned_encoder_arms(run, ck).items():
                arms.setdefault(name, []).append((cfg.data.labeled_fraction, r, "- (no meta-training)"))
            continue
        path = os.path.join(os.path.dirname(find_checkpoint(run, "last.pt")), "fewshot.json")
        if not os.path.exists(path):
            raise stmeta.Refused(f"{run}: no fewshot.json (run `python eval.py fewshot --run {run}` first)")
        with open(path) as f:
            res = {m: {int(k): v for k, v in r.items() if k.isdigit()} for m, r in json.load(f).items()}
        if n_way not in (None, cfg.meta.n_way):
            raise stmeta.Refused(f"{run} is {cfg.meta.n_way}-way and an earlier run {n_way}-way: one sweep, one episode shape")
        n_way = cfg.meta.n_way
        what = describe_arm(ck, cfg)
        shots = shot_range(cfg.meta) if cfg.meta.layout == "support_query" else f"{cfg.meta.seq_shots} a class"
        if cfg.meta.view_episodes:  # view episodes take the K asked for, whatever the labels allow
            views = view_shot_range(ck, cfg.meta)
            shots = f"views {views}" if stmeta.label_free(cfg.meta) else f"{shots}; views {views}"
        name = what["kind"]
        if getattr(args, "by", "arm") == "model":  # the recipe (what describe_arm adds to the model) goes to the row
            core = "LSTM, no memory" if cfg.mann.read_heads == 0 else f"MANN ({cfg.mann.write.upper()})"
            recipe = name[len(core):].lstrip(", ").strip()
            name, shots = core, f"{recipe}; {shots}" if recipe else shots
        arms.setdefault(f"{name} on {what['encoder']}", []).append((labels_used(cfg), res["mann"], shots))
        if "ncm" in res and cfg.meta.classify:  # an encoder tuned on the labels: its class means move with them
            arms.setdefault(f"representation only: nearest class mean on {what['encoder']}", []).append(
                (labels_used(cfg), res["ncm"], "- (no meta-training)"))
        elif "ncm" in res:  # the same encoder's nearest class mean needs no meta-train labels: the bar to clear
            ncm.setdefault(what["encoder"], res["ncm"])
    for points in arms.values():
        points.sort(key=lambda p: p[0])  # by fraction (two runs at one fraction are both drawn)
    body = ["## Labels: accuracy against the fraction of meta-train labels (eval.py labels)\n",
            "Each arm's MANN meta-trained with the given fraction of each meta-train class's labelled clips "
            "(the MAE pretrained on every clip, without labels); held-out classes, the runs' own 1,000 fixed "
            "episodes, mean +- 95% CI." + (
                " The representation-only arms read the same labels another way: the encoder tuned on them by "
                "classification (stage 2), then nearest class mean or logistic regression on each episode's "
                "support set (Chen et al. 2019's Baseline), from each stage-2 run's `eval.py probe`."
                if any(name.startswith("representation only") and "tuned on the labels" in name for name in arms)
                else "") + "\n",
            "| arm | labels | meta-trained on | " + " | ".join(f"{k}-shot" for k in args.shots) + " |",
            "|---|--:|---|" + "--:|" * len(args.shots)]
    def cells(r: dict) -> str:
        return " | ".join(f"{100 * r[k]['mean']:.1f} +- {100 * r[k]['ci95']:.1f}" if k in r else "-"
                          for k in args.shots) + " |"

    for name, points in arms.items():
        for frac, r, shots in reversed(points):
            body.append(f"| {name} | {100 * frac:g}% | {shots} | " + cells(r))
    for encoder, r in ncm.items():
        body.append(f"| nearest class mean on {encoder} (no meta-training) | 0% | - | " + cells(r))
    k = args.shots[0]
    # the fractions as evenly spaced categories (0%, 5%, 10%, 100% are unreadable on a linear axis)
    where = {f: i for i, f in enumerate(sorted({f for pts in arms.values() for f, _, _ in pts}))}
    series = {labels_chart_name(name): ([where[f] for f, _, _ in pts], [r[k]["mean"] if k in r else None
                                                                        for _, r, _ in pts])
              for name, pts in arms.items()}
    stmeta.line_chart(args.out, series, title=f"{k}-shot accuracy on held-out classes against the labels used",
                      xlabel="meta-train labels", ylabel="accuracy", y_from=0.0,
                      xticks={i: f"{100 * f:g}%" for f, i in where.items()},
                      refs={"chance": 1 / n_way, **{labels_chart_name(f"NCM on {e}"): r[k]["mean"]
                                                    for e, r in ncm.items() if k in r}})
    body.append(f"\n![labels sweep]({os.path.basename(args.out)})")
    print("\n".join(body))
    return {name: pts for name, pts in arms.items()}


# -----------------------------------------------------------------------------
# A run's frozen encoder, for probe and export


def encoder_of_run(ck: dict, cfg: stmeta.Config, device, pool: str | None = None):
    """An object whose `.backbone` embeds clips as stage 3 does (run_embeddings' input): a stage-3
    run's own backbone, or an MAE / classifier checkpoint's encoder as the "mae" backbone. `pool`
    (models.POOLS) re-pools a ViT's tokens another way than the run's meta.pool."""
    model = build_model(ck, cfg).to(device)
    if ck["kind"] == "mann" and (pool is None or pool == cfg.meta.pool or model.backbone.vit is None):
        backbone = model.backbone
    else:
        vit = model.backbone.vit if ck["kind"] == "mann" else model.encoder
        backbone = models.build_backbone("mae", cfg.model.encoder, pool=pool or cfg.meta.pool)
        backbone.vit.load_state_dict(vit.state_dict())
        backbone = backbone.to(device).eval()
    return type("Holder", (), {"backbone": backbone})()


# -----------------------------------------------------------------------------
# probe: does a representation carry the class? Frozen features on held-out classes, beside
# the floors any representation must beat: one frame's pixels and simple pixel motion statistics


@torch.no_grad()
def pixel_features(cache, cfg: stmeta.Config, indices: np.ndarray, kind: str, size: int = 8) -> torch.Tensor:
    """(N, D) floors from the clips' pixels (centred window, the model's input), rows of clips
    not in `indices` zero. kind "frame": the middle frame pooled to size x size (appearance);
    "motion": the mean frame and the mean absolute frame difference, each size x size (what a
    clip looks like and where it moves); "edges": the grey image's gradient magnitude averaged
    over the clip, size x size (shapes and their paths, whatever their colour)."""
    enc = cfg.model.encoder
    ds = data.ClipDataset(cache, indices, num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate,
                          size=enc.img_size, train=False)
    rows = []
    for video, _ in torch.utils.data.DataLoader(ds, batch_size=64, num_workers=cfg.data.workers):
        v = video.float()  # (B, C, T, H, W)
        pool = lambda x: F.adaptive_avg_pool2d(x, size).flatten(1)  # noqa: E731 - (B, C, H, W) -> (B, C*s*s)
        if kind == "frame":
            rows.append(pool(v[:, :, v.shape[2] // 2]))
        elif kind == "edges":
            g = v.mean(1)  # (B, T, H, W) grey
            gy, gx = g[..., 1:, :-1] - g[..., :-1, :-1], g[..., :-1, 1:] - g[..., :-1, :-1]
            rows.append(pool((gx ** 2 + gy ** 2).sqrt().mean(1, keepdim=True)))
        else:
            diff = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(2) if v.shape[2] > 1 else torch.zeros_like(v[:, :, 0])
            rows.append(torch.cat([pool(v.mean(2)), pool(diff)], dim=1))
    out = torch.zeros(len(cache.labels), rows[0].shape[1])
    out[torch.as_tensor(indices)] = torch.cat(rows)
    return out


FLOORS = {"frame": "floor: middle frame's pixels, 8 x 8",
          "motion": "floor: mean frame + mean abs frame difference, 8 x 8 each",
          "edges": "floor: grey gradient magnitude averaged over the clip, 8 x 8"}


FLOORS_SHORT = {"frame": "floor: one frame", "motion": "floor: motion stats", "edges": "floor: edges"}


def chart_label(name: str) -> str:
    """An arm's name short enough for a bar of the ablation chart (the table keeps the long one)."""
    for kind, long in FLOORS.items():
        name = name.replace(long, FLOORS_SHORT[kind])
    name = re.sub(r" \([^()]*\.pt\)", "", re.sub(r"encoder of [^ ]*\.pt", "encoder", name))  # file names
    for long, short in (("nearest class mean", "NCM"), ("logistic regression", "logreg"), ("representation only: ", ""),
                        ("meta-learning only: ", "meta-only: "), ("MANN (LRUA)", "MANN"), ("MANN (NTM)", "MANN")):
        name = name.replace(long, short)
    return name


def floor_features(cache, cfg: stmeta.Config, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """{name: (N, D)} the pixel floors on the given clips (every probe and ablation shows them)."""
    return {name: pixel_features(cache, cfg, indices, kind) for kind, name in FLOORS.items()}


def cmd_probe(args) -> dict:
    """Nearest class mean and logistic regression on a run's frozen encoder features (mean of
    its tokens, the encoder's final norm: what stage 3 feeds the MANN), and on the pixel floors
    (FLOORS), on the same fixed held-out episodes. A representation that does not beat the floors
    does not carry the class."""
    ck, cfg, folder = load_run(args.run, ("mae", "classifier", "mann"))
    device = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(ck, args.data)
    holder = encoder_of_run(ck, cfg, device, args.pool)
    backbone = holder.backbone
    pool = cache.indices(class_split="meta_test")
    episodes = args.episodes if args.episodes is not None else cfg.meta.test_episodes
    source = describe_arm(ck, cfg)["encoder"] if ck["kind"] == "mann" else {
        "mae": "MAE encoder, no labels", "classifier": "encoder tuned on meta-train labels"}[ck["kind"]]
    pooled = "" if backbone.vit is None else f", {backbone.pool} pool"
    features = {f"{source} ({backbone.out_dim} features{pooled})": run_embeddings(holder, cache, cfg, device, pool),
                **floor_features(cache, cfg, pool)}
    res, rows = {}, []
    for name, emb in features.items():
        r = evaluate_methods(None, emb, cache, cfg, args.shots, episodes, ("ncm", "logreg"))
        res[name] = r
        for m, label in (("ncm", "nearest class mean"), ("logreg", "logistic regression")):
            rows.append(f"| {name} | {label} | " + " | ".join(
                f"{100 * r[m][k]['mean']:.1f} +- {100 * r[m][k]['ci95']:.1f}" for k in args.shots) + " |")
    mc = cfg.meta
    body = ["## Does the representation carry the class? (eval.py probe)\n",
            f"Frozen features of the {len(cache.classes_in('meta_test'))} held-out classes, {mc.n_way}-way episodes "
            f"({episodes} fixed episodes per setting, seed {EPISODE_SEED}, 1 query per class), mean +- 95% CI; "
            f"chance {100 / mc.n_way:.0f}%. Features LayerNorm'ed as the MANN reads them.\n",
            "| features | method | " + " | ".join(f"{k}-shot" for k in args.shots) + " |",
            "|---|---|" + "---|" * len(args.shots), *rows]
    update_report(folder, "probe", "\n".join(body), run_header(ck, cfg, cache, device))
    stmeta.write_json(os.path.join(folder, "probe.json"), res, indent=2, default=str)
    print("\n".join(body[2:]))
    return res


# -----------------------------------------------------------------------------
# export: the latent embedding of every clip (the paper's latent export hook)


@torch.no_grad()
def cmd_export(args) -> dict:
    ck, cfg, folder = load_run(args.run, ("mae", "classifier", "mann"))
    device = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(ck, args.data)
    emb = run_embeddings(encoder_of_run(ck, cfg, device), cache, cfg, device, np.arange(len(cache.labels)))
    out = args.out or os.path.join(folder, "latents.npy")
    with open(out + ".tmp", "wb") as f:  # renamed into place: a kill never leaves half a file
        np.save(f, emb.numpy().astype(np.float32))
    os.replace(out + ".tmp", out)
    meta = {"embeddings": os.path.basename(out), "shape": list(emb.shape), "classes": cache.classes,
            "labels": cache.labels.tolist(), "all_labels": cache.all_labels,
            "class_split": [cache.class_split[c] if c >= 0 else None for c in cache.labels.tolist()],
            "clip_split": [str(s) for s in cache.clip_split], "checkpoint": find_checkpoint(args.run)}
    stmeta.write_json(os.path.splitext(out)[0] + ".json", meta)
    body = (f"## Latent export (eval.py export)\n\n`{os.path.basename(out)}`: {emb.shape[0]} clips x {emb.shape[1]} "
            f"features (mean-pooled encoder tokens, centred window), labels and splits in "
            f"`{os.path.basename(os.path.splitext(out)[0])}.json`.")
    update_report(folder, "export", body, run_header(ck, cfg, cache, device))
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]}) and its labels")
    return meta


# =============================================================================
# NOT THE CORE. Everything from here to the command line is the speed benchmark (`eval.py
# speed`): timing, FLOP counts, and reference networks built as other codebases build them
# (timm-style blocks, SPT + LSA as their published code writes them) to compare against. It
# measures the model; it defines nothing the papers describe, and a reader can skip it.
# =============================================================================
# -----------------------------------------------------------------------------
# speed: benchmark of every hot path
#
# One run measures the training steps (MAE pretraining at three mask ratios, classifier
# fine-tuning, the encoder against timm-style blocks and against SPT + LSA as their published
# code writes them, our encoder's fast paths against its paper forms (models.set_fast_paths),
# MANN meta-training on cached embeddings and end to end), their FLOPs against
# this device's matrix-product peak, the attention kernels, data loading against what the steps
# consume, peak memory, and (with --compile) torch.compile against eager. Inputs are random
# tensors on the device, so a step's time is the model's; the loader is measured on its own and
# feeding a real step. Nothing is written into a run folder: --md and --json name the files.

import dataclasses  # noqa: E402  (this section's own imports)
import tempfile  # noqa: E402
import time  # noqa: E402

from torch import nn  # noqa: E402


SPEED_ROWS = ("mae", "classifier", "encoder", "mann", "attention", "loading")


def speed_log(t0: float, msg: str) -> None:
    print(f"speed [{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)


def speed_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_time(step, steps: int, warmup: int, device: torch.device) -> dict:
    """step() `warmup` times untimed, then `steps` timed times, each ended by a device sync
    (outside the step, which itself never waits for the device). Seconds per step."""
    for _ in range(warmup):
        step()
    speed_sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        speed_sync(device)
        times.append(time.perf_counter() - t0)
    return speed_stats(times)


def speed_stats(times: list[float]) -> dict:
    q1, median, q3 = (float(v) for v in np.percentile(times, [25, 50, 75]))
    return {"median": median, "min": min(times), "max": max(times), "q1": q1, "q3": q3, "times": times}


def speed_memory_reset(device: torch.device) -> None:
    """Open a row's peak-memory window: the CUDA allocator's peak, or the resident set's
    high-water mark (Linux resets VmHWM when 5 is written to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak is then the process's since it started


def speed_memory_peak(device: torch.device) -> int:
    """Bytes: the CUDA allocator's peak, or the process's peak resident set size (RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def speed_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores" if names else "cpu"
    except OSError:
        import platform
        return platform.processor() or "cpu"


# -- analytical FLOPs: matrix products only (2 FLOPs per multiply-add); norms, softmax,
#    activations and residual adds are left out. A training step is 3x the forward (backward = 2x).


def speed_block_flops(n_seq: int, L: int, D: int, nh: int, hs: int, mlp_ratio: float) -> float:
    """One pre-norm block over n_seq sequences of L tokens: q/k/v, output and MLP products,
    and attention's q k^T and (weights) v, each 2 * L * L * hs per head."""
    inner, hidden = nh * hs, int(D * mlp_ratio)
    linear = n_seq * L * (D * 3 * inner + inner * D + 2 * D * hidden)
    attention = 2 * n_seq * nh * L * L * hs
    return 2.0 * (linear + attention)


def speed_stack_flops(B: int, L: int, D: int, nh: int, hs: int, mlp_ratio: float, depth: int,
                      divided: bool = False, t: int = 1) -> float:
    """`depth` blocks on B clips of L tokens; divided attention: over time (B*k sequences of t,
    plus temporal_fc) then over space (B*t sequences of k = L/t)."""
    if not divided:
        return depth * speed_block_flops(B, L, D, nh, hs, mlp_ratio)
    k = L // t
    temporal = speed_block_flops(B * k, t, D, nh, hs, 0.0) + 2.0 * B * L * D * D
    return depth * (temporal + speed_block_flops(B * t, k, D, nh, hs, mlp_ratio))


def speed_vit_flops(cfg: stmeta.ViTConfig, B: int, kept: int) -> float:
    """The video ViT's forward on B clips encoding `kept` tokens each: tokenizer + blocks."""
    P = cfg.tubelet_size * cfg.patch_size ** 2 * cfg.in_chans * (5 if cfg.spt else 1)
    return 2.0 * B * kept * P * cfg.width + speed_stack_flops(
        B, kept + int(cfg.cls_token), cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio, cfg.depth,
        cfg.attention == "divided", cfg.num_frames // cfg.tubelet_size)


def speed_mae_flops(cfg: stmeta.MAEConfig, B: int, kept: int) -> float:
    """The MAE's forward: the encoder on `kept` tokens, the decoder on all L (+ the cls token)."""
    enc = cfg.encoder
    gt = enc.num_frames // enc.tubelet_size
    L = gt * (enc.img_size // enc.patch_size) ** 2
    frames = cfg.pred_t_dim or enc.num_frames
    P_out = enc.tubelet_size * frames // enc.num_frames * enc.patch_size ** 2 * enc.in_chans
    Ld, Dd = L + int(enc.cls_token), cfg.decoder_width
    decoder = (2.0 * B * kept * enc.width * Dd + 2.0 * B * Ld * Dd * P_out
               + speed_stack_flops(B, Ld, Dd, cfg.decoder_heads, cfg.decoder_head_dim, cfg.decoder_mlp_ratio,
                                   cfg.decoder_depth, enc.attention == "divided", gt))
    return speed_vit_flops(enc, B, kept) + decoder


def speed_mann_flops(cfg: stmeta.MANNConfig, input_dim: int, n_way: int, episodes: int, S: int) -> float:
    """The MANN's forward over `episodes` episodes of S steps: input projection, LSTM gates,
    head projections, cosine addressing, reads and writes over the memory, output layer."""
    nh, N, M, Hc = cfg.read_heads, cfg.n_slots, cfg.slot_dim, cfg.controller_size
    x = cfg.input_proj or input_dim
    if cfg.write == "lrua":
        write_fc = nh * (1 + (M if cfg.write_content == "add" else 0))  # alpha (+ the add vector)
    else:
        write_fc = nh * (3 * M + 4 + 2 * cfg.shift_range)
    read_fc = nh * (M + (cfg.key_strength > 0))  # key (+ beta)
    memory = nh * N * M * (3 if cfg.write == "lrua" else 5)
    per_step = (input_dim * cfg.input_proj + (x + n_way + nh * M + Hc) * 4 * Hc + Hc * read_fc
                + Hc * write_fc + memory + (Hc + nh * M) * n_way)
    return 2.0 * episodes * S * per_step


def speed_matmul_peak(device: torch.device, precision: str, steps: int) -> tuple[float, str]:
    """FLOP/s of large square matrix products in the benchmark's precision (best of `steps`)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    t = bench_time(lambda: a @ b, max(steps, 3), 2, device)
    what = f"{n}x{n} @ {n}x{n} {precision}"
    if device.type == "cuda" and precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        what += " (TF32 matmuls, as train.py sets)"
    return 2.0 * n ** 3 / t["min"], what


# -- the reference: a transformer built like timm's ViT blocks (read in timm/layers/attention.py,
#    timm/layers/mlp.py and timm/models/vision_transformer.py; written here, nothing copied)


class TimmStyleAttention(nn.Module):
    """timm's Attention: one fused q/k/v Linear, reshape to (B, L, 3, nh, hs), permute to
    (3, B, nh, L, hs), unbind, F.scaled_dot_product_attention (default scale), transpose and
    reshape back, output Linear."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hs)
        q, k, v = qkv.unbind(0)  # 3 x (B, nh, L, hs)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
        return self.proj(x.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))  # (B, L, D)


class TimmStyleBlock(nn.Module):
    """timm's Block at its defaults: LayerNorm, attention, residual; LayerNorm, Mlp (fc1,
    nn.GELU, fc2), residual. Layer scale, drop path and dropouts are identities there."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmStyleAttention(dim, num_heads, head_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleEncoder(nn.Module):
    """A video ViT of timm blocks at a ViTConfig's width, depth, heads and tokens: tubelets
    embedded by one Linear (timm's PatchEmbed is a Conv with kernel = stride = the patch, the
    same product), learnable positions, the blocks, a final LayerNorm. No SPT, no LSA."""

    def __init__(self, cfg: stmeta.ViTConfig):
        super().__init__()
        self.t, self.p = cfg.tubelet_size, cfg.patch_size
        L = (cfg.num_frames // cfg.tubelet_size) * (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Linear(cfg.tubelet_size * cfg.patch_size ** 2 * cfg.in_chans, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, L, cfg.width).normal_(std=0.02))
        self.blocks = nn.Sequential(*[TimmStyleBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio,
                                                     cfg.qkv_bias, cfg.norm_eps) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(models.patchify(video, self.t, self.p)) + self.pos_embed  # (B, L, D)
        return self.norm(self.blocks(x))  # (B, L, D)


# -- the second reference: SPT and LSA as their published code writes them (aanna0701/SPT_LSA_ViT,
#    lucidrains/vit-pytorch vit_for_small_dataset.py: read, not copied), at a ViTConfig's settings


class WrittenOutLSA(nn.Module):
    """LSA written out: q/k/v from one Linear, q k^T times a per-head temperature, the diagonal
    filled with the most negative number, softmax, times v, output Linear."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.temperature = nn.Parameter(torch.full((num_heads,), head_dim ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (z.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                   for z in self.qkv(x).chunk(3, dim=-1))  # 3 x (B, nh, L, hs)
        dots = q @ k.transpose(-1, -2) * self.temperature.view(1, -1, 1, 1)  # (B, nh, L, L)
        dots = dots.masked_fill(torch.eye(L, dtype=torch.bool, device=x.device), -torch.finfo(dots.dtype).max)
        out = dots.softmax(dim=-1) @ v  # (B, nh, L, hs)
        return self.proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))  # (B, L, D)


class WrittenOutSPTEncoder(nn.Module):
    """A video ViT as the SPT/LSA code writes one: shifted copies padded and concatenated on
    channels, cut into tubelets, LayerNorm, Linear; learnable positions; pre-norm blocks of
    written-out LSA and an MLP; a final LayerNorm."""

    def __init__(self, cfg: stmeta.ViTConfig):
        super().__init__()
        self.t, self.p, self.shifts = cfg.tubelet_size, cfg.patch_size, models.spt_shifts(cfg.spt_shift, cfg.patch_size)
        L = (cfg.num_frames // cfg.tubelet_size) * (cfg.img_size // cfg.patch_size) ** 2
        P = cfg.tubelet_size * cfg.patch_size ** 2 * cfg.in_chans * 5
        self.patch_norm = nn.LayerNorm(P, eps=cfg.norm_eps)
        self.patch_embed = nn.Linear(P, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, L, cfg.width).normal_(std=0.02))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            blk = TimmStyleBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
            blk.attn = WrittenOutLSA(cfg.width, cfg.num_heads, cfg.head_dim, cfg.qkv_bias)
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = models.patchify(models.shift_stack(video, self.shifts), self.t, self.p)  # (B, L, 5P)
        x = self.patch_embed(self.patch_norm(x)) + self.pos_embed  # (B, L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, L, D)


# -- the training steps, built as train.py builds them (its optimizer, autocast, GradScaler for fp16)


def speed_step(model: nn.Module, loss_fn, optimizer, device: torch.device, precision: str, clip_grad: float = 0.0):
    """step(batch): forward under autocast, backward, optional clipping, optimizer step. No host
    sync: the loss is never read."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(batch):
        with stmeta.autocast(device, precision):
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        models.optimizer_step(model, optimizer, scaler, clip_grad)  # as train.py steps
    return step


def speed_video(B: int, enc: stmeta.ViTConfig, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, enc.in_chans, enc.num_frames, enc.img_size, enc.img_size, generator=g).to(device)


def speed_sdpa_backend(q, k, v, mask) -> str:
    """The kernel F.scaled_dot_product_attention picks for these inputs (torch's own choice)."""
    try:
        from torch.nn.attention import SDPBackend
        choice = int(torch._fused_sdp_choice(q, k, v, mask))
        names = {int(getattr(SDPBackend, n)): n.lower() for n in
                 ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if hasattr(SDPBackend, n)}
        return names.get(choice, str(choice)) + (" (cpu)" if q.device.type == "cpu" else "")
    except Exception:  # noqa: BLE001 - a private helper; the table says unknown rather than failing
        return "unknown"


def bench_attention(enc: stmeta.ViTConfig, B: int, device: torch.device, precision: str, steps: int,
                    warmup: int) -> list[dict]:
    """Forward + backward of the written-out attention and of scaled_dot_product_attention at the
    encoder's (B, nh, L, hs), with and without LSA's diagonal mask, in the benchmark's dtype."""
    L = (enc.num_frames // enc.tubelet_size) * (enc.img_size // enc.patch_size) ** 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, enc.num_heads, L, enc.head_dim, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(B, enc.num_heads, L, enc.head_dim, generator=g).to(device, dtype)
    scale = enc.head_dim ** -0.5
    allowed = ~torch.eye(L, dtype=torch.bool, device=device)
    variants = [
        ("written out", False, lambda: models.attention_reference(q, k, v, scale)),
        ("written out, LSA mask", True, lambda: models.attention_reference(q, k, v, scale, mask_diagonal=True)),
        ("scaled_dot_product_attention", False, lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
        ("scaled_dot_product_attention, LSA mask", True,
         lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)),
    ]
    rows = []
    for name, masked, fn in variants:
        speed_memory_reset(device)
        t = bench_time(lambda: fn().backward(grad), steps, warmup, device)
        backend = "einsum + softmax" if name.startswith("written") else \
            speed_sdpa_backend(q, k, v, allowed if masked else None)
        rows.append({"variant": name, "shape": f"({B}, {enc.num_heads}, {L}, {enc.head_dim})", "dtype": precision,
                     "kernel": backend, "time": t, "peak_memory": speed_memory_peak(device)})
    for row in rows:  # each against the written-out attention with the same mask
        ref = rows[1 if "LSA" in row["variant"] else 0]["time"]["median"]
        row["speedup"] = ref / row["time"]["median"]
    return rows


def speed_settings(cfg: stmeta.Config, device: torch.device, args) -> dict:
    """Batch sizes: the preset's own (--batch overrides the clip batches). End to end MANN on a
    CPU takes as many episodes as fit about 100 GFLOP a step (its backbone trains on every clip)."""
    mc = cfg.meta
    S = mc.n_way * ((mc.k_shot + mc.n_query) if mc.layout == "support_query" else mc.seq_shots)
    enc = cfg.model.encoder
    L = (enc.num_frames // enc.tubelet_size) * (enc.img_size // enc.patch_size) ** 2
    e2e = mc.batch_size
    if device.type != "cuda":
        per_episode = 3 * speed_vit_flops(enc, S, L)
        e2e = max(1, min(mc.batch_size, int(100e9 // per_episode)))
    return {"mae_batch": args.batch or cfg.pretrain.batch_size, "cls_batch": args.batch or cfg.finetune.batch_size,
            "episodes": mc.batch_size, "e2e_episodes": e2e, "S": S, "L": L}


def speed_row(name: str, unit: str, batch: int, t: dict, flops: float, peak: float, memory: int,
              tokens_per_item: int = 0, mode: str = "eager", **extra) -> dict:
    rate = batch / t["median"]
    return {"workload": name, "mode": mode, "unit": unit, "batch": batch, "per_s": rate,
            "tokens_per_s": rate * tokens_per_item if tokens_per_item else None, "time": t,
            "gflop_per_step": flops / 1e9, "gflops": flops / t["median"] / 1e9,
            "peak_fraction": flops / t["median"] / peak, "peak_memory": memory, **extra}


def bench_training(cfg: stmeta.Config, device: torch.device, precision: str, st: dict, args, peak: float,
                   t0: float) -> list[dict]:
    """Every training step, eager (and compiled with --compile)."""
    enc = cfg.model.encoder
    rows = []
    modes = ["eager", "compiled"] if args.compile else ["eager"]

    def spec(name, unit, batch, model, loss_fn, inputs, flops, tokens=0, clip_grad=0.0, optimizer=None, **extra):
        return dict(name=name, unit=unit, batch=batch, model=model, loss_fn=loss_fn, inputs=inputs, flops=flops,
                    tokens=tokens, clip_grad=clip_grad, optimizer=optimizer, extra=extra)

    def run(group: str, specs: list[dict]) -> None:
        """Warm each step up (its first step, which compiles when compiled, timed on its own), then
        take the timed steps of all specs in turn, so that a change in the machine's speed during
        the run hits them alike: their ratios (mask ratios, encoder against references) hold."""
        if group not in args.rows:
            return
        for mode in modes:
            live = []
            for sp in specs:
                opt = sp["optimizer"] or models.make_optimizer(sp["model"], 1e-4, 0.05, 0.95)
                target = sp["model"]
                if mode == "compiled" and isinstance(target, models.MetaLearner):
                    target.mann.compile_step(device.type)  # as train.py: the recurrent step (eager rows ran first)
                elif mode == "compiled":
                    target = torch.compile(target)
                step = speed_step(target, sp["loss_fn"], opt, device, precision, sp["clip_grad"])
                speed_memory_reset(device)
                c0 = time.perf_counter()
                step(sp["inputs"]())
                speed_sync(device)
                first = time.perf_counter() - c0
                for _ in range(max(args.warmup - 1, 0)):
                    step(sp["inputs"]())
                speed_sync(device)
                live.append((sp, step, first, speed_memory_peak(device)))
            times = [[] for _ in live]
            for _ in range(args.steps):
                for (sp, step, _, _), ts in zip(live, times):
                    c0 = time.perf_counter()
                    step(sp["inputs"]())
                    speed_sync(device)
                    ts.append(time.perf_counter() - c0)
            for (sp, _, first, memory), ts in zip(live, times):
                t = speed_stats(ts)
                row = speed_row(sp["name"], sp["unit"], sp["batch"], t, sp["flops"], peak, memory, sp["tokens"], mode,
                                first_step_s=first, **sp["extra"])
                rows.append(row)
                speed_log(t0, f"{sp['name']} [{mode}]: {speed_num(row['per_s'])} {sp['unit']}/s, "
                              f"{speed_num(1e3 * t['median'])} ms/step ({speed_num(row['gflops'])} GFLOP/s)")

    # MAE pretraining at three mask ratios (the preset's decoder, norm_pix_loss, masking kind)
    B = st["mae_batch"]
    video = speed_video(B, enc, device)
    specs = []
    for ratio in (0.0, 0.75, 0.9):
        mae = models.VideoMAE(cfg.model).to(device)
        ids_keep, _, _ = mae.masking(B, ratio, torch.Generator().manual_seed(0), "cpu")
        kept = st["L"] if ids_keep is None else ids_keep.shape[1]
        specs.append(spec(f"MAE pretraining, mask {ratio:g}", "clips", B, mae,
                          lambda m, v, r=ratio, n=iter(range(10 ** 9)): m(
                              v, mask_ratio=r, generator=stmeta.step_generator(cfg.seed, next(n), device))[0],
                          lambda: video, 3 * speed_mae_flops(cfg.model, B, kept), st["L"], kept_tokens=kept))
    run("mae", specs)
    # classifier fine-tuning: the preset's drop path, mixup / label smoothing as train.py applies them
    ft = cfg.finetune
    n_cls = 100
    Bc = st["cls_batch"]
    clf = models.Classifier(dataclasses.replace(enc, drop_path=ft.drop_path), n_cls, ft.head_dropout).to(device)
    cvideo = speed_video(Bc, enc, device, seed=1)
    labels = torch.arange(Bc, device=device) % n_cls
    counter = iter(range(10 ** 9))

    # mixup draws only scalars (whether, which, lambda, the box): from a CPU generator, which never waits for
    # the GPU (a CUDA generator cannot make torch.rand((), ...) on the CPU, and .item() would sync)
    def clf_loss(m, batch):
        v, target = data.mixup_cutmix(batch, labels, n_cls, ft.mixup, ft.cutmix, ft.mixup_prob, ft.label_smoothing,
                                      stmeta.step_generator(cfg.seed, next(counter), torch.device("cpu")))
        return torch.sum(-target * F.log_softmax(m(v).float(), dim=-1), dim=-1).mean()
    run("classifier", [spec("classifier fine-tuning", "clips", Bc, clf, clf_loss, lambda: cvideo,
                            3 * (speed_vit_flops(enc, Bc, st["L"]) + 2.0 * Bc * enc.width * n_cls), st["L"])])
    # the encoder alone against timm-style blocks at identical width, depth, heads, tokens, batch
    enc_flops = 3 * speed_vit_flops(enc, B, st["L"])
    plain = dataclasses.replace(enc, spt=False, lsa=False)
    encoders = [(f"encoder, ours ({speed_features(enc)})", models.VideoViT(enc), enc_flops, None)]
    paper_forms = models.VideoViT(enc)  # the same encoder with every tokenizer and attention as its paper writes it
    models.set_fast_paths(paper_forms, False)
    encoders.append((f"encoder, the papers' forms ({speed_features(enc)}; set_fast_paths off)", paper_forms,
                     enc_flops, "paper"))
    if enc.spt or enc.lsa:
        encoders.append(("encoder, ours (plain: no SPT, no LSA)", models.VideoViT(plain),
                         3 * speed_vit_flops(plain, B, st["L"]), None))
    encoders.append(("encoder, timm-style reference", TimmStyleEncoder(enc), 3 * speed_vit_flops(plain, B, st["L"]),
                     "timm"))
    if enc.spt and enc.lsa and enc.attention == "joint" and not enc.cls_token:
        encoders.append(("encoder, SPT + LSA written out as their published code", WrittenOutSPTEncoder(enc),
                         enc_flops, "spt_lsa"))
    run("encoder", [spec(name, "clips", B, model.to(device), lambda m, v: m(v).float().square().mean(),
                         lambda: video, flops, st["L"], reference=ref) for name, model, flops, ref in encoders])
    # MANN meta-training: episodes sampled as train.py samples them, cached embeddings or a trained backbone
    mc = cfg.meta
    n_classes, per_class = max(2 * mc.n_way, 20), max(20, mc.k_shot + mc.n_query, mc.seq_shots)
    sampler = data.EpisodeSampler([c for c in range(n_classes) for _ in range(per_class)],
                                  np.arange(n_classes * per_class), list(range(n_classes)), mc.n_way, mc.k_shot,
                                  mc.n_query, mc.layout, mc.seq_shots)
    S = st["S"]
    pixels = mc.backbone == "pixels"  # Santoro's Omniglot setting: the MANN reads the pixels themselves
    for e2e in (False,) if pixels else (False, True):
        backbone = models.build_backbone("pixels" if pixels else "mae", enc, pixels_size=mc.pixels_size,
                                         channels=mc.pixels_channels or None, pool=mc.pool).to(device)
        model = models.MetaLearner(backbone, models.MANN(cfg.mann, backbone.out_dim, mc.n_way),
                                   input_norm=mc.input_norm, input_dropout=mc.input_dropout).to(device)
        episodes = st["e2e_episodes"] if e2e else st["episodes"]
        g = torch.Generator().manual_seed(0)
        if e2e:
            table = speed_video(episodes * S, enc, device, seed=2)  # the step's clips
            params = [{"params": [p for n, p in model.named_parameters() if not n.startswith("backbone.")]},
                      {"params": list(backbone.parameters()), "lr": mc.backbone_lr}]
        else:
            backbone.requires_grad_(False)
            table = torch.randn(n_classes * per_class, backbone.out_dim, generator=g).to(device)  # embeddings
            params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]

        def mann_loss(m, _, e2e=e2e, episodes=episodes, g=g, table=table):
            ep = sampler.sample(episodes, g).to(device)
            x = m.backbone(table).float().view(episodes, S, -1) if e2e else table[ep.clips]  # (B, S, D)
            return models.episode_loss(m, x, ep)[0]
        flops = 3 * speed_mann_flops(cfg.mann, backbone.out_dim, mc.n_way, episodes, S)
        if e2e:
            flops += 3 * speed_vit_flops(enc, episodes * S, st["L"])
        name = "MANN meta-training, " + ("end to end (backbone trained)" if e2e else
                                          f"{backbone.out_dim} pixels, {S} steps" if pixels else "cached embeddings")
        run("mann", [spec(name, "episodes", episodes, model, mann_loss, lambda: None, flops,
                          S * st["L"] if e2e else 0, mc.clip_grad, torch.optim.AdamW(params, lr=mc.lr),
                          clips_per_step=episodes * S)])
        del model, backbone
    return rows


def speed_features(enc: stmeta.ViTConfig) -> str:
    parts = [n for n, on in (("SPT", enc.spt), ("LSA", enc.lsa)) if on]
    return " + ".join(parts) + ", as the preset" if parts else "as the preset"


def bench_loading(cfg: stmeta.Config, device: torch.device, precision: str, st: dict, args, rows: list[dict],
                  t0: float) -> list[dict]:
    """Clips/s from the cache through ClipDataset with the default augmentation and
    DataLoader workers (data.loader), against the step that consumes them (pretraining,
    fine-tuning, end-to-end stage 3's per-step clips); and the MAE step fed by that loader,
    against the same step on a tensor already in memory."""
    enc = cfg.model.encoder
    tmp = None
    if args.data:
        cache = data.ClipCache(args.data)
        source = args.data
    else:  # a small synthetic cache shaped as train.py's default one (64 px or the model's size)
        tmp = tempfile.TemporaryDirectory(prefix="stmeta-speed-")
        frames = max(32, enc.num_frames * cfg.data.sampling_rate)
        size = 64 if enc.img_size <= 64 else enc.img_size
        data.build_synthetic(tmp.name, n_classes=8, clips_per_class=8, frames=frames, size=size, seed=0, workers=1,
                             verbose=False)
        cache = data.ClipCache(tmp.name)
        source = f"synthetic, 64 clips of {frames} frames at {size} px (temporary)"
    speed_log(t0, f"data: {source}")
    out = []
    consumers = {r["workload"]: r for r in rows if r["mode"] == "eager"}
    mae_name = f"MAE pretraining, mask {cfg.model.mask_ratio:g}"
    all_idx = np.arange(len(cache.labels))
    n_batches = max(4, args.steps * 2)
    g = torch.Generator().manual_seed(0)
    kw = dict(num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate, size=enc.img_size, train=True,
              scale_min=cfg.data.scale_min, hflip=cfg.data.hflip, seed=cfg.seed)
    finetune_aug = dict(rand_augment=cfg.data.rand_augment, random_erase=cfg.data.random_erase)
    e2e = consumers.get("MANN meta-training, end to end (backbone trained)")
    n_e2e = st["e2e_episodes"] * st["S"]
    kinds = [  # (name, dataset, batches of its keys, consumer, the consumer's clips/s)
        ("pretraining (crop, flip)", data.ClipDataset(cache, all_idx, **kw),
         [torch.randint(0, len(all_idx), (st["mae_batch"],), generator=g).tolist() for _ in range(n_batches + 1)],
         consumers.get(mae_name), 1),
        ("fine-tuning (crop, flip" + (f", RandAugment {cfg.data.rand_augment}" if cfg.data.rand_augment else "")
         + (f", random erase {cfg.data.random_erase:g}" if cfg.data.random_erase else "") + ")",
         data.ClipDataset(cache, all_idx, **kw, **finetune_aug),
         [torch.randint(0, len(all_idx), (st["cls_batch"],), generator=g).tolist() for _ in range(n_batches + 1)],
         consumers.get("classifier fine-tuning"), 1)]
    # end-to-end stage 3: each step's episode clips, keyed (step, clip)
    kinds.append((f"stage 3 end to end ({st['e2e_episodes']} episodes of {st['S']} clips a step)",
                  data.StepClips(cache, all_idx, **kw),
                  [[(s, i) for i in torch.randint(0, len(all_idx), (n_e2e,), generator=g).tolist()]
                   for s in range(n_batches + 1)], e2e, st["S"]))
    for name, ds, batches, consumer, clips_per_item in kinds:
        speed_memory_reset(device)
        c0 = time.perf_counter()
        it = iter(data.loader(ds, batches, cfg.data.workers, cfg.seed, device))
        next(it)[0].to(device, non_blocking=True)
        startup = time.perf_counter() - c0
        c1 = time.perf_counter()
        for video, _ in it:
            video.to(device, non_blocking=True)
        speed_sync(device)
        rate = sum(len(b) for b in batches[1:]) / (time.perf_counter() - c1)
        wants = consumer["per_s"] * clips_per_item if consumer else None
        row = {"loader": name, "workers": cfg.data.workers, "batch": len(batches[0]), "clips_per_s": rate,
               "startup_s": startup, "peak_memory": speed_memory_peak(device), "data": source,
               "consumer": consumer["workload"] if consumer else None, "consumer_clips_per_s": wants,
               "ratio": rate / wants if consumer else None}
        out.append(row)
        speed_log(t0, f"loader, {name}: {speed_num(rate)} clips/s with {cfg.data.workers} workers"
                      + (f" ({speed_num(row['ratio'])}x what '{row['consumer']}' consumes)" if consumer else ""))
    # the MAE step at the preset's mask ratio, fed by the loader (workers share the CPU with it)
    B = st["mae_batch"]
    ds = data.ClipDataset(cache, all_idx, **kw)
    g = torch.Generator().manual_seed(1)
    warm = max(args.warmup, 1)
    fed_steps = max(args.steps, 12 * max(cfg.data.workers, 1))  # 3x what data.loader prefetches (4 per worker)
    batches = [torch.randint(0, len(ds), (B,), generator=g).tolist() for _ in range(fed_steps + warm)]
    mae = models.VideoMAE(cfg.model).to(device)
    step = speed_step(mae, lambda m, v: m(v)[0], models.make_optimizer(mae, 1e-4, 0.05, 0.95), device, precision)
    speed_memory_reset(device)
    it = iter(data.loader(ds, batches, cfg.data.workers, cfg.seed, device))
    for _ in range(warm):
        step(next(it)[0].to(device, non_blocking=True))
    speed_sync(device)
    c0 = time.perf_counter()
    for video, _ in it:
        step(video.to(device, non_blocking=True))
    speed_sync(device)
    fed = fed_steps * B / (time.perf_counter() - c0)
    alone = consumers.get(mae_name)
    out.append({"loader": f"{mae_name}, fed by the loader", "workers": cfg.data.workers, "batch": B,
                "clips_per_s": fed, "startup_s": None, "peak_memory": speed_memory_peak(device), "data": source,
                "consumer": mae_name, "consumer_clips_per_s": alone["per_s"] if alone else None,
                "ratio": fed / alone["per_s"] if alone else None})
    speed_log(t0, f"{mae_name} fed by the loader: {speed_num(fed)} clips/s"
                  + (f" ({fed / alone['per_s']:.2f}x the step on a tensor in memory)" if alone else ""))
    if tmp is not None:
        tmp.cleanup()
    return out


def speed_num(x: float) -> str:
    """3 significant digits, without exponents: 0.512, 13.3, 455, 2,097."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def speed_fmt_time(t: dict) -> str:
    return f"{speed_num(1e3 * t['median'])} [{speed_num(1e3 * t['min'])}–{speed_num(1e3 * t['max'])}]"


def speed_fmt_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def speed_markdown(res: dict) -> str:
    h = res["header"]
    lines = [f"Device: {h['device']} ({h['device_name']}); {h['threads']}; precision {h['precision']}; preset "
             f"`{h['preset']}`; PyTorch {h['torch']}; {h['date']}.",
             f"Each time: median [min–max] of {h['steps']} timed steps after {h['warmup']} warm-up steps. "
             f"Inputs are random tensors already on the device. FLOPs are counted from the config (matrix products; "
             f"backward = 2x forward) against a matrix-product peak of {h['peak_gflops']:.4g} GFLOP/s measured in "
             f"this run ({h['peak_what']}). Peak memory: {h['memory_kind']}. The run took {h['wall_s']:.0f} s; the "
             f"1-minute load average was {h['load_average'][0]:.1f} at its start and {h['load_average'][1]:.1f} at "
             f"its end (this run included) on {os.cpu_count()} logical cores"
             + (": other processes were using the CPU when it started, so times are inflated (ratios less so)."
                if h["load_average"][0] > 0.5 * (os.cpu_count() or 1) else ".")]
    if res["training"]:
        lines += ["", "| training step | mode | batch | per second | tokens/s | ms/step | GFLOP/step | GFLOP/s "
                      "| % of peak | peak memory |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in res["training"]:
        toks = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        lines.append(f"| {r['workload']} | {r['mode']} | {r['batch']} | {speed_num(r['per_s'])} {r['unit']} | {toks} | "
                     f"{speed_fmt_time(r['time'])} | {speed_num(r['gflop_per_step'])} | {speed_num(r['gflops'])} | "
                     f"{100 * r['peak_fraction']:.0f}% | {speed_fmt_bytes(r['peak_memory'])} |")
    if res["comparison"]:
        lines += ["", "| encoder training step | mode | clips/s | vs timm-style | vs SPT + LSA written out |",
                  "|---|---|--:|--:|--:|"]
    for c in res["comparison"]:
        lines.append(f"| {c['workload']} | {c['mode']} | {speed_num(c['per_s'])} | "
                     + " | ".join("—" if c[k] is None else f"{c[k]:.2f}x" for k in ("ratio", "ratio_spt_lsa")) + " |")
    if res["attention"]:
        lines += ["", "| attention, forward + backward | shape (B, nh, L, hs) | kernel | ms | vs written out "
                      "| peak memory |", "|---|---|---|--:|--:|--:|"]
    for a in res["attention"]:
        lines.append(f"| {a['variant']} | {a['shape']} {a['dtype']} | {a['kernel']} | {speed_fmt_time(a['time'])} | "
                     f"{a['speedup']:.2f}x | {speed_fmt_bytes(a['peak_memory'])} |")
    if res["loading"]:
        lines += ["", "| data loading | workers | batch | clips/s | start-up s | consumer | consumer clips/s | ratio |",
                  "|---|--:|--:|--:|--:|---|--:|--:|"]
    for d in res["loading"]:
        lines.append(f"| {d['loader']} | {d['workers']} | {d['batch']} | {speed_num(d['clips_per_s'])} | "
                     f"{'—' if d['startup_s'] is None else format(d['startup_s'], '.2f')} | "
                     f"{d['consumer'] or '—'} | "
                     f"{'—' if d['consumer_clips_per_s'] is None else speed_num(d['consumer_clips_per_s'])} | "
                     f"{'—' if d['ratio'] is None else speed_num(d['ratio']) + 'x'} |")
    if res["targets"]:
        lines += ["", "Targets:"] + [f"- {t}" for t in res["targets"]]
    return "\n".join(lines) + "\n"


def speed_targets(res: dict) -> list[str]:
    eager = {r["workload"]: r for r in res["training"] if r["mode"] == "eager"}
    out = []
    r0, r9 = eager.get("MAE pretraining, mask 0"), eager.get("MAE pretraining, mask 0.9")
    if r0 and r9:
        frac = r9["time"]["median"] / r0["time"]["median"]
        out.append(f"MAE step time per clip at mask 0.9 / at mask 0: {frac:.2f} (target on the paper preset at "
                   f"most 0.33: {'met' if frac <= 1 / 3 else 'not met'} here)")
    for c in res["comparison"]:
        if c["workload"].startswith("encoder, ours") and c["ratio"] is not None:
            out.append(f"{c['workload']} [{c['mode']}] vs timm-style blocks: {c['ratio']:.2f}x (target at least "
                       f"1.0x, goal 1.5x)" + ("" if c["ratio_spt_lsa"] is None else
                                              f"; vs SPT + LSA written out: {c['ratio_spt_lsa']:.2f}x"))
    for mode in ("eager", "compiled"):
        encs = [r for r in res["training"] if r["mode"] == mode and r["workload"].startswith("encoder")]
        ours = next((r for r in encs if r["workload"].startswith("encoder, ours")), None)
        paper = next((r for r in encs if r.get("reference") == "paper"), None)
        if ours and paper:
            out.append(f"{ours['workload']} [{mode}] vs the same encoder in the papers' forms: "
                       f"{ours['per_s'] / paper['per_s']:.2f}x (the fast paths, on by default: at least 1.0x)")
    for d in res["loading"]:
        if d["ratio"] is not None and "fed by" not in d["loader"]:
            out.append(f"loader, {d['loader']}: {speed_num(d['ratio'])}x the clips/s {d['consumer']} consumes "
                       f"(target: several x)")
        elif d["ratio"] is not None:
            out.append(f"{d['loader']}: {d['ratio']:.2f}x the clips/s of the step on a tensor in memory "
                       f"(1.0x: the step never waits for the loader)")
    return out


def cmd_speed(args) -> dict:
    t0 = time.perf_counter()
    args.rows = [r.strip() for r in args.rows.split(",")]
    unknown = sorted(set(args.rows) - set(SPEED_ROWS))
    if unknown:
        raise stmeta.Refused(f"--rows {','.join(unknown)}: unknown; choose from {','.join(SPEED_ROWS)}")
    device = stmeta.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = stmeta.training_config(args.preset, device)  # the defaults training runs with (Table 2's random erase)
    if args.workers is not None:
        cfg.data.workers = args.workers
    precision = stmeta.resolve_precision(args.precision, device)
    if device.type == "cuda":  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stmeta.seed_everything(0)
    st = speed_settings(cfg, device, args)
    threads = (f"{torch.get_num_threads()} intra-op threads" if device.type == "cpu"
               else f"{torch.get_num_threads()} CPU threads")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = {"device": str(device), "device_name": speed_device_name(device), "threads": threads,
              "precision": precision, "preset": cfg.preset, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "steps": args.steps, "warmup": args.warmup,
              "compile": bool(args.compile), "settings": st,
              "memory_kind": "CUDA allocator peak per row" if device.type == "cuda" else
              "peak resident set size (RSS) of the process, reset before each row"}
    speed_log(t0, f"{header['device_name']} | {threads} | {precision} | preset {cfg.preset} | torch {torch.__version__}"
                  f" | batches: MAE {st['mae_batch']}, classifier {st['cls_batch']}, episodes {st['episodes']}"
                  f" (end to end {st['e2e_episodes']}) of {st['S']} steps")
    peak, what = speed_matmul_peak(device, precision, args.steps)
    header.update(peak_gflops=peak / 1e9, peak_what=what)
    speed_log(t0, f"matmul peak: {peak / 1e9:.4g} GFLOP/s ({what})")
    res = {"header": header}
    res["training"] = bench_training(cfg, device, precision, st, args, peak, t0)
    res["comparison"] = []
    for mode in ("eager", "compiled"):
        encs = [r for r in res["training"] if r["mode"] == mode and r["workload"].startswith("encoder")]
        timm_ref = next((r for r in encs if r.get("reference") == "timm"), None)
        lee_ref = next((r for r in encs if r.get("reference") == "spt_lsa"), None)
        for r in encs:
            res["comparison"].append({"workload": r["workload"], "mode": mode, "per_s": r["per_s"],
                                      "ratio": r["per_s"] / timm_ref["per_s"] if timm_ref else None,
                                      "ratio_spt_lsa": r["per_s"] / lee_ref["per_s"] if lee_ref else None})
    res["attention"] = [] if "attention" not in args.rows else \
        bench_attention(cfg.model.encoder, st["mae_batch"], device, precision, args.steps, args.warmup)
    for a in res["attention"]:
        speed_log(t0, f"attention, {a['variant']} [{a['kernel']}]: {speed_num(1e3 * a['time']['median'])} ms "
                      f"({a['speedup']:.2f}x the written-out one)")
    res["loading"] = [] if "loading" not in args.rows else \
        bench_loading(cfg, device, precision, st, args, res["training"], t0)
    res["targets"] = speed_targets(res)
    header["wall_s"] = time.perf_counter() - t0
    header["load_average"] = [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    text = speed_markdown(res)
    print("\n" + text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        stmeta.write_json(args.json, res, indent=2, default=float)
        print(f"wrote {args.json}")
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(f"## Speed\n\n`{speed_command(args, cfg.preset)}`\n\n{text}")
        print(f"wrote {args.md}")
    return res


def speed_command(args, preset: str) -> str:
    """The command line that reproduces this benchmark."""
    parts = ["python eval.py speed", f"--device {args.device}", f"--preset {preset}"]
    parts += [f"--precision {args.precision}"] if args.precision != "auto" else []
    parts += [f"--steps {args.steps}", f"--warmup {args.warmup}"]
    parts += [f"--batch {args.batch}"] if args.batch else []
    parts += [f"--workers {args.workers}"] if args.workers is not None else []
    parts += [f"--threads {args.threads}"] if args.threads else []
    parts += [f"--data {args.data}"] if args.data else []
    parts += ["--compile"] if args.compile else []
    parts += [f"--rows {','.join(args.rows)}"] if list(args.rows) != list(SPEED_ROWS) else []
    return " ".join(parts)


def speed_add_parser(sub) -> None:
    sp = sub.add_parser("speed", help="benchmark of every hot path: training steps (clips/s, FLOP/s against the "
                                      "matmul peak), attention kernels, data loading, peak memory, eager vs compile")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    sp.add_argument("--preset", default=None, choices=sorted(stmeta.PRESETS),
                    help="model and batch sizes (default as train.py: paper on CUDA, cpu elsewhere)")
    sp.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="auto = bf16 autocast on a CUDA GPU that supports it, fp32 otherwise (as train.py)")
    sp.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5); the median is reported")
    sp.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    sp.add_argument("--batch", type=int, default=0, help="clips per step for the MAE, encoder and classifier rows "
                                                         "(default: the preset's batch sizes)")
    sp.add_argument("--workers", type=int, default=None, help="data loader workers (default: the preset's)")
    sp.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's, one per core)")
    sp.add_argument("--data", default=None, help="clip cache for the loading rows (default: a small synthetic "
                                                 "cache in a temporary folder)")
    sp.add_argument("--compile", action="store_true", help="also time every training step under torch.compile")
    sp.add_argument("--rows", default=",".join(SPEED_ROWS),
                    help=f"which parts to run, comma-separated (default all: {','.join(SPEED_ROWS)})")
    sp.add_argument("--json", default=None, help="write every number to this JSON file")
    sp.add_argument("--md", default=None, help="write the markdown tables to this file")


# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description="Measurement and reports for stmeta runs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, run=True):
        if run:
            sp.add_argument("--run", required=True, help="run folder or a checkpoint file; in a folder, fewshot and ablation use last.pt, "
                                "the others best.pt (else last.pt)")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
        sp.add_argument("--data", default=None, help="clip cache (default: the one the run trained on)")

    sp = sub.add_parser("recon", help="per-frame reconstruction loss vs the starting model; pictures")
    common(sp)
    sp.add_argument("--split", default="meta_test", choices=("meta_test", "meta_train", "all"),
                    help="class split to score (default: the held-out classes, as the paper's test split)")
    sp.add_argument("--clips", type=stmeta.positive_int, default=64, help="number of clips to average over (default 64)")
    sp.add_argument("--mask-ratio", type=float, default=None, help="default: the model's own")
    sp.add_argument("--seed", type=int, default=0, choices=range(0, 2**31), metavar="SEED",
                    help="masking seed (the same masks for both models)")
    sp = sub.add_parser("classify", help="top-1 / top-5, per-class accuracy, confusion matrix")
    common(sp)
    sp.add_argument("--split", default="val", choices=("val", "train"))
    sp.add_argument("--views", type=stmeta.positive_int, default=None,
                    help="temporal views per clip (default: data.num_views)")
    sp = sub.add_parser("fewshot", help="N-way K-shot on held-out classes: MANN, class means, logistic regression")
    common(sp)
    sp.add_argument("--shots", type=stmeta.positive_int, nargs="+", default=[1, 5])
    sp.add_argument("--episodes", type=stmeta.positive_int, default=None, help="default: meta.test_episodes (1000)")
    sp.add_argument("--methods", nargs="+", default=["mann", "ncm", "logreg"], choices=("mann", "ncm", "logreg"))
    sp = sub.add_parser("ablation", help="meta-learning only vs representation only vs both, same episodes")
    common(sp, run=False)
    sp.add_argument("--both", required=True, help="stage-3 run with the MAE backbone (MAE + MANN)")
    sp.add_argument("--meta-only", default=None, help="stage-3 run with --backbone scratch (ViT from scratch + MANN)")
    sp.add_argument("--extra", nargs="*", help="more stage-3 runs to add as arms (e.g. --backbone pixels), and "
                                               "stage-2 runs (representation only: the encoder tuned on the labels)")
    sp.add_argument("--shots", type=stmeta.positive_int, nargs="+", default=[1, 5])
    sp.add_argument("--episodes", type=stmeta.positive_int, default=None, help="default: meta.test_episodes (1000)")
    sp = sub.add_parser("probe", help="frozen features on held-out classes (class means, logistic regression) "
                                      "beside pixel and motion floors")
    common(sp)
    sp.add_argument("--shots", type=stmeta.positive_int, nargs="+", default=[1, 5])
    sp.add_argument("--episodes", type=stmeta.positive_int, default=None, help="default: meta.test_episodes (1000)")
    sp.add_argument("--pool", choices=models.POOLS, default=None,
                    help="how the encoder's tokens become one vector (default: the run's meta.pool, mean)")
    sp = sub.add_parser("labels", help="accuracy against the fraction of meta-train labels (--labeled-fraction runs)")
    sp.add_argument("--runs", nargs="+", required=True,
                    help="stage-3 runs, any arms, any --labeled-fraction; and stage-2 runs (an encoder tuned on "
                         "--labeled-fraction F of the labels: representation only with the same labels; "
                         "`eval.py probe --run RUN` each first)")
    sp.add_argument("--shots", type=stmeta.positive_int, nargs="+", default=[1, 5])
    sp.add_argument("--out", default="labels.png", help="the chart (default labels.png)")
    sp.add_argument("--by", choices=("arm", "model"), default="arm",
                    help="arm: one line per recipe (dropout, views, view episodes), default; model: one line per "
                         "model and encoder, each row naming its recipe (a sweep of the defaults, whose recipe "
                         "changes below 100%% of the labels)")
    sp = sub.add_parser("export", help="latent embedding of every clip to .npy, with labels in a .json")
    common(sp)
    sp.add_argument("--out", default=None, help="output .npy (default <run>/latents.npy)")
    speed_add_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    handlers = {"recon": cmd_recon, "classify": cmd_classify, "fewshot": cmd_fewshot, "ablation": cmd_ablation,
                "export": cmd_export, "probe": cmd_probe, "speed": cmd_speed, "labels": cmd_labels}
    try:
        return handlers[args.cmd](args)
    except (stmeta.InputError, ValueError) as e:
        raise stmeta.Refused(str(e)) from None


if __name__ == "__main__":
    stmeta.cli(main)
