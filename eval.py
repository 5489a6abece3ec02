"""eval.py: measurement and reports for runs made by train.py.

    python eval.py recon    --run runs/stage1     per-frame reconstruction loss (paper Table 3), pictures (Fig. 3)
    python eval.py classify --run runs/stage2     top-1 / top-5, per-class accuracy, confusion matrix
    python eval.py fewshot  --run runs/stage3     N-way K-shot accuracy with 95% CI on held-out classes: MANN,
                                                  nearest class mean, logistic regression on the same embeddings
    python eval.py ablation --both runs/stage3 --meta-only runs/stage3-scratch
                                                  meta-learning only vs representation only vs both
    python eval.py export   --run runs/stage3     latent embedding of every clip to .npy with its labels
    python eval.py speed                          benchmark of every hot path (see `python eval.py speed --help`)

Every subcommand writes its tables and pictures into <run>/report.md (each subcommand owns one
section, rewritten when it runs again). Evaluation episodes come from a fixed generator, so
every model is scored on the same episodes. eval.py never trains, except fitting the
few-shot baselines (class means, logistic regression) on each episode's support set.

Paper: Waseem & Muthukumar, "Semi-Supervised Meta Learning for Spatiotemporal Learning",
sections 1 and 5; per-instance accuracy as in Santoro et al. 2016 (1605.06065).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
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
        raise SystemExit(f"--run {run}: no such run folder or checkpoint file")
    for name in (prefer, "last.pt", "best.pt"):
        path = os.path.join(run, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"--run {run}: no best.pt or last.pt in this folder (was the run started?)")


def load_run(run: str, kinds: tuple[str, ...], prefer: str = "best.pt") -> tuple[dict, stmeta.Config, str]:
    """(checkpoint, config, run folder). Stage-2/3 folders keep their MAE phase in pretrain/."""
    path = find_checkpoint(run, prefer)
    try:
        ck = stmeta.load_checkpoint(path)
    except stmeta.CheckpointError as e:
        raise SystemExit(str(e)) from None
    if ck.get("kind") not in kinds and os.path.isdir(run) and "mae" in kinds:
        sub = os.path.join(run, "pretrain")
        if os.path.isdir(sub):
            return load_run(sub, kinds, prefer)
    if ck.get("kind") not in kinds:
        raise SystemExit(f"{path} holds a {ck.get('kind')!r} checkpoint; this command needs one of {kinds}")
    cfg = stmeta.config_from_dict(stmeta.Config, ck["config"])
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    return ck, cfg, folder


def build_model(ck: dict, cfg: stmeta.Config):
    """Rebuild the architecture from the saved config, then load the weights."""
    kind = ck["kind"]
    if kind == "mae":
        model = models.VideoMAE(cfg.model)
    elif kind == "classifier":
        n_cls = ck["model"]["head.weight"].shape[0]
        model = models.Classifier(cfg.model.encoder, n_cls, dropout=cfg.finetune.head_dropout)
    elif kind == "mann":
        backbone = models.build_backbone(cfg.meta.backbone, cfg.model.encoder, pixels_size=cfg.meta.pixels_size)
        mann = models.MANN(cfg.mann, input_dim=backbone.out_dim, n_way=cfg.meta.n_way)
        model = models.MetaLearner(backbone, mann)
    else:
        raise SystemExit(f"unknown checkpoint kind {kind!r}")
    model.load_state_dict(ck["model"])
    return model.eval()


def open_cache(ck: dict, override: str | None) -> data.ClipCache:
    path = override or ck.get("data")
    if not path or not os.path.isdir(path):
        raise SystemExit(f"the run's data folder {path!r} is not there; pass --data DIR")
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
    return f"{device.type} ({torch.get_num_threads()} threads)"


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
            g = torch.Generator(device=device).manual_seed(seed * 100_003 + n * 1_009 + w)
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
            m_cfg, state, _ = models.load_published(init, start_ck)
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
    g = torch.Generator(device=device).manual_seed(args.seed)
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
        raise SystemExit(f"no labelled clips of this classifier's classes in the {args.split!r} split")
    enc = cfg.model.encoder
    views = args.views or cfg.data.num_views
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
    for video, _ in dl:
        rows.append(model.backbone(video.to(device)).float().cpu())
    out[torch.as_tensor(indices)] = torch.cat(rows)
    return out


def ncm_predict(emb: torch.Tensor, ep, n_way: int) -> torch.Tensor:
    """Nearest class mean by cosine similarity, fitted on each episode's labelled steps.
    emb (B, S, D) -> predictions (B, S)."""
    z = F.normalize(emb, dim=-1)
    shown = (ep.label_in >= 0) & ~ep.is_query if ep.is_query.any() else ep.label_in >= 0
    onehot = F.one_hot(ep.target.clamp(min=0), n_way).float() * shown[..., None]  # (B, S, n)
    means = torch.einsum("bsn,bsd->bnd", onehot, z) / onehot.sum(1)[..., None].clamp(min=1)  # (B, n, D)
    return torch.einsum("bsd,bnd->bsn", z, F.normalize(means, dim=-1)).argmax(-1)


def logreg_predict(emb: torch.Tensor, ep, n_way: int, steps: int = 100, wd: float = 1e-3) -> torch.Tensor:
    """Multinomial logistic regression fitted by L-BFGS on each episode's support set, all
    episodes at once (a block-diagonal problem). emb (B, S, D) -> predictions (B, S)."""
    z = F.normalize(emb, dim=-1)
    support = ~ep.is_query
    B, S, D = z.shape
    W = torch.zeros(B, D, n_way, requires_grad=True)
    b = torch.zeros(B, 1, n_way, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")
    scale = 10.0  # cosine features live in [-1, 1]; a temperature lets the fit become confident

    def closure():
        opt.zero_grad()
        logits = scale * torch.bmm(z, W) + b  # (B, S, n)
        loss = F.cross_entropy(logits[support], ep.target[support], reduction="sum") / B + wd * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (torch.bmm(z, W) + b).argmax(-1).detach()


def episode_accuracy(pred: torch.Tensor, ep) -> torch.Tensor:
    """Accuracy per episode over its scored steps: (B,)."""
    ok = (pred == ep.target) & ep.is_query
    return ok.sum(1).float() / ep.is_query.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate_methods(model, emb: torch.Tensor, cache, cfg: stmeta.Config, shots, episodes: int, methods,
                     batch: int = 100, n_query: int | None = None) -> dict:
    """{method: {shot: {mean, ci95, episodes, per_instance?}}} on fixed episodes of the
    meta-test classes. `emb` holds every clip's backbone embedding."""
    mc = cfg.meta
    pool = cache.indices(class_split="meta_test")
    classes = cache.classes_in("meta_test")
    results = {m: {} for m in methods}
    for k in shots:
        layouts = ["support_query"] + (["sequence"] if (mc.layout == "sequence" and "mann" in methods) else [])
        for layout in layouts:
            sampler = data.EpisodeSampler(cache, pool, classes, n_way=mc.n_way, k_shot=k,
                                          n_query=n_query or mc.n_query, layout=layout,
                                          seq_shots=mc.seq_shots)
            g = torch.Generator().manual_seed(EPISODE_SEED + 7 * k + (1 if layout == "sequence" else 0))
            accs = {m: [] for m in methods}
            inst_ok = torch.zeros(mc.seq_shots)
            inst_n = torch.zeros(mc.seq_shots)
            done = 0
            while done < episodes:
                ep = sampler.sample(min(batch, episodes - done), g)
                x = emb[ep.clips]  # (B, S, D)
                for m in methods:
                    if layout == "sequence" and m != "mann":
                        continue
                    if m == "mann":
                        dev = next(model.parameters()).device
                        logits, _ = model(x.to(dev), ep.label_in.to(dev))
                        pred = logits.float().argmax(-1).cpu()
                    elif m == "ncm":
                        pred = ncm_predict(x, ep, mc.n_way)
                    elif m == "logreg":
                        pred = logreg_predict(x, ep, mc.n_way)
                    else:
                        raise SystemExit(f"unknown method {m!r}")
                    accs[m].append(episode_accuracy(pred, ep))
                    if layout == "sequence":
                        ok = (pred == ep.target).float()
                        inst = ep.instance.clamp(max=mc.seq_shots - 1)
                        inst_ok.index_add_(0, inst.flatten(), ok.flatten())
                        inst_n.index_add_(0, inst.flatten(), torch.ones(ok.numel()))
                done += ep.clips.shape[0]
            for m in methods:
                if not accs[m]:
                    continue
                mean, ci = mean_ci(torch.cat(accs[m]).numpy())
                key = k if layout == "support_query" else f"sequence"
                results[m][key] = {"mean": mean, "ci95": ci, "episodes": episodes, "layout": layout}
                if layout == "sequence":
                    results[m][key]["per_instance"] = (inst_ok / inst_n.clamp(min=1)).tolist()
    return results


def fewshot(run: str, device: str = "auto", cache=None, shots=(1, 5), episodes: int | None = None,
            methods=("mann", "ncm", "logreg"), data_dir: str | None = None) -> dict:
    """Score a stage-3 run on fixed held-out episodes and write its report section. Called by
    train.py at the end of stage 3 and by `python eval.py fewshot`."""
    ck, cfg, folder = load_run(run, ("mann",))
    dev = stmeta.pick_device(device, verbose=False)
    cache = cache or open_cache(ck, data_dir)
    model = build_model(ck, cfg).to(dev)
    episodes = episodes or cfg.meta.test_episodes
    pool = cache.indices(class_split="meta_test")
    emb = run_embeddings(model, cache, cfg, dev, pool)
    res = evaluate_methods(model, emb, cache, cfg, shots, episodes, methods)
    mc = cfg.meta
    names = {"mann": f"MANN ({mc.backbone} backbone{', frozen' if mc.freeze_backbone else ', end to end'})",
             "ncm": f"nearest class mean ({mc.backbone} embeddings)",
             "logreg": f"logistic regression ({mc.backbone} embeddings)"}
    body = [f"## Few-shot on held-out classes (eval.py fewshot)\n",
            f"{mc.n_way}-way episodes from the {len(cache.classes_in('meta_test'))} meta-test classes, "
            f"{episodes} fixed episodes per setting (seed {EPISODE_SEED}), {mc.n_query} query per class, "
            f"mean accuracy +- 95% CI. The MANN was meta-trained on {mc.k_shot}-shot `{mc.layout}` episodes; "
            f"the baselines are fitted on each episode's support set. Chance: {100 / mc.n_way:.0f}%.\n",
            "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for m in methods:
        body.append(f"| {names[m]} | " + " | ".join(
            f"{100 * res[m][k]['mean']:.1f} +- {100 * res[m][k]['ci95']:.1f}" if k in res[m] else "-"
            for k in shots) + " |")
    seq = res.get("mann", {}).get("sequence")
    if seq:
        marks = [i for i in (1, 2, 3, 5, 10) if i <= mc.seq_shots]
        body += [f"\nSantoro's sequence layout ({mc.seq_shots} presentations per class, label of step t-1 "
                 f"shown at step t): accuracy by presentation, {episodes} episodes.\n",
                 "| | " + " | ".join(f"{i}{'st' if i == 1 else 'nd' if i == 2 else 'rd' if i == 3 else 'th'}"
                                     for i in marks) + " |",
                 "|---|" + "---|" * len(marks),
                 "| MANN | " + " | ".join(f"{100 * seq['per_instance'][i - 1]:.1f}%" for i in marks) + " |"]
    curves = os.path.join(folder, "curves.png")
    if os.path.exists(curves):
        body.append("\n![training curves](curves.png) ![accuracy](accuracy.png)\n")
    path = update_report(folder, "fewshot", "\n".join(body), run_header(ck, cfg, cache, dev))
    with open(os.path.join(folder, "fewshot.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    print("\n".join(body[2:]))
    return res


def cmd_fewshot(args) -> dict:
    return fewshot(args.run, args.device, shots=tuple(args.shots), episodes=args.episodes,
                   methods=tuple(args.methods), data_dir=args.data)


# -----------------------------------------------------------------------------
# ablation: meta-learning only / representation only / both, on the same episodes


def cmd_ablation(args) -> dict:
    both_ck, both_cfg, folder = load_run(args.both, ("mann",))
    dev = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(both_ck, args.data)
    episodes = args.episodes or both_cfg.meta.test_episodes
    pool = cache.indices(class_split="meta_test")
    arms = []  # (name, run, method)
    both = build_model(both_ck, both_cfg).to(dev)
    emb_both = run_embeddings(both, cache, both_cfg, dev, pool)
    res_both = evaluate_methods(both, emb_both, cache, both_cfg, args.shots, episodes, ("mann", "ncm", "logreg"))
    arms.append(("representation only: MAE encoder + nearest class mean", res_both["ncm"]))
    arms.append(("representation only: MAE encoder + logistic regression", res_both["logreg"]))
    if args.meta_only:
        mo_ck, mo_cfg, _ = load_run(args.meta_only, ("mann",))
        if mo_cfg.meta.n_way != both_cfg.meta.n_way:
            raise SystemExit(f"--meta-only run is {mo_cfg.meta.n_way}-way, --both is {both_cfg.meta.n_way}-way")
        meta_only = build_model(mo_ck, mo_cfg).to(dev)
        emb_mo = run_embeddings(meta_only, cache, mo_cfg, dev, pool)
        res_mo = evaluate_methods(meta_only, emb_mo, cache, mo_cfg, args.shots, episodes, ("mann",))
        arms.insert(0, (f"meta-learning only: ViT from scratch ({mo_cfg.meta.backbone}) + MANN", res_mo["mann"]))
    for extra in args.extra or []:
        ex_ck, ex_cfg, _ = load_run(extra, ("mann",))
        ex = build_model(ex_ck, ex_cfg).to(dev)
        res_ex = evaluate_methods(ex, run_embeddings(ex, cache, ex_cfg, dev, pool), cache, ex_cfg, args.shots,
                                  episodes, ("mann",))
        arms.append((f"MANN on {ex_cfg.meta.backbone} ({os.path.basename(os.path.normpath(extra))})", res_ex["mann"]))
    arms.append(("both: MAE encoder + MANN", res_both["mann"]))
    n_way = both_cfg.meta.n_way
    body = [f"## Ablation (eval.py ablation)\n",
            f"The ablation the paper promises (section 1): the same {episodes} fixed {n_way}-way episodes of the "
            f"held-out classes for every arm; mean accuracy +- 95% CI. Chance {100 / n_way:.0f}%.\n",
            "| arm | " + " | ".join(f"{k}-shot" for k in args.shots) + " |", "|---|" + "---|" * len(args.shots)]
    for name, r in arms:
        body.append(f"| {name} | " + " | ".join(
            f"{100 * r[k]['mean']:.1f} +- {100 * r[k]['ci95']:.1f}" if k in r else "-" for k in args.shots) + " |")
    for k in args.shots:
        png = f"ablation_{k}shot.png"
        stmeta.bar_chart(os.path.join(folder, png), [a[0] for a in arms], [a[1][k]["mean"] for a in arms],
                         [a[1][k]["ci95"] for a in arms], title=f"{n_way}-way {k}-shot, held-out classes",
                         ylabel="accuracy", hline=1 / n_way, hline_label="chance", size=(760, 420))
        body.append(f"\n![{k}-shot ablation]({png})")
    path = update_report(folder, "ablation", "\n".join(body), run_header(both_ck, both_cfg, cache, dev))
    print("\n".join(body[2:2 + 2 + len(arms)]))
    print(f"report: {path}")
    return {name: r for name, r in arms}


# -----------------------------------------------------------------------------
# export: the latent embedding of every clip (the paper's latent export hook)


@torch.no_grad()
def cmd_export(args) -> dict:
    ck, cfg, folder = load_run(args.run, ("mae", "classifier", "mann"))
    device = stmeta.pick_device(args.device, verbose=False)
    cache = open_cache(ck, args.data)
    model = build_model(ck, cfg).to(device)
    if ck["kind"] == "mann":
        backbone = model.backbone
    else:
        backbone = models.build_backbone("mae", cfg.model.encoder)
        backbone.vit.load_state_dict(model.encoder.state_dict())
        backbone = backbone.to(device).eval()
    holder = type("Holder", (), {"backbone": backbone})()
    emb = run_embeddings(holder, cache, cfg, device, np.arange(len(cache.labels)))
    out = args.out or os.path.join(folder, "latents.npy")
    np.save(out, emb.numpy().astype(np.float32))
    meta = {"embeddings": os.path.basename(out), "shape": list(emb.shape), "classes": cache.classes,
            "labels": cache.labels.tolist(), "all_labels": cache.all_labels,
            "class_split": [cache.class_split[c] if c >= 0 else None for c in cache.labels.tolist()],
            "clip_split": [str(s) for s in cache.clip_split], "checkpoint": find_checkpoint(args.run)}
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f)
    body = (f"## Latent export (eval.py export)\n\n`{os.path.basename(out)}`: {emb.shape[0]} clips x {emb.shape[1]} "
            f"features (mean-pooled encoder tokens, centred window), labels and splits in "
            f"`{os.path.basename(os.path.splitext(out)[0])}.json`.")
    update_report(folder, "export", body, run_header(ck, cfg, cache, device))
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]}) and its labels")
    return meta


# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description="Measurement and reports for stmeta runs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, run=True):
        if run:
            sp.add_argument("--run", required=True, help="run folder (uses best.pt, else last.pt) or a checkpoint")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
        sp.add_argument("--data", default=None, help="clip cache (default: the one the run trained on)")

    sp = sub.add_parser("recon", help="per-frame reconstruction loss vs the starting model; pictures")
    common(sp)
    sp.add_argument("--split", default="meta_test", choices=("meta_test", "meta_train", "all"),
                    help="class split to score (default: the held-out classes, as the paper's test split)")
    sp.add_argument("--clips", type=int, default=64, help="number of clips to average over (default 64)")
    sp.add_argument("--mask-ratio", type=float, default=None, help="default: the model's own")
    sp.add_argument("--seed", type=int, default=0, help="masking seed (the same masks for both models)")
    sp = sub.add_parser("classify", help="top-1 / top-5, per-class accuracy, confusion matrix")
    common(sp)
    sp.add_argument("--split", default="val", choices=("val", "train"))
    sp.add_argument("--views", type=int, default=0, help="temporal views per clip (default: data.num_views)")
    sp = sub.add_parser("fewshot", help="N-way K-shot on held-out classes: MANN, class means, logistic regression")
    common(sp)
    sp.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    sp.add_argument("--episodes", type=int, default=0, help="default: meta.test_episodes (1000)")
    sp.add_argument("--methods", nargs="+", default=["mann", "ncm", "logreg"], choices=("mann", "ncm", "logreg"))
    sp = sub.add_parser("ablation", help="meta-learning only vs representation only vs both, same episodes")
    common(sp, run=False)
    sp.add_argument("--both", required=True, help="stage-3 run with the MAE backbone (MAE + MANN)")
    sp.add_argument("--meta-only", default=None, help="stage-3 run with --backbone scratch (ViT from scratch + MANN)")
    sp.add_argument("--extra", nargs="*", help="more stage-3 runs to add as arms (e.g. --backbone pixels)")
    sp.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    sp.add_argument("--episodes", type=int, default=0, help="default: meta.test_episodes (1000)")
    sp = sub.add_parser("export", help="latent embedding of every clip to .npy, with labels in a .json")
    common(sp)
    sp.add_argument("--out", default=None, help="output .npy (default <run>/latents.npy)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    handlers = {"recon": cmd_recon, "classify": cmd_classify, "fewshot": cmd_fewshot, "ablation": cmd_ablation,
                "export": cmd_export}
    try:
        return handlers[args.cmd](args)
    except (stmeta.CheckpointError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
