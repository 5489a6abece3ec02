"""train.py: the paper's three stages as straight training loops.

    python train.py --stage 1 [--init CKPT]         reconstruction: (fine-)tune a video MAE
    python train.py --stage 2 [--pretrained CKPT]   MAE pretraining, then encoder + classification head
    python train.py --stage 3 [--pretrained CKPT]   MAE encoder + MANN, meta-trained on episodes

With no --data the synthetic benchmark (data.py) is built on first use. With no --preset the
paper's settings run on CUDA and a small demo runs on CPU. Any config field can be set with
--key=value (a dotted path or a unique suffix: --encoder.depth=6, --mask_ratio=0.8).
Multi-GPU / multi-process: torchrun --nproc_per_node=N train.py --stage 2 ...

Paper: Waseem & Muthukumar, "Semi-Supervised Meta Learning for Spatiotemporal Learning",
sections 3-5. Recipes: MAE-ST (2205.09113) for pretraining, the paper's Tables 1 and 2 for
fine-tuning, Santoro et al. (1605.06065) for the MANN.

Each phase is one function that reads top to bottom in the same fenced order: the phase's
folder (resume or skip), data, schedule, model and optimizer, validation, the loop (lr;
forward / backward per micro-batch; optimizer step; evaluate / checkpoint / log on the
cadence), the end. The engineering they share is a few small named helpers above them:

    start_run / finished / resume_from   a phase's folder: refuse, resume exactly, or skip
    lr_at, set_lr                         warmup + half-cosine
    sync_if, models.optimizer_step        accumulation under DDP; unscale, clip, step, zero
    Cadence, Meter                        when to evaluate / checkpoint / log; the window's means
    checkpoint, save, check_finite        what a checkpoint holds; a non-finite loss stops the run

Reading order: main -> prepare_run (every check before any work) -> run (the phases of a
stage) -> train_mae, train_classifier, train_mann. A run folder holds config.json, log.jsonl,
last.pt, best.pt and curves.png; stages 2 and 3 keep their MAE pretraining phase in
<run>/pretrain/ (and stage 3 its classification phase in <run>/classify/).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import eval as evaluate  # imports run one way: stmeta <- data, models <- eval <- train
import models
import stmeta

# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    keys = stmeta.flatten_config(stmeta.get_preset("paper"))
    epilog = ("config fields (set any with --key=value; the paper preset's defaults shown):\n" +
              "\n".join(f"  --{k}={v}" for k, v in keys.items()))
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True,
                   help="1 reconstruction (MAE), 2 MAE + classification head, 3 MAE + MANN few-shot")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--data", default=None,
                   help="clip cache folder made by `python data.py prepare` or `synth`; default: a built-in "
                        "benchmark (--benchmark) under data_cache/, built on first use")
    p.add_argument("--benchmark", default=None, choices=sorted(data.BENCHMARKS),
                   help="the built-in benchmark used when no --data is given: " +
                        "; ".join(f"{k}: {v}" for k, v in data.BENCHMARKS.items()) + " (default glyphs)")
    p.add_argument("--preset", default=None, choices=sorted(stmeta.PRESETS),
                   help="paper: the paper's model and Tables 1-2 (default on CUDA); cpu: a small demo that runs "
                        "in minutes on a laptop CPU (default elsewhere); tiny: for tests")
    p.add_argument("--out", default=None, help="run folder (default: runs/stage<N>, or runs/stage<N>-2, ... if taken)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (refused if the config differs)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--init", default=None,
                   help="stage 1: start from this MAE checkpoint (ours from any stage, or a published "
                        "mae_st / VideoMAE file) instead of from scratch")
    p.add_argument("--pretrained", default=None,
                   help="stages 2-3: take the encoder from this checkpoint (any stage) and skip MAE pretraining")
    p.add_argument("--warm-start", default=None,
                   help="stage 3: start the whole MetaLearner (encoder, input norm, MANN) from this stage-3 "
                        "checkpoint, then train it as this run says; with --finetune: meta-train on frozen "
                        "features first, then end to end (linear probing, then fine-tuning)")
    p.add_argument("--backbone", default=None, choices=("mae", "scratch", "pixels"),
                   help="stage 3: mae = MAE-pretrained encoder (default); scratch = the same ViT trained from "
                        "scratch end to end with the MANN (the 'meta-learning only' ablation); pixels = "
                        "downsampled pixels (Santoro's setting)")
    p.add_argument("--finetune", dest="end_to_end", action="store_true",
                   help="stage 3: fine-tune the backbone end to end instead of freezing it and caching embeddings")
    p.add_argument("--pretrain-pool", default=None, choices=("meta_train", "all"),
                   help="the clips MAE pretraining sees (labels unused): meta_train = the meta-train classes' "
                        "clips and every unlabelled clip (default); all = the held-out classes' clips too "
                        "(transductive). Same as --pretrain.pool=...")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="keep this fraction of the labels per class (0 < F <= 1): the semi-supervised regime; "
                        "MAE pretraining still sees every clip")
    p.add_argument("--recipe", default="table2", choices=("table1", "table2"),
                   help="stage 2 fine-tuning: table2 = the paper's recipe for training from scratch (default); "
                        "table1 = its recipe for fine-tuning a pretrained MAE")
    p.add_argument("--classes", default="meta_train", choices=("meta_train", "all"),
                   help="stage 2: classify the meta-train classes (default: keeps stage 3's held-out classes "
                        "unseen) or all classes")
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto = bf16 autocast on a CUDA GPU that supports it, fp32 otherwise")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: data.workers)")
    p.add_argument("--log-every", type=int, default=0, help="steps between progress lines (default: ~50 per run)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many optimizer steps of the current phase, as if interrupted "
                        "(for trying --resume)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognised argument(s): {' '.join(unknown)} (config fields take the form --key=value)")
    return args, overrides


def resolve_config(args, overrides, device) -> stmeta.Config:
    cfg = stmeta.training_config(args.preset, device, args.recipe, verbose=True)
    args.preset = cfg.preset
    stmeta.apply_overrides(cfg, overrides)
    if args.seed is not None:
        cfg.seed = args.seed
    if args.precision is not None:
        cfg.precision = args.precision
    if args.compile:
        cfg.compile = True
    if args.backbone is not None:
        cfg.meta.backbone = args.backbone
    if args.end_to_end:
        cfg.meta.freeze_backbone = False
    if cfg.meta.backbone == "scratch" and cfg.meta.freeze_backbone:
        print("backbone: scratch -> trained end to end with the MANN (a frozen random ViT would learn nothing)")
        cfg.meta.freeze_backbone = False
    mc = cfg.meta
    if (mc.rotate_classes or mc.max_shift) and mc.backbone != "pixels" and mc.freeze_backbone:
        raise stmeta.Refused(f"--meta.rotate_classes / --meta.max_shift augment every episode afresh, which a frozen "
                         f"{mc.backbone} backbone's cached embeddings cannot show: add --finetune, use --backbone "
                         f"pixels, or turn them off (--meta.rotate_classes=false --meta.max_shift=0)")
    if args.labeled_fraction is not None:
        if not 0 < args.labeled_fraction <= 1:
            raise stmeta.Refused(f"--labeled-fraction {args.labeled_fraction}: must be in (0, 1]")
        cfg.data.labeled_fraction = args.labeled_fraction
    if args.workers is not None:
        cfg.data.workers = args.workers
    if args.pretrain_pool is not None:
        cfg.pretrain.pool = args.pretrain_pool
    return cfg


def given_keys(cfg: stmeta.Config, overrides) -> set[str]:
    """The config fields the command line's --key=value overrides name, as full dotted paths."""
    return {stmeta.resolve_key(cfg, o[2:].split("=", 1)[0].replace("-", "_")) for o in overrides}


def semi_supervised_recipe(cfg: stmeta.Config, overrides, stage: int) -> list[str]:
    """Stage 3 on a frozen backbone with --labeled-fraction below 1: stmeta.SEMI_SUPERVISED for
    each of its fields the command line leaves unset, so the MANN meta-trains on the unlabelled
    clips too (view episodes) and not only on the few labelled ones. -> the fields it set."""
    if stage != 3 or cfg.data.labeled_fraction >= 1 or mann_inputs(cfg) != "embeddings":
        return []
    given = given_keys(cfg, overrides)
    if "meta.clusters" in given:  # the user's own semi-supervised episodes: no view episodes on top
        given.add("meta.view_episodes")
    filled = [k for k in stmeta.SEMI_SUPERVISED if k not in given]
    for key in filled:
        stmeta.set_config(cfg, key, stmeta.SEMI_SUPERVISED[key])
    mc = cfg.meta
    if "meta.view_episodes" in filled and mc.train_views < mc.k_shot + mc.n_query:  # the user's few views
        mc.view_episodes = 0.0  # cannot make a view episode (check_config's rule): leave them off
        filled.remove("meta.view_episodes")
    return filled


def default_out(stage: int, resume: bool) -> str:
    base = os.path.join("runs", f"stage{stage}")
    taken = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    existing = [d for d in taken if os.path.exists(d)]
    if resume:
        return existing[-1] if existing else base
    return next(d for d in taken if not os.path.exists(d))


def open_data(args, cfg: stmeta.Config, dist: stmeta.Dist) -> data.ClipCache:
    enc = cfg.model.encoder
    if args.data is not None and args.benchmark is not None:
        raise stmeta.Refused(f"--benchmark {args.benchmark} picks a built-in benchmark and --data {args.data} names a "
                             f"cache: give one of them")
    if args.data is None:
        # A built-in benchmark, sized for the model: rendered at its input size, with enough
        # frames for one clip of num_frames at the sampling rate, and at least 32.
        frames = max(32, enc.num_frames * cfg.data.sampling_rate)
        size = enc.img_size  # rendered at the model's input size: no resizing in the loader
        benchmark = args.benchmark or "glyphs"
        args.data = os.path.join("data_cache", f"{'synthetic' if benchmark == 'actions' else benchmark}-{size}px-{frames}f")
        if dist.is_main:
            print(f"data: the built-in {benchmark} benchmark in {args.data} (built on first use; --data DIR for your "
                  f"own)")
            data.ensure_synthetic(args.data, frames=frames, size=size, seed=0, benchmark=benchmark)
        if dist.enabled:
            torch.distributed.barrier()
    if not os.path.isdir(args.data):
        raise stmeta.Refused(f"--data {args.data}: no such folder (make one with `python data.py prepare ...` or "
                         f"`python data.py synth --out {args.data}`)")
    cache = data.ClipCache(args.data)
    if dist.is_main:
        print(f"data: {cache.summary()}")
    return cache


# -----------------------------------------------------------------------------
# Shared loop machinery: learning rate, samplers, optimizer, checkpoints


RUN_INFO: dict = {}  # set once in run(): the data folder, the --init/--pretrained source, and "inputs":
# their paths and fingerprints and the class set, which a resume must find unchanged


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then half-cosine to 0 (MAE, mae_st)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def sync_if(ddp_model, dist: stmeta.Dist, last_micro: bool):
    """Gradient accumulation under DDP: all-reduce only on the step's last micro-batch."""
    return ddp_model.no_sync() if (dist.enabled and not last_micro) else stmeta.nullcontext()


class Cadence:
    """When a step evaluates, checkpoints and logs: every eval/ckpt/log steps, and at the end
    of the phase (step == total) or of a --stop-after window (step == stop_at)."""

    def __init__(self, step: int, total: int, args, eval_every: int, ckpt_every: int):
        self.total, self.eval_every, self.ckpt_every = total, eval_every, ckpt_every
        self.log_every = args.log_every or max(1, total // 50)  # about 50 lines a phase
        self.stop_at = step + args.stop_after if args.stop_after else total

    def running(self, step: int) -> bool:
        return step < self.total and step < self.stop_at

    def __call__(self, step: int) -> tuple[bool, bool, bool]:
        """-> (evaluate, checkpoint, log) after optimizer step `step`."""
        ev = step % self.eval_every == 0 or step == self.total
        ck = step % self.ckpt_every == 0 or step == self.total or step == self.stop_at
        return ev, ck, ev or ck or step % self.log_every == 0


class Meter:
    """Sums over one logging window, kept on the device: nothing is read back to the host (a
    sync) until `read`, once per log line. `add` takes one micro-batch's values."""

    def __init__(self, device):
        self.device = device
        self.started, self.steps_done = time.time(), 0  # since the phase (re)started: for `run eta`
        self.reset()

    def reset(self) -> None:
        self.t0, self.micro, self.items = time.time(), 0, 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, items: int, **values: torch.Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.micro += 1
        self.items += items

    def read(self, step: int, total: int, accum: int, unit: str, **extra) -> dict:
        """The window's means (per micro-batch), then `extra`, then speed and ETA; starts a new
        window. `seconds` keeps the window's length."""
        self.seconds = dt = time.time() - self.t0
        steps = max(self.micro / accum, 1)
        rec = {k: (v / max(self.micro, 1)).item() for k, v in self.sums.items()}
        rec.update(extra)
        rec.update({"ms/step": 1000 * dt / steps, f"{unit}/s": self.items / max(dt, 1e-9),
                    "eta": stmeta.format_duration((total - step) * dt / steps)})
        self.steps_done += steps
        if RUN_ETA is not None and RUN_ETA.current is not None:  # the whole run's, in a run of several phases:
            mean = (time.time() - self.started) / self.steps_done  # from the phase's mean step, not one window's
            rec["run eta"] = stmeta.format_duration(RUN_ETA.remaining((total - step) * mean, mean))
        self.reset()
        return rec


def save(folder: str, name: str, ck: dict) -> None:
    stmeta.save_checkpoint(os.path.join(folder, name), ck)


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def checkpoint(kind: str, cfg, model, optimizer, step: int, total: int, metrics: dict, extra=None) -> dict:
    """One dict: enough to rebuild the model from `config` alone and to resume exactly.
    `data` and `init` say which clip cache the run read and where its weights started."""
    return {"kind": kind, "config": stmeta.config_to_dict(cfg), "model": unwrap(model).state_dict(),
            "data": RUN_INFO.get("data"), "init": RUN_INFO.get("init"), "init_kind": RUN_INFO.get("init_kind"),
            "warm_start": RUN_INFO.get("warm_start"), "inputs": RUN_INFO.get("inputs"),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": {"step": step, "total": total}, "step": step, "total": total,
            "metrics": metrics, "rng": stmeta.rng_state(), "torch_version": str(torch.__version__),
            **(extra or {})}


def start_run(folder: str, kind: str, cfg, resume: bool, dist: stmeta.Dist) -> dict | None:
    """Create the run folder, or find the checkpoint to resume. Refuses to overwrite a run
    without --resume, and to resume with a different config or different inputs (naming
    them). On resume, log.jsonl loses the killed process's lines past the checkpoint and
    half-written *.tmp files go."""
    last = os.path.join(folder, "last.pt")
    if os.path.exists(last):
        ck = stmeta.load_checkpoint(last)
        if ck.get("kind") != kind:
            raise stmeta.Refused(f"{last} holds a {ck.get('kind')!r} run, not {kind!r}; choose another --out")
        if not resume:
            raise stmeta.Refused(f"{folder} already holds a run (step {ck['step']}/{ck['total']}): pass --resume "
                                 f"to continue it, or choose another --out")
        ignore = ("data.workers", "compile")  # may change between sessions without changing results
        diffs = [(f"--{k}", a, b) for k, a, b in stmeta.diff_configs(ck["config"], stmeta.config_to_dict(cfg))
                 if k not in ignore]
        saved = ck.get("inputs") or {}  # absent in checkpoints older than this check
        changed = [(k, saved[k], v) for k, v in RUN_INFO.get("inputs", {}).items() if k in saved and saved[k] != v]
        if diffs or changed:
            said = [f"the {what} differ{'s' if what == 'config' else ''} from the saved run's in "
                    + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in found)
                    for what, found in (("config", diffs), ("inputs", changed)) if found]
            raise stmeta.Refused(f"cannot resume {folder}: {' and '.join(said)}; rerun with the saved settings "
                                 f"and inputs, or start a new run with another --out")
        if dist.is_main:
            dropped = stmeta.truncate_log(os.path.join(folder, "log.jsonl"), ck["step"])
            stmeta.remove_temporaries(folder)
            print(f"resuming {last} at step {ck['step']}/{ck['total']}"
                  + (f" ({dropped} log line(s) past it dropped)" if dropped else ""))
        return ck
    if dist.is_main:
        if resume:  # killed before its first checkpoint, or a phase not reached yet: start it
            print(f"--resume: no checkpoint in {folder} yet; this phase starts from step 0")
        os.makedirs(folder, exist_ok=True)
        stmeta.remove_temporaries(folder)
        if os.path.exists(os.path.join(folder, "log.jsonl")):  # a killed start's lines: this start logs anew
            stmeta.truncate_log(os.path.join(folder, "log.jsonl"), -1)
        stmeta.write_json(os.path.join(folder, "config.json"), stmeta.config_to_dict(cfg), indent=2)
    return None


def finished(ck: dict | None, folder: str, what: str, dist: stmeta.Dist) -> bool:
    """A resumed run skips a phase that had finished, and puts every RNG back where that
    phase left it, so the phases after it draw what an uninterrupted run draws."""
    if ck is None or ck["step"] < ck["total"]:
        return False
    stmeta.set_rng_state(ck["rng"])
    if dist.is_main:
        print(f"{folder}: {what} already finished ({ck['step']} steps); skipping")
    return True


def check_finite(value: float, step: int, folder: str, phase: str, lr: float) -> None:
    """A non-finite loss stops the run; last.pt (written only after this check) stays good.
    `phase` names the config section of the phase that diverged (pretrain, finetune, meta)."""
    if not math.isfinite(value):
        last = os.path.join(folder, "last.pt")
        where = (f"the last good checkpoint is {last} (step {stmeta.load_checkpoint(last)['step']})"
                 if os.path.exists(last) else "no checkpoint was written yet")
        raise SystemExit(f"step {step}: the loss is {value} (not finite); stopping. {where}. Try a lower learning "
                         f"rate than {lr:.3g} (--{phase}.lr=...), gradient clipping (--{phase}.clip_grad=1.0), "
                         f"or --precision fp32.")


def wrap_model(model, cfg, device, dist: stmeta.Dist):
    model = model.to(device)
    if cfg.compile and isinstance(model, models.MetaLearner):
        # the MANN's cost is its time loop: compile the recurrent step (and a trained backbone),
        # not the unrolled loop, which would compile S copies of the same step
        model.mann.compile_step(device.type)
        if not (cfg.meta.freeze_backbone or cfg.meta.backbone == "pixels"):
            model.backbone.compile()  # in place: the state dict keeps its names
    elif cfg.compile:
        model = torch.compile(model)
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def resume_from(ck: dict, model, optimizer) -> tuple[int, dict]:
    """Put a phase back where its last.pt left it: weights, optimizer, every RNG. -> (step, metrics)."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    stmeta.set_rng_state(ck["rng"])
    return ck["step"], ck["metrics"]


def end_phase(ddp_model, dist: stmeta.Dist, step: int, total: int, folder: str, title: str,
              loss_refs: dict | None = None, acc_refs: dict | None = None) -> None:
    """After a phase's loop: ranks agree, a --stop-after exit says how to go on, curves drawn."""
    sync_check(ddp_model, dist)
    if step < total:
        if dist.is_main:
            print(f"stopped after step {step}/{total} (--stop-after); continue with --resume")
        raise SystemExit(0)
    if dist.is_main:
        draw_curves(folder, title, loss_refs, acc_refs)


def sync_check(model, dist: stmeta.Dist) -> None:
    """After data-parallel training every rank must hold the same parameters."""
    if not dist.enabled:
        return
    flat = torch.cat([p.detach().float().flatten() for p in unwrap(model).parameters()])
    stats = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).cpu().double()
    gathered = [torch.zeros_like(stats) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, stats)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if dist.is_main:
        print(f"ranks in sync: {same} (parameter checksum {gathered[0][0].item():.6f} on {dist.world_size} ranks)")
    if not same:
        raise SystemExit("data-parallel ranks diverged: parameters differ across ranks")


def draw_curves(folder: str, title: str, loss_refs: dict | None = None, acc_refs: dict | None = None) -> str:
    """Loss (and accuracy, if logged) against step, from log.jsonl, like the paper's Figs 4-7.
    The reference lines (chance, ln(n_way), what predicting each patch's mean costs) are drawn
    with the y-axis from 0, so a curve that sits at chance cannot pass for learning."""
    rows = stmeta.read_log(os.path.join(folder, "log.jsonl"))
    series = {}
    for key, name in (("loss", "train loss"), ("val_loss", "val loss")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            series[name] = ([p[0] for p in pts], [p[1] for p in pts])
    path = os.path.join(folder, "curves.png")
    if series:
        stmeta.line_chart(path, series, title=f"{title}: loss", xlabel="step", ylabel="loss", refs=loss_refs,
                          y_from=0.0 if loss_refs else None)
    accs = {name: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
            for key, name in (("train_acc", "train accuracy"), ("val_acc", "val accuracy"), ("val_top5", "val top-5"))}
    accs = {k: v for k, v in accs.items() if v[0]}
    if accs:
        stmeta.line_chart(os.path.join(folder, "accuracy.png"), accs, title=f"{title}: accuracy",
                          xlabel="step", ylabel="accuracy", refs=acc_refs, y_from=0.0)
    return path


def describe(cfg, device, precision, model, dist, what: str) -> None:
    if not dist.is_main:
        return
    n = sum(p.numel() for p in model.parameters())
    print(f"{what}: {n:,} parameters | device {device} | precision {precision} | "
          f"{dist.world_size} process(es) | torch {torch.__version__}")


# -----------------------------------------------------------------------------
# Stage 1 (and the pretraining phase of stages 2 and 3): the video MAE


@torch.no_grad()
def validate_mae(m, val_ds, batch: int, cfg, device, precision: str) -> float:
    """Mean reconstruction loss on the validation clips, with masks that are the same at every
    call (a generator per batch, seeded apart from training's)."""
    m.eval()
    losses = []
    batches = [list(range(j, min(j + batch, len(val_ds)))) for j in range(0, len(val_ds), batch)]
    for i, (video, _) in enumerate(data.loader(val_ds, batches, cfg.data.workers, cfg.seed, device)):
        video = video.to(device, non_blocking=True)
        with stmeta.autocast(device, precision):
            loss, _, _ = m(video, generator=stmeta.step_generator(cfg.seed + 1, i, device))
        losses.append(loss.float().item())
    m.train()
    return float(np.mean(losses))



def pretrain_pool(cache, cfg: stmeta.Config, train_classes: str | None) -> tuple[np.ndarray, str]:
    """The clips MAE pretraining sees (labels unused) and the pool's name: stage 2 with
    --classes all pretrains on every clip (train_classes None); otherwise --pretrain.pool decides."""
    pool = "all" if train_classes is None else cfg.pretrain.pool
    return cache.pretrain_pool(pool), pool


def classifier_clips(cache, cfg: stmeta.Config, classes: str) -> tuple[list[int], np.ndarray]:
    """The classes a classification phase learns (every class, or the meta-train ones) and its
    labelled train clips (a --labeled-fraction of each class's)."""
    class_ids = list(range(len(cache.classes))) if classes == "all" else cache.classes_in("meta_train")
    train_idx = cache.indices(clip_split="train", class_split=None if classes == "all" else "meta_train")
    return class_ids, data.labelled_subset(cache, train_idx, cfg.data.labeled_fraction, cfg.seed)


def mann_inputs(cfg: stmeta.Config) -> str:
    """What feeds the MANN at each step: "embeddings", every clip through a frozen backbone once
    (a table the episodes index); "clips", every clip at the input, held in memory (a frozen
    backbone on augmented episodes, which must see each step's turned and shifted clips); or
    "loader", each step's clips prepared by loader workers (the backbone trained end to end)."""
    mc = cfg.meta
    if not (mc.freeze_backbone or mc.backbone == "pixels"):
        return "loader"
    return "clips" if mc.rotate_classes or mc.max_shift > 0 else "embeddings"


def train_mae(cfg: stmeta.Config, cache, folder: str, device, precision: str, dist: stmeta.Dist, args,
              init_state: dict | None = None, train_classes: str = "meta_train") -> dict:
    """Masked-autoencoder training on train clips; validation loss on held-out (meta-test)
    classes, as the paper's Table 3 evaluates on its test classes. Returns the final checkpoint."""
    pc = cfg.pretrain
    enc = cfg.model.encoder
    # -- the phase's folder: resume its last.pt, or skip it if it finished
    log = stmeta.RunLog(os.path.join(folder, "log.jsonl"), enabled=dist.is_main)
    resume_ck = start_run(folder, "mae", cfg, args.resume, dist)
    if finished(resume_ck, folder, "the MAE phase", dist):
        return resume_ck

    # -- data: the pretraining pool (labels unused), val clips of held-out classes
    # (stage 2 with --classes all pretrains on every clip; otherwise --pretrain.pool decides)
    train_idx, pool = pretrain_pool(cache, cfg, train_classes)
    if dist.is_main:
        n_unl = int((cache.labels[train_idx] < 0).sum())
        print(f"MAE pretraining pool ({pool}): {len(train_idx)} clips, "
              f"{n_unl} of them unlabelled" + (", held-out classes included (transductive)"
                                               if pool == "all" else
                                               "; held-out classes' clips not used"))
    val_idx = cache.indices(class_split="meta_test", labelled_only=False)
    if len(val_idx) == 0:
        val_idx = cache.indices(clip_split="val", labelled_only=False)
    ds_kw = dict(num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate, size=enc.img_size)
    train_ds = data.ClipDataset(cache, train_idx, train=True, scale_min=cfg.data.scale_min, hflip=cfg.data.hflip,
                                seed=cfg.seed, **ds_kw)
    val_ds = data.ClipDataset(cache, val_idx[: max(pc.batch_size, 256)], train=False, **ds_kw)
    # -- schedule: optimizer steps, warmup, peak lr
    batch = pc.batch_size
    steps_per_epoch, total, warmup = schedule(len(train_idx), batch, dist.world_size, pc.epochs, pc.max_steps,
                                              pc.accum_steps, pc.warmup_epochs)
    if steps_per_epoch == 0:
        raise stmeta.Refused(f"only {len(train_idx)} training clips for batch size {batch} x {dist.world_size} "
                         f"process(es); lower --pretrain.batch_size")
    lr = pc.lr or pc.blr * batch * pc.accum_steps * dist.world_size / 256  # mae_st's scaling rule

    # -- model, optimizer, and what a resume restores
    model = models.VideoMAE(cfg.model)
    if init_state is not None:
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if dist.is_main:
            print(f"init: loaded {len(init_state) - len(unexpected)} tensors"
                  f"{f'; {len(missing)} missing (left at their initial values): {missing[:6]}' if missing else ''}")
    model = model.to(device)
    optimizer = models.make_optimizer(model, lr, pc.weight_decay, pc.beta2)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    step, best = 0, float("inf")
    metrics: dict = {}
    if resume_ck is not None:
        step, metrics = resume_from(resume_ck, model, optimizer)
        best = metrics.get("best_val_loss", best)
    describe(cfg, device, precision, model, dist, f"MAE (mask ratio {cfg.model.mask_ratio})")
    ddp_model = wrap_model(model, cfg, device, dist)

    # -- validation (and the starting model's loss, once)
    def validate(m) -> float:
        return validate_mae(m, val_ds, batch, cfg, device, precision)

    if step == 0 and dist.is_main:
        start_loss = validate(model)
        metrics["start_val_loss"] = start_loss
        log({"step": 0, "total": total, "val_loss": start_loss, "note": "starting model"})

    # -- the loop: an epoch's seeded order, resumed mid-epoch; one optimizer step per
    #    accum_steps micro-batches; eval / checkpoint / log on the cadence
    when = Cadence(step, total, args, pc.eval_every or steps_per_epoch, pc.ckpt_every or steps_per_epoch)
    meter = Meter(device)
    ddp_model.train()
    while when.running(step):
        micro = step * pc.accum_steps
        epoch, offset = divmod(micro, steps_per_epoch)
        train_ds.set_epoch(epoch)
        batches = data.epoch_batches(len(train_ds), batch, cfg.seed, epoch, dist.rank, dist.world_size)[offset:]
        micro_in_step = 0
        for video, _ in data.loader(train_ds, batches, cfg.data.workers, cfg.seed, device):
            # lr: warmup then cosine, per optimizer step
            lr_now = lr_at(step, total, warmup, lr)
            set_lr(optimizer, lr_now)
            # forward / backward of one micro-batch; the masks are a pure function of (seed, micro)
            video = video.to(device, non_blocking=True)
            last_micro = micro_in_step == pc.accum_steps - 1
            with sync_if(ddp_model, dist, last_micro), stmeta.autocast(device, precision):
                loss, _, _ = ddp_model(video, generator=stmeta.step_generator(cfg.seed, micro, device))
            scaler.scale(loss / pc.accum_steps).backward()
            meter.add(video.shape[0] * dist.world_size, loss=loss)
            micro, micro_in_step = micro + 1, micro_in_step + 1
            if not last_micro:
                continue
            micro_in_step = 0
            models.optimizer_step(model, optimizer, scaler, pc.clip_grad)
            step += 1
            do_eval, do_ckpt, do_log = when(step)
            if do_log:  # the only host sync: the loss is read here, and checked before any save
                rec = {"step": step, "total": total, **meter.read(step, total, pc.accum_steps, "clips", lr=lr_now)}
                check_finite(rec["loss"], step, folder, "pretrain", lr_now)
                metrics["train_loss"] = rec["loss"]
                if do_eval and dist.is_main:
                    rec["val_loss"] = metrics["val_loss"] = validate(model)
                    if rec["val_loss"] < best:
                        best = metrics["best_val_loss"] = rec["val_loss"]
                        save(folder, "best.pt", checkpoint("mae", cfg, model, optimizer, step, total, metrics))
                log(rec)
            if do_ckpt and dist.is_main:
                save(folder, "last.pt", checkpoint("mae", cfg, model, optimizer, step, total, metrics))
            if not when.running(step):
                break
    end_phase(ddp_model, dist, step, total, folder, "MAE reconstruction",
              loss_refs={"each patch's mean (1.0; less with a large norm_pix_eps)": 1.0} if cfg.model.norm_pix_loss else None)
    return checkpoint("mae", cfg, model, optimizer, step, total, metrics)


# -----------------------------------------------------------------------------
# Stage 2, second phase: encoder + classification head (Table 2, or Table 1)


@torch.no_grad()
def validate_classifier(m, val_ds, batch: int, n_cls: int, cfg, device, precision: str
                        ) -> tuple[float, float, float]:
    """(loss, top-1, top-5) on the validation clips; with several temporal views per clip the
    views' probabilities are averaged."""
    m.eval()
    n = correct1 = correct5 = 0
    losses = []
    batches = [list(range(j, min(j + batch, len(val_ds)))) for j in range(0, len(val_ds), batch)]
    for video, label in data.loader(val_ds, batches, cfg.data.workers, cfg.seed, device):
        video, label = video.to(device), label.to(device)
        with stmeta.autocast(device, precision):
            if video.dim() == 6:  # (B, V, C, T, H, W): average the views' probabilities
                B, V = video.shape[:2]
                logits = m(video.flatten(0, 1)).float().view(B, V, -1).softmax(-1).mean(1).log()
            else:
                logits = m(video).float()
        losses.append(F.cross_entropy(logits, label, reduction="sum").item())
        top5 = logits.topk(min(5, n_cls), dim=-1).indices
        correct1 += (top5[:, 0] == label).sum().item()
        correct5 += (top5 == label[:, None]).any(-1).sum().item()
        n += len(label)
    m.train()
    return sum(losses) / max(n, 1), correct1 / max(n, 1), correct5 / max(n, 1)


def train_classifier(cfg: stmeta.Config, cache, folder: str, device, precision: str, dist: stmeta.Dist, args,
                     encoder_state: dict | None, classes: str) -> dict:
    ft = cfg.finetune
    enc = dataclasses.replace(cfg.model.encoder, drop_path=ft.drop_path)
    # -- the phase's folder: resume its last.pt, or skip it if it finished
    log = stmeta.RunLog(os.path.join(folder, "log.jsonl"), enabled=dist.is_main)
    resume_ck = start_run(folder, "classifier", cfg, args.resume, dist)
    if finished(resume_ck, folder, "the classifier phase", dist):
        return resume_ck

    # -- data: labelled train clips of the classes (a --labeled-fraction of them), their val clips
    class_split = None if classes == "all" else "meta_train"
    class_ids, train_idx = classifier_clips(cache, cfg, classes)
    label_map = {c: i for i, c in enumerate(class_ids)}
    val_idx = cache.indices(clip_split="val", class_split=class_split)
    ds_kw = dict(num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate, size=enc.img_size,
                 label_map=label_map)
    train_ds = data.ClipDataset(cache, train_idx, train=True, rand_augment=cfg.data.rand_augment,
                                random_erase=cfg.data.random_erase, scale_min=cfg.data.scale_min,
                                hflip=cfg.data.hflip, seed=cfg.seed, **ds_kw)
    val_ds = data.ClipDataset(cache, val_idx, train=False, num_views=cfg.data.num_views, **ds_kw)
    n_cls = len(class_ids)
    names = {"classes": [cache.classes[c] for c in class_ids]}  # stored with every checkpoint
    # -- schedule: optimizer steps, warmup, peak lr (Table 2's absolute lr, or Table 1's base lr)
    batch = ft.batch_size
    steps_per_epoch, total, warmup = schedule(len(train_idx), batch, dist.world_size, ft.epochs, ft.max_steps,
                                              ft.accum_steps, ft.warmup_epochs)
    if steps_per_epoch == 0:
        raise stmeta.Refused(f"only {len(train_idx)} labelled training clips for batch size {batch}; lower "
                         f"--finetune.batch_size or raise --labeled-fraction")
    lr = ft.lr or ft.blr * batch * ft.accum_steps * dist.world_size / 256
    if dist.is_main:
        print(f"classifier: {n_cls} classes ({classes}), {len(train_idx)} labelled train clips "
              f"(labeled fraction {cfg.data.labeled_fraction}), {len(val_idx)} val clips; lr {lr:.3g}")

    # -- model (the pretrained encoder, a new head), optimizer, and what a resume restores
    model = models.Classifier(enc, n_cls, dropout=ft.head_dropout)
    if encoder_state is not None:
        missing, unexpected = model.encoder.load_state_dict(encoder_state, strict=False)
        if (unexpected or missing) and dist.is_main:
            print(f"encoder: {len(missing)} missing, {len(unexpected)} unexpected keys")
    model = model.to(device)
    optimizer = models.make_optimizer(model, lr, ft.weight_decay, ft.beta2, ft.layer_decay)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    step, best, metrics = 0, -1.0, {}
    if resume_ck is not None:
        step, metrics = resume_from(resume_ck, model, optimizer)
        best = metrics.get("best_val_acc", best)
    describe(cfg, device, precision, model, dist, f"classifier ({n_cls} classes)")
    ddp_model = wrap_model(model, cfg, device, dist)

    # -- validation
    def validate(m) -> tuple[float, float, float]:
        return validate_classifier(m, val_ds, batch * 4, n_cls, cfg, device, precision)

    # -- the loop: as the MAE's, with mixup / cutmix to soft targets and label smoothing
    when = Cadence(step, total, args, ft.eval_every or steps_per_epoch, ft.ckpt_every or steps_per_epoch)
    meter = Meter(device)
    ddp_model.train()
    while when.running(step):
        micro = step * ft.accum_steps
        epoch, offset = divmod(micro, steps_per_epoch)
        train_ds.set_epoch(epoch)
        batches = data.epoch_batches(len(train_ds), batch, cfg.seed, epoch, dist.rank, dist.world_size)[offset:]
        micro_in_step = 0
        for video, label in data.loader(train_ds, batches, cfg.data.workers, cfg.seed, device):
            lr_now = lr_at(step, total, warmup, lr)
            set_lr(optimizer, lr_now)
            video, label = video.to(device, non_blocking=True), label.to(device, non_blocking=True)
            # mixup draws only scalars (whether, which, lambda, the box): from a CPU generator, because
            # torch.rand((), generator=<CUDA generator>) fails and each .item() of a GPU draw would sync
            video, target = data.mixup_cutmix(video, label, n_cls, ft.mixup, ft.cutmix, ft.mixup_prob,
                                              ft.label_smoothing, stmeta.step_generator(cfg.seed, micro, torch.device("cpu")))
            last_micro = micro_in_step == ft.accum_steps - 1
            with sync_if(ddp_model, dist, last_micro), stmeta.autocast(device, precision):
                logits = ddp_model(video)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            scaler.scale(loss / ft.accum_steps).backward()
            # accuracy against the clip's own label (before mixing): a rough training signal
            meter.add(video.shape[0] * dist.world_size, loss=loss,
                      train_acc=(logits.detach().argmax(-1) == label).float().mean())
            micro, micro_in_step = micro + 1, micro_in_step + 1
            if not last_micro:
                continue
            micro_in_step = 0
            models.optimizer_step(model, optimizer, scaler, ft.clip_grad)
            step += 1
            do_eval, do_ckpt, do_log = when(step)
            if do_log:
                rec = {"step": step, "total": total, **meter.read(step, total, ft.accum_steps, "clips", lr=lr_now)}
                check_finite(rec["loss"], step, folder, "finetune", lr_now)
                if do_eval and dist.is_main:
                    rec["val_loss"], rec["val_acc"], rec["val_top5"] = validate(model)
                    metrics.update(val_loss=rec["val_loss"], val_acc=rec["val_acc"], val_top5=rec["val_top5"])
                    if rec["val_acc"] > best:
                        best = metrics["best_val_acc"] = rec["val_acc"]
                        save(folder, "best.pt", checkpoint("classifier", cfg, model, optimizer, step, total, metrics,
                                                           names))
                log(rec)
            if do_ckpt and dist.is_main:
                save(folder, "last.pt", checkpoint("classifier", cfg, model, optimizer, step, total, metrics, names))
            if not when.running(step):
                break
    end_phase(ddp_model, dist, step, total, folder, "classification",
              loss_refs={f"ln {n_cls} (chance)": math.log(n_cls)}, acc_refs={"chance": 1 / n_cls})
    return checkpoint("classifier", cfg, model, optimizer, step, total, metrics, names)


# -----------------------------------------------------------------------------
# Stage 3: MAE encoder + MANN on episodes


@torch.no_grad()
def embed_all(backbone, cache, cfg, device, precision, indices=None, batch: int = 64, quiet: bool = False,
              view: int = 0) -> torch.Tensor:
    """Clips through the backbone once: (N, D) float32 for every clip of the cache; rows not in
    `indices` (default: all) stay zero. view 0: the centred window, no augmentation (what a frozen
    stage 3 embeds once and never re-encodes); view v > 0: the training augmentation (random
    window, random resized crop, flip if cfg.data.hflip), a pure function of (seed, v, clip)."""
    enc = cfg.model.encoder
    indices = np.arange(len(cache.labels)) if indices is None else np.asarray(indices)
    ds = data.ClipDataset(cache, indices, num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate,
                          size=enc.img_size, train=view > 0, scale_min=cfg.data.scale_min, hflip=cfg.data.hflip,
                          seed=cfg.seed)
    ds.set_epoch(view)
    was_training = backbone.training
    backbone.eval()
    out = []
    prog = None if quiet else stmeta.Progress(len(ds), "embedding clips" + (f" (augmented view {view})" if view else ""))
    batches = [list(range(j, min(j + batch, len(ds)))) for j in range(0, len(ds), batch)]
    for video, _ in data.loader(ds, batches, cfg.data.workers, cfg.seed, device):
        with stmeta.autocast(device, precision):
            out.append(backbone(video.to(device, non_blocking=True)).float())
        if prog:
            prog.update(video.shape[0])
    if prog:
        prog.close()
    backbone.train(was_training)
    emb = torch.zeros(len(cache.labels), out[0].shape[1], device=device)
    emb[torch.as_tensor(indices, device=device)] = torch.cat(out)
    return emb


def step_seed(step: int, micro: int, mc: stmeta.MetaConfig, seed: int, dist: stmeta.Dist) -> int:
    """The seed of one (step, micro-step, rank): what its episodes (and the views they read) draw from."""
    return ((seed * 1_000_003 + step) * mc.accum_steps + micro) * dist.world_size + dist.rank


def episodes_at(sampler, step: int, micro: int, mc: stmeta.MetaConfig, seed: int, dist: stmeta.Dist):
    """The batch of training episodes of one (step, micro-step, rank): a pure function of them."""
    return sampler.sample(mc.batch_size, torch.Generator().manual_seed(step_seed(step, micro, mc, seed, dist)))


@torch.no_grad()
def clip_table(cache, cfg, device, indices=None) -> torch.Tensor:
    """Every clip at the backbone's input, once (centred window, no augmentation):
    (N, C, T, H, W) float32 on `device`, rows not in `indices` zero. For the pixels backbone with
    episode augmentation, whose input is cheap to keep and to augment afresh at every step."""
    enc = cfg.model.encoder
    indices = np.arange(len(cache.labels)) if indices is None else np.asarray(indices)
    ds = data.ClipDataset(cache, indices, num_frames=enc.num_frames, sampling_rate=cfg.data.sampling_rate,
                          size=enc.img_size, train=False)
    table = torch.zeros(len(cache.labels), 3, enc.num_frames, enc.img_size, enc.img_size, device=device)
    batches = [list(range(j, min(j + 256, len(ds)))) for j in range(0, len(ds), 256)]
    for j, (video, _) in zip(range(0, len(ds), 256), data.loader(ds, batches, cfg.data.workers, cfg.seed, device)):
        table[torch.as_tensor(indices[j:j + 256], device=device)] = video.to(device)
    return table


def sequence_curve(rows: list[dict]) -> dict[str, tuple[list, list]]:
    """Validation accuracy by presentation (1st, 2nd, 3rd, 5th, 10th) against episodes trained."""
    pts = [(r["episodes"], r["val_per_instance"]) for r in rows if "val_per_instance" in r and "episodes" in r]
    if not pts:
        return {}
    n = len(pts[0][1])
    return {f"{stmeta.ordinal(i + 1)} presentation": ([p[0] for p in pts], [p[1][i] for p in pts])
            for i in (0, 1, 2, 4, 9) if i < n}


def draw_learning_curve(folder: str, cfg: stmeta.Config, val_eps) -> str:
    """learning_curve.png: validation accuracy by presentation against episodes trained, with
    what the image-blind label-count predictor gets on the same validation episodes at the 1st
    and 2nd presentation (a curve at those lines has learned bookkeeping, not the images)."""
    mc = cfg.meta
    g = torch.Generator().manual_seed(cfg.seed + 12345)  # validate()'s episodes
    eps = [val_eps.sample(mc.batch_size, g) for _ in range(math.ceil(mc.val_episodes / mc.batch_size))]
    blind = torch.cat([evaluate.by_presentation(evaluate.label_count_correct(ep, mc.n_way, mc.seq_shots),
                                                ep.instance, mc.seq_shots) for ep in eps]).mean(0)
    name = "LSTM, no memory" if cfg.mann.read_heads == 0 else "MANN"
    path = os.path.join(folder, "learning_curve.png")
    stmeta.line_chart(path, sequence_curve(stmeta.read_log(os.path.join(folder, "log.jsonl"))), y_from=0.0,
                      refs={"chance": 1 / mc.n_way, "label counting, 1st": blind[0].item(),
                            "label counting, 2nd": blind[1].item()},
                      title=f"{name}, held-out classes: accuracy by presentation ({mc.n_way}-way, "
                            f"{mc.seq_shots} instances)", xlabel="episodes trained", ylabel="accuracy")
    return path


def episode_samplers(cfg: stmeta.Config, cache) -> tuple[data.EpisodeSampler | data.ShotMix | None,
                                                         data.EpisodeSampler]:
    """Meta-train episodes (labelled clips of the meta-train classes, augmented as Santoro's
    when asked; K = k_shot..k_shot_max when meta.k_shot_max asks for a mix; None where the
    labelled clips cannot make one and no batch needs them, stmeta.label_free) and validation
    episodes (held-out meta-test classes, never augmented, K = k_shot)."""
    mc = cfg.meta
    train_pool = data.labelled_subset(cache, cache.indices(class_split="meta_train"), cfg.data.labeled_fraction,
                                      cfg.seed)
    ep_kw = dict(n_way=mc.n_way, k_shot=mc.k_shot, n_query=mc.n_query, layout=mc.layout, seq_shots=mc.seq_shots)
    def sampler(k: int) -> data.EpisodeSampler:
        return data.EpisodeSampler(cache, train_pool, cache.classes_in("meta_train"), rotations=mc.rotate_classes,
                                   max_shift=mc.max_shift, **{**ep_kw, "k_shot": k})

    try:
        train_eps = sampler(mc.k_shot)
        if mc.k_shot_max > mc.k_shot and mc.layout == "support_query":  # a mix of K: as many as the clips allow
            mix = [train_eps]
            for k in range(mc.k_shot + 1, mc.k_shot_max + 1):
                try:
                    mix.append(sampler(k))
                except data.DataError:
                    print(f"meta-train episodes: K = {mc.k_shot}..{k - 1}, not ..{mc.k_shot_max}: a {k}-shot episode "
                          f"needs {k + mc.n_query} labelled clips in each of {mc.n_way} classes")
                    mc.k_shot_max = k - 1
                    break
            train_eps = mix[0] if len(mix) == 1 else data.ShotMix(mix)
    except data.DataError as e:
        if not stmeta.label_free(mc):
            hint = "" if cfg.data.labeled_fraction == 1 else (
                "; with fewer labels than an episode needs, meta-train on view episodes alone: "
                "--meta.train_views=8 --meta.view_episodes=1" if mann_inputs(cfg) == "embeddings" else
                "; view episodes (a MANN meta-trained without labels) need a frozen backbone: drop --finetune, "
                "--meta.rotate_classes and --meta.max_shift, or give more labels")
            raise stmeta.Refused(f"meta-train episodes: {e}{hint}") from None
        train_eps = None  # every batch is view or cluster episodes: the labels are not needed
    try:
        val_eps = data.EpisodeSampler(cache, cache.indices(class_split="meta_test"), cache.classes_in("meta_test"),
                                      **ep_kw)
    except data.DataError as e:
        raise stmeta.Refused(f"held-out (meta-test) episodes: {e}") from None
    return train_eps, val_eps


def cluster_episodes(cfg: stmeta.Config, cache, emb: torch.Tensor, k_max: int, verbose: bool
                     ) -> data.EpisodeSampler | data.ShotMix:
    """Episodes whose classes are k-means clusters of the frozen embeddings (data.cluster_labels)
    of the clips MAE pretraining may use, labelled or not (their labels unused): the meta-train
    classes' clips and every unlabelled clip, never a held-out class's. K = k_shot..k_max, as
    the labelled episodes are asked for, whatever their own labels allow; clusters too small for
    an episode are left out. Printed: the clusters' sizes, and how pure they are by the
    meta-train labels (a measurement only: the clustering never reads them)."""
    mc = cfg.meta
    pool = cache.pretrain_pool("meta_train")
    ids = data.cluster_labels(emb.cpu(), pool, mc.clusters, cfg.seed)
    if verbose:
        sizes = np.bincount(ids[pool], minlength=mc.clusters)
        known = pool[cache.labels[pool] >= 0]
        pure = sum(np.bincount(cache.labels[known][ids[known] == c]).max(initial=0) for c in range(mc.clusters))
        print(f"cluster episodes: {mc.clusters} k-means clusters of {len(pool)} clips (labels unused), "
              f"{sizes.min()}-{sizes.max()} clips each (median {int(np.median(sizes))}); "
              f"purity by the meta-train labels {pure / max(len(known), 1):.1%}; "
              f"{mc.cluster_share:.0%} of the batches")
    samplers = []
    for k in range(mc.k_shot, max(k_max, mc.k_shot) + 1):
        try:
            samplers.append(data.EpisodeSampler(ids.tolist(), pool, range(mc.clusters), n_way=mc.n_way, k_shot=k,
                                                n_query=mc.n_query, layout=mc.layout, seq_shots=mc.seq_shots,
                                                drop_small=True))
        except data.DataError as e:
            if not samplers:
                raise stmeta.Refused(f"cluster episodes: {e}; ask for fewer --meta.clusters") from None
            break
    return samplers[0] if len(samplers) == 1 else data.ShotMix(samplers)


def view_pool(cache, mc: stmeta.MetaConfig) -> np.ndarray:
    """The clips embedded in train_views views: the meta-train classes' clips, and with view
    episodes every clip MAE pretraining may use (the unlabelled ones too)."""
    return cache.pretrain_pool("meta_train") if mc.view_episodes else cache.indices(class_split="meta_train")


def view_episodes(cfg: stmeta.Config, cache, k_max: int, verbose: bool) -> data.ViewEpisodes | data.ShotMix:
    """Episodes whose classes are single clips of view_pool (labels unused) and whose instances
    are their train_views views (data.ViewEpisodes), K = k_shot..k_max as far as the views allow."""
    mc = cfg.meta
    pool = view_pool(cache, mc)
    last = max(mc.k_shot, min(k_max, mc.train_views - mc.n_query)) if mc.layout == "support_query" else mc.k_shot
    try:
        samplers = [data.ViewEpisodes(pool, len(cache.labels), mc.train_views, n_way=mc.n_way, k_shot=k,
                                      n_query=mc.n_query, layout=mc.layout, seq_shots=mc.seq_shots)
                    for k in range(mc.k_shot, last + 1)]
    except data.DataError as e:
        raise stmeta.Refused(f"--meta.view_episodes: {e}") from None
    if verbose:
        print(f"view episodes: {mc.view_episodes:.0%} of the batches, each class one of {len(pool)} clips "
              f"(labels unused), its instances {mc.train_views} views, K = {mc.k_shot}..{last}")
    return samplers[0] if len(samplers) == 1 else data.ShotMix(samplers)


def train_mann(cfg: stmeta.Config, cache, folder: str, device, precision: str, dist: stmeta.Dist, args,
               encoder_state: dict | None) -> dict:
    mc = cfg.meta
    enc = cfg.model.encoder
    # -- the phase's folder: resume its last.pt, or skip it if it finished
    log = stmeta.RunLog(os.path.join(folder, "log.jsonl"), enabled=dist.is_main)
    resume_ck = start_run(folder, "mann", cfg, args.resume, dist)
    if finished(resume_ck, folder, "the MANN phase", dist):
        return resume_ck

    # -- episodes: meta-train classes for training (augmented as Santoro's when asked), held-out
    #    meta-test classes for validation (never augmented)
    # episode_samplers lowers k_shot_max to what the labelled clips allow (run() called it first)
    if (cfg.data.labeled_fraction < 1 and not (mc.view_episodes or mc.clusters) and mann_inputs(cfg) == "embeddings"
            and dist.is_main):
        print(f"note: {cfg.data.labeled_fraction:.0%} of the labels and labelled episodes only: with a few labelled "
              f"clips a class the MANN fits them; --meta.input_dropout=0.5 --meta.train_views=8 "
              f"--meta.view_episodes=0.5 meta-trains on the unlabelled clips too (README: view episodes)")
    asked = RUN_INFO.get("k_shot_max_asked")
    asked_k_max = mc.k_shot_max if asked is None else asked
    train_eps, val_eps = episode_samplers(cfg, cache)
    val_pool = cache.indices(class_split="meta_test")
    augment = mc.rotate_classes or mc.max_shift > 0

    # -- model (backbone, input norm, MANN as one state dict), optimizer, what a resume restores
    backbone = models.build_backbone(mc.backbone, enc, pixels_size=mc.pixels_size, channels=mc.pixels_channels or None,
                                     pool=mc.pool)
    if encoder_state is not None and mc.backbone == "mae":
        backbone.vit.load_state_dict(encoder_state)
    mann = models.MANN(cfg.mann, input_dim=backbone.out_dim, n_way=mc.n_way)
    model = models.MetaLearner(backbone, mann, input_norm=mc.input_norm,  # one state dict
                               input_dropout=mc.input_dropout).to(device)
    if getattr(args, "warm_state", None) is not None:  # --warm-start: the whole MetaLearner (warm_start() checked it)
        model.load_state_dict(args.warm_state)
    feed = mann_inputs(cfg)
    if mc.clusters and feed != "embeddings":
        raise stmeta.Refused(f"--meta.clusters={mc.clusters}: cluster episodes need a frozen backbone on "
                             f"unaugmented episodes (the embeddings are clustered once); drop --finetune, "
                             f"--meta.rotate_classes and --meta.max_shift")
    if mc.train_views > 1 and feed != "embeddings":
        raise stmeta.Refused(f"--meta.train_views={mc.train_views}: views are cached embeddings of a frozen backbone; "
                             f"with --finetune, --meta.rotate_classes or --meta.max_shift every step augments "
                             f"its clips already: drop --meta.train_views")
    frozen = feed != "loader"
    if frozen:
        backbone.requires_grad_(False)
        model.norm.requires_grad_(mc.learn_input_norm)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": head, "lr_scale": 1.0, "weight_decay": mc.weight_decay}]
    if not frozen:
        groups.append({"params": list(backbone.parameters()), "lr_scale": mc.backbone_lr / mc.lr,
                       "weight_decay": mc.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=mc.lr)
    step, best, metrics = 0, -1.0, {}
    if resume_ck is not None:
        step, metrics = resume_from(resume_ck, model, optimizer)
        best = metrics.get("best_val_acc", best)
    total = mc.steps

    # -- inputs. What feeds the MANN, cheapest first:
    #   emb     (N, D) every clip through a frozen backbone once; episodes index the table
    #   inputs  (N, C, T, H, W) every clip at the input, once: pixels whose episodes are augmented
    #           (rotated classes, translations), which must go through the backbone at every step
    #   clips_iter  end to end: DataLoader workers prepare each step's clips ahead of time
    # (mann_inputs says which: "embeddings", "clips", "loader")
    emb = views = inputs = clips_iter = None
    if feed == "embeddings":
        # kept across a resume, and reused only by a run with the same config and inputs
        emb_path = os.path.join(folder, "embeddings.pt")
        made_by = {"config": stmeta.config_to_dict(cfg), "inputs": RUN_INFO.get("inputs")}
        saved = stmeta.load_checkpoint(emb_path) if os.path.exists(emb_path) else {}
        if saved.get("made_by") == made_by:
            emb = saved["embeddings"].to(device)
        else:
            emb = embed_all(backbone, cache, cfg, device, precision)
            if dist.is_main:
                stmeta.save_checkpoint(emb_path, {"embeddings": emb.cpu(), "backbone": mc.backbone,
                                                  "made_by": made_by})
        if dist.is_main:
            print(f"backbone: {mc.backbone}, frozen; {emb.shape[0]} clips embedded once ({emb.shape[1]} features)")
        if mc.center_inputs:  # the pretraining pool's mean embedding (labels unused), a buffer of the model
            centre_on = cache.pretrain_pool(cfg.pretrain.pool)
            with torch.no_grad():
                model.input_mean.copy_(emb[torch.as_tensor(centre_on, device=device)].mean(0))
            if dist.is_main:
                print(f"inputs centred: the mean embedding of the {len(centre_on)} clips of the pretraining pool "
                      f"({cfg.pretrain.pool}, labels unused) is subtracted before the input norm "
                      f"(--meta.center_inputs=false: not)")
        if mc.train_views > 1:  # (V, N, D): view 0 the centred one, the others augmented; not saved
            pool = view_pool(cache, mc)  # (recomputed on a resume: a pure function of the seed)
            views = torch.stack([emb] + [embed_all(backbone, cache, cfg, device, precision, indices=pool,
                                                   quiet=not dist.is_main, view=v) for v in range(1, mc.train_views)])
            if dist.is_main:
                print(f"training episodes read one of {mc.train_views} views of each meta-train clip (the centred "
                      f"one and {mc.train_views - 1} augmented; flips {'on' if cfg.data.hflip else 'off'})")
        # semi-supervised meta-training: the unlabelled clips' clusters as classes, or each clip a
        # class and its views the instances (a source alone where the labelled episodes are None)
        if mc.clusters:
            clusters = cluster_episodes(cfg, cache, emb, asked_k_max, dist.is_main)
            train_eps = clusters if train_eps is None else data.EpisodeMix(
                [train_eps, clusters], [1 - mc.cluster_share, mc.cluster_share])
        if mc.view_episodes:
            by_view = view_episodes(cfg, cache, asked_k_max, dist.is_main)
            metrics["view_k_shot_max"] = max(by_view.k_shots) if isinstance(by_view, data.ShotMix) else by_view.k_shot
            train_eps = by_view if train_eps is None else data.EpisodeMix(
                [train_eps, by_view], [1 - mc.view_episodes, mc.view_episodes])
    elif feed == "clips":
        inputs = clip_table(cache, cfg, device)
        if dist.is_main:
            print(f"backbone: {mc.backbone} ({backbone.out_dim} features), computed at every step from "
                  f"{inputs.shape[0]} cached clips: meta-train episodes augmented "
                  f"(rotated classes {mc.rotate_classes}, shifts up to {mc.max_shift} px)")
    else:
        clip_ds = data.StepClips(cache, np.arange(len(cache.labels)), num_frames=enc.num_frames,
                            sampling_rate=cfg.data.sampling_rate, size=enc.img_size, train=True,
                            scale_min=cfg.data.scale_min, hflip=cfg.data.hflip, seed=cfg.seed)
        keys = ([(s * mc.accum_steps + m, int(i)) for i in episodes_at(train_eps, s, m, mc, cfg.seed, dist).clips.flatten()]
                for s in range(step, total) for m in range(mc.accum_steps))
        clips_iter = iter(data.loader(clip_ds, keys, cfg.data.workers, cfg.seed, device))
        if dist.is_main:
            print(f"backbone: {mc.backbone}, trained end to end with the MANN (backbone lr {mc.backbone_lr}); "
                  f"{mc.batch_size * train_eps.steps} clips a step, loaded by {cfg.data.workers} worker(s)")
    episode = (f"{mc.n_way}-way {evaluate.shot_range(mc)}, support/query" if mc.layout == "support_query" else
               f"{mc.n_way}-way, {mc.seq_shots} instances a class, sequence")
    describe(cfg, device, precision, model, dist, f"{'LSTM, no memory' if cfg.mann.read_heads == 0 else 'MANN'} "
                                                  f"({episode})")
    ddp_model = wrap_model(model, cfg, device, dist)

    # -- what one step reads
    def episode_input(ep, key: int = 0) -> torch.Tensor:
        """(B, S, D): what the MANN reads at each step of a batch of (augmented) episodes; `key`
        (the step's step_seed) draws which view of each clip a training episode reads."""
        if views is not None:
            g = torch.Generator().manual_seed(key)
            pick = torch.randint(len(views), tuple(ep.clips.shape), generator=g).to(device)
            view, clip = data.split_view_index(ep.clips, len(cache.labels))  # a view episode names its views
            return views[torch.where(view >= 0, view, pick), clip]
        if emb is not None:
            return emb[ep.clips]  # cached embeddings
        video = inputs[ep.clips.flatten()] if inputs is not None else next(clips_iter)[0].to(device, non_blocking=True)
        if augment:  # (B*S, C, T, H, W), each clip turned and shifted as its episode says
            video = data.augment_clips(video, ep.rotation.flatten(), ep.down.flatten(), ep.right.flatten())
        return model.backbone(video).view(*ep.clips.shape, -1)

    # -- validation
    @torch.no_grad()
    def validate() -> tuple[float, list[float] | None]:
        """Accuracy on fixed episodes of the held-out classes (the same ones at every call), and
        in the sequence layout the accuracy at each presentation of a class (1st ... seq_shots-th)."""
        model.eval()
        if emb is not None:
            table = emb
        elif inputs is not None:
            table = torch.cat([model.backbone(chunk) for chunk in inputs.split(1024)])
        else:
            table = embed_all(model.backbone, cache, cfg, device, precision, indices=val_pool, quiet=True)
        g = torch.Generator().manual_seed(cfg.seed + 12345)
        correct = n = 0
        per = torch.zeros(2, mc.seq_shots, device=device)  # correct, count by presentation
        for _ in range(math.ceil(mc.val_episodes / mc.batch_size)):
            ep = val_eps.sample(mc.batch_size, g).to(device)
            with stmeta.autocast(device, precision):
                _, ok = models.episode_loss(model, table[ep.clips], ep)
            correct += ok[ep.is_query].sum().item()
            n += ep.is_query.sum().item()
            if mc.layout == "sequence":
                per[0].index_add_(0, ep.instance.flatten(), ok.flatten().float())
                per[1].index_add_(0, ep.instance.flatten(), torch.ones_like(ok.flatten(), dtype=torch.float))
        model.train()
        if frozen:
            backbone.eval()
        by_instance = (per[0] / per[1].clamp_min(1)).tolist() if mc.layout == "sequence" else None
        return correct / max(n, 1), by_instance

    # -- the loop: each step a batch of episodes that is a pure function of (seed, step, rank)
    when = Cadence(step, total, args, mc.eval_every, mc.ckpt_every)
    meter = Meter(device)
    no_scaling = torch.amp.GradScaler(enabled=False)  # the MANN's loss is taken in fp32
    model.train()
    if frozen:
        backbone.eval()  # no dropout / drop path in a frozen backbone
    while when.running(step):
        lr_now = lr_at(step, total, mc.warmup_steps, mc.lr)
        set_lr(optimizer, lr_now)
        for micro in range(mc.accum_steps):
            ep = episodes_at(train_eps, step, micro, mc, cfg.seed, dist).to(device)
            if cfg.compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the captured steps may be replayed
            with sync_if(ddp_model, dist, micro == mc.accum_steps - 1), stmeta.autocast(device, precision):
                loss, ok = models.episode_loss(ddp_model, episode_input(ep, step_seed(step, micro, mc, cfg.seed, dist)),
                                               ep)
            (loss / mc.accum_steps).backward()
            meter.add(mc.batch_size * dist.world_size, loss=loss,
                      train_acc=(ok & ep.is_query).sum() / ep.is_query.sum().clamp_min(1))
        models.optimizer_step(model, optimizer, no_scaling, mc.clip_grad)
        step += 1
        do_eval, do_ckpt, do_log = when(step)
        if do_log:
            rec = {"step": step, "total": total, **meter.read(
                step, total, mc.accum_steps, "episodes", lr=lr_now,
                episodes=step * mc.batch_size * mc.accum_steps * dist.world_size)}
            check_finite(rec["loss"], step, folder, "meta", lr_now)
            metrics["train_seconds"] = metrics.get("train_seconds", 0.0) + meter.seconds  # kept across a resume
            if do_eval and dist.is_main:
                rec["val_acc"], by_instance = validate()
                if by_instance is not None:
                    rec["val_per_instance"] = by_instance
                metrics["val_acc"] = rec["val_acc"]
                if rec["val_acc"] > best:
                    best = metrics["best_val_acc"] = rec["val_acc"]
                    save(folder, "best.pt", checkpoint("mann", cfg, model, optimizer, step, total, metrics))
            log(rec)
        if do_ckpt and dist.is_main:
            save(folder, "last.pt", checkpoint("mann", cfg, model, optimizer, step, total, metrics))
    end_phase(ddp_model, dist, step, total, folder,
              f"{'LSTM' if cfg.mann.read_heads == 0 else 'MANN'} {mc.n_way}-way "
              + (evaluate.shot_range(mc) if mc.layout == "support_query" else f"sequences of {mc.seq_shots} a class"),
              loss_refs={f"ln {mc.n_way} (chance)": math.log(mc.n_way)}, acc_refs={"chance": 1 / mc.n_way})
    if dist.is_main and mc.layout == "sequence":
        draw_learning_curve(folder, cfg, val_eps)
    return checkpoint("mann", cfg, model, optimizer, step, total, metrics)


# -----------------------------------------------------------------------------
# Where an encoder comes from: our checkpoints of any stage, or a published MAE


def load_source(path: str, dist: stmeta.Dist, run_cfg: stmeta.Config | None = None, overrides=()
                ) -> tuple[stmeta.MAEConfig, dict, str]:
    """(model config, MAE-shaped state dict, description) from a checkpoint of any stage of
    ours, or a published mae_st / VideoMAE file. The run adopts the checkpoint's architecture.
    A published file is fitted to the run's clips (run_cfg's img_size and num_frames: its
    position tables are resized); head counts and the LayerNorm epsilon, which a file does not
    store, are taken from --model.encoder.num_heads / --model.decoder_heads /
    --model.encoder.norm_eps when those are given in `overrides`."""
    ck = stmeta.load_checkpoint(path)
    if "config" in ck and ck.get("kind") in ("mae", "classifier", "mann"):
        model_cfg = stmeta.config_from_dict(stmeta.Config, ck["config"]).model
        state = ck["model"]
        if ck["kind"] == "classifier":  # Classifier.encoder.* -> VideoMAE.encoder.*
            state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        elif ck["kind"] == "mann":  # MetaLearner.backbone.vit.* -> VideoMAE.encoder.*
            state = {"encoder." + k[len("backbone.vit."):]: v for k, v in state.items()
                     if k.startswith("backbone.vit.")}
            if not state:
                raise stmeta.Refused(f"{path}: this stage-3 run's backbone has no encoder weights "
                                 f"(backbone {ck['config']['meta']['backbone']!r})")
        check_fits(path, model_cfg, state)
        RUN_INFO["init_kind"] = ck["kind"]
        return model_cfg, state, f"our {ck['kind']} checkpoint (step {ck.get('step')})"
    fit = {}
    if run_cfg is not None:
        enc = run_cfg.model.encoder
        given = given_keys(run_cfg, overrides)
        fit = dict(img_size=enc.img_size, num_frames=enc.num_frames,
                   num_heads=enc.num_heads if "model.encoder.num_heads" in given else None,
                   decoder_heads=run_cfg.model.decoder_heads if "model.decoder_heads" in given else None,
                   norm_eps=enc.norm_eps if "model.encoder.norm_eps" in given else None)
    model_cfg, state, report = models.load_published(path, ck, **fit)
    if dist.is_main:
        print(report)
    RUN_INFO["init_kind"] = "published"
    return model_cfg, state, "a published video MAE checkpoint"


def check_fits(path: str, model_cfg: stmeta.MAEConfig, state: dict) -> None:
    """The checkpoint's tensors against the model its own config describes (built on the meta
    device: shapes only, no memory), so a file whose weights do not fit is refused up front."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in models.VideoMAE(model_cfg).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - a config that cannot build a model is the same complaint
        raise stmeta.Refused(f"{path}: its config does not describe a buildable model ({e})") from None
    bad = [f"{k} {tuple(v.shape)} (its config needs {expected[k]})" for k, v in state.items()
           if k in expected and tuple(v.shape) != expected[k]]
    if bad:
        raise stmeta.Refused(f"{path}: {len(bad)} tensor(s) do not fit the model its config describes, e.g. "
                             f"{'; '.join(bad[:3])}")


def encoder_of(mae_state: dict) -> dict:
    return {k[len("encoder."):]: v for k, v in mae_state.items() if k.startswith("encoder.")}


def print_config(cfg: stmeta.Config, stage: int) -> None:
    parts = {"model": cfg.model, "data": cfg.data}
    parts.update({1: {"pretrain": cfg.pretrain}, 2: {"pretrain": cfg.pretrain, "finetune": cfg.finetune},
                  3: {"pretrain": cfg.pretrain, "meta": cfg.meta, "mann": cfg.mann}}[stage])
    print(f"config (preset {cfg.preset}, seed {cfg.seed}, precision {cfg.precision}, compile {cfg.compile}):")
    for name, sub in parts.items():  # wrapped: one field never split, no line past 100 characters
        items = [f"{k}={v}" for k, v in stmeta.flatten_config(sub).items()]
        print(textwrap.fill(" ".join(items), width=100, initial_indent=f"  {name}: ",
                            subsequent_indent=" " * (len(name) + 4), break_long_words=False,
                            break_on_hyphens=False))


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    """The command line: everything the user gave is checked before the first step (one
    `error:` line, exit code 2, for anything wrong), then the stages run in --out under a lock."""
    args, overrides = parse_args(argv)
    dist, device_name = stmeta.setup_distributed(args.device)
    lock = None
    try:
        lock = prepare_run(args, overrides, dist, device_name)
        return run(*lock[1:])
    except stmeta.InputError as e:  # a data or checkpoint problem found mid-way: still one line
        raise stmeta.Refused(str(e)) from None
    finally:
        if lock is not None:
            lock[0].release()


# The MetaLearner fields a --warm-start checkpoint must share with the run, or its weights do not fit
WARM_FIELDS = ("meta.pool", "meta.n_way", "mann")


def warm_start(args, cfg: stmeta.Config) -> tuple[dict, str | None, str]:
    """--warm-start: (model state, init_kind, path) of a stage-3 checkpoint, refused unless it is a
    stage-3 run on an MAE-style encoder whose MANN has the shape this run asks for."""
    path = args.warm_start
    if args.stage != 3:
        raise stmeta.Refused("--warm-start is for stage 3 (it starts a MetaLearner)")
    if args.pretrained:
        raise stmeta.Refused("--warm-start takes its encoder from the warm run itself: drop --pretrained")
    if cfg.meta.classify:
        raise stmeta.Refused("--warm-start takes the warm run's encoder as it is, so no classification phase tunes "
                             "it: drop --meta.classify=true")
    if not os.path.isfile(path):
        raise stmeta.Refused(f"--warm-start {path}: no such file (a stage-3 run's last.pt)")
    ck = stmeta.load_checkpoint(path)
    if ck.get("kind") != "mann" or "config" not in ck:
        raise stmeta.Refused(f"--warm-start {path}: a {ck.get('kind')!r} checkpoint; it needs a stage-3 (mann) one")
    warm = stmeta.config_from_dict(stmeta.Config, ck["config"])
    if cfg.meta.backbone != "mae":
        raise stmeta.Refused(f"--warm-start continues a run on a ViT encoder: leave --backbone at mae (got "
                             f"{cfg.meta.backbone})")
    if warm.meta.backbone == "pixels":
        raise stmeta.Refused(f"--warm-start {path}: its backbone is pixels (nothing to fine-tune); use a run "
                             f"on an MAE encoder")
    mine, theirs = stmeta.flatten_config(cfg), stmeta.flatten_config(warm)
    for key in sorted(mine):
        if key.startswith(WARM_FIELDS) and mine[key] != theirs.get(key):
            raise stmeta.Refused(f"--warm-start {path}: it was trained with --{key}={theirs.get(key)}, this run "
                                 f"asks for --{key}={mine[key]}; its weights would not fit (pass --{key}="
                                 f"{theirs.get(key)})")
    return ck["model"], ck.get("init_kind"), path


def check_writable(folder: str) -> None:
    """--out is a folder this process can write, or can be made in one: checked without
    creating anything, so a refused run leaves no trace."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise stmeta.Refused(f"--out {folder}: a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise stmeta.Refused(f"--out {folder}: cannot write there ({parent} is not a writable folder)")


def prepare_run(args, overrides, dist, device_name):
    """Resolve and check everything; -> (lock, args, cfg, ...) for run(). Raises Refused."""
    try:
        device = stmeta.pick_device(device_name, verbose=dist.is_main)
        cfg = resolve_config(args, overrides, device)
    except ValueError as e:
        raise stmeta.Refused(str(e)) from None
    if args.seed is not None and args.seed < 0:
        raise stmeta.Refused(f"--seed {args.seed}: must be 0 or more")
    if args.stop_after < 0 or args.log_every < 0:
        raise stmeta.Refused("--stop-after and --log-every take 0 (off) or a positive number of steps")
    source = args.init if args.stage == 1 else args.pretrained
    source_state = None
    RUN_INFO["init_kind"] = None  # load_source sets it: what the --init / --pretrained file was
    RUN_INFO["warm_start"] = None
    RUN_INFO["k_shot_max_asked"] = None  # stage 3 sets it, before episode_samplers lowers meta.k_shot_max
    args.warm_state = warm_kind = None
    if args.warm_start:
        args.warm_state, warm_kind, source = warm_start(args, cfg)
    if args.init and args.stage != 1:
        raise stmeta.Refused("--init is for stage 1; stages 2 and 3 take --pretrained")
    if args.pretrained and args.stage == 1:
        raise stmeta.Refused("--pretrained is for stages 2 and 3; stage 1 takes --init")
    if source:
        model_cfg, source_state, what = load_source(source, dist, cfg, overrides)
        if dist.is_main:
            print(f"{'init' if args.stage == 1 else 'pretrained'}: {source} ({what}); its encoder architecture "
                  f"is used: width {model_cfg.encoder.width}, depth {model_cfg.encoder.depth}, "
                  f"{model_cfg.encoder.img_size}px, {model_cfg.encoder.num_frames} frames")
        mask_ratio = cfg.model.mask_ratio
        cfg.model = model_cfg
        cfg.model.mask_ratio = mask_ratio
        if args.warm_start:  # the encoder is named by what the warm run's encoder was (an MAE, ...)
            RUN_INFO.update(init_kind=warm_kind, warm_start=os.path.abspath(args.warm_start))
    filled = semi_supervised_recipe(cfg, overrides, args.stage)
    if filled and dist.is_main:
        print(f"labels: {cfg.data.labeled_fraction:.0%} of each meta-train class's clips; the semi-supervised recipe sets " +
              " ".join(f"--{k}={stmeta.SEMI_SUPERVISED[k]}" for k in filled) + " (README, Results: view "
              "episodes; give any of them to choose it yourself)")
    stmeta.check_config(cfg)
    precision = stmeta.resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = args.out or default_out(args.stage, args.resume)
    if dist.is_main:
        check_writable(out)
    stmeta.seed_everything(cfg.seed)  # as run() starts: building the synthetic benchmark may draw
    cache = open_data(args, cfg, dist)
    if args.stage == 3 and cfg.meta.pretrain_steps:
        cfg.pretrain.max_steps = cfg.meta.pretrain_steps
    if args.stage == 3 and cfg.meta.pixels_channels == 0:  # grey data stays one channel for the pixels backbone
        cfg.meta.pixels_channels = 1 if cache.grey else cfg.model.encoder.in_chans
    if args.stage == 3:  # the episode shape against the data, before any phase spends time; it lowers
        RUN_INFO["k_shot_max_asked"] = cfg.meta.k_shot_max  # k_shot_max to what the labels allow, and the
        try:  # episodes without labels (views, clusters) take the K asked for
            episode_samplers(cfg, cache)
        except stmeta.Refused as e:
            if "meta.view_episodes" not in filled or stmeta.label_free(cfg.meta):
                raise
            cfg.meta.view_episodes = 1.0  # the recipe's own choice, so it may go all the way
            if dist.is_main:
                print(f"semi-supervised recipe: {str(e).split('; with fewer labels')[0]}; so every batch is view "
                      f"episodes (--meta.view_episodes=1): the MANN reads no label")
            episode_samplers(cfg, cache)
    # overrides were applied (and their keys checked) by resolve_config
    flip_given = "data.hflip" in given_keys(cfg, overrides)
    if cache.flip_changes_class and cfg.data.hflip and not flip_given:
        cfg.data.hflip = False  # the default follows the data: a flipped glyph is another glyph
        if dist.is_main:
            print("data: horizontal flips off (this benchmark's classes change under a flip; --data.hflip=true "
                  "forces them)")
    directional = data.direction_classes(cache.classes)
    if cfg.data.hflip and dist.is_main and (directional or cache.flip_changes_class):
        print(f"warning: {data.flip_warning(directional, len(cache.classes))}" if directional else
              "warning: --data.hflip=true on a benchmark whose classes change under a flip")
    RUN_INFO.update(data=os.path.abspath(args.data), init=os.path.abspath(source) if source else None)
    RUN_INFO["inputs"] = {"--data": os.path.abspath(args.data), "data fingerprint": stmeta.fingerprint(args.data, data.CACHE_FILES),
                          "--init/--pretrained": os.path.abspath(source) if source else None,
                          "source fingerprint": stmeta.fingerprint(source), "--classes": args.classes,
                          "--recipe": args.recipe}
    lock = stmeta.RunLock(out).acquire() if dist.is_main else stmeta.RunLock(out)
    if dist.is_main:
        print(f"run: {out} | stage {args.stage} | device {device} | precision {precision}")
        print_config(cfg, args.stage)
    return lock, args, cfg, out, cache, device, precision, dist, source_state


# -----------------------------------------------------------------------------
# The whole run's ETA: each planned phase's work x its step time measured at the start; the
# later phases that load clips as the running one does are rescaled by how far its measured
# steps are from its calibration (the loader's share, which the calibration leaves out)


def schedule(n_clips: int, batch: int, world: int, epochs: int, max_steps: int, accum: int,
             warmup_epochs: int) -> tuple[int, int, int]:
    """An epoch-based phase's (micro-batches per epoch, optimizer steps, warmup steps)."""
    per_epoch = n_clips // (batch * world)
    return per_epoch, (max_steps or epochs * per_epoch) // accum, warmup_epochs * per_epoch // accum


def classifier_classes(args) -> str:
    """What a run's classification phase classifies: stage 2's --classes; stage 3's always the
    meta-train classes (its held-out classes' labels are never used)."""
    return args.classes if args.stage == 2 else "meta_train"


def phase_work(plan: list[str], args, cfg: stmeta.Config, cache, world: int) -> dict[str, int]:
    """Optimizer steps of each training phase, as its loop will count them; clips embedded
    (a frozen MANN's one pass) and episodes scored (the evaluation) for the others."""
    pc, ft, mc = cfg.pretrain, cfg.finetune, cfg.meta
    work = {}
    for name in plan:
        if name in ("MAE pretraining", "MAE reconstruction"):
            pool, _ = pretrain_pool(cache, cfg, None if args.stage == 2 and args.classes == "all" else "meta_train")
            work[name] = schedule(len(pool), pc.batch_size, world, pc.epochs, pc.max_steps, pc.accum_steps, 0)[1]
        elif name == "classification":
            _, idx = classifier_clips(cache, cfg, classifier_classes(args))
            work[name] = schedule(len(idx), ft.batch_size, world, ft.epochs, ft.max_steps, ft.accum_steps, 0)[1]
        elif name == "MANN meta-training":
            work[name] = mc.steps
            work["embedding"] = ((len(cache.labels) + (mc.train_views - 1) * len(view_pool(cache, mc)))
                                 if mann_inputs(cfg) == "embeddings" else 0)
        elif name == "evaluation":
            work[name] = mc.test_episodes
            work["evaluation embedding"] = len(cache.indices(class_split="meta_test"))
    return work


def calibrate(plan: list[str], cfg: stmeta.Config, device, precision: str, n_classes: int) -> dict[str, float]:
    """Seconds per unit of phase_work on this machine now: 2 warm-up and 2 timed steps (5 for
    the cheap cached-embedding MANN step) of a throwaway copy of each phase's model on random
    inputs of the run's batch sizes (the CPU and CUDA generators are saved and restored, so the
    run itself is unchanged). Loading, validation and checkpoints are not in these steps; see
    RunETA for how the running phase's measured steps correct for them."""
    enc, mc = cfg.model.encoder, cfg.meta
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None  # the MAE masks draw on it

    def per_step(model, loss_fn, batch, warmup: int = 2, steps: int = 2) -> float:
        step = evaluate.speed_step(model, loss_fn, models.make_optimizer(model, 1e-4, 0.05, 0.95), device, precision)
        for _ in range(warmup):  # the first steps allocate
            step(batch)
        evaluate.speed_sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(batch)
        evaluate.speed_sync(device)
        return (time.perf_counter() - t0) / steps

    out = {}
    for name in plan:
        if name in ("MAE pretraining", "MAE reconstruction"):
            mae = models.VideoMAE(cfg.model).to(device)
            out[name] = cfg.pretrain.accum_steps * per_step(mae, lambda m, v: m(v)[0],
                                                            evaluate.speed_video(cfg.pretrain.batch_size, enc, device))
        elif name == "classification":
            clf = models.Classifier(enc, n_classes).to(device)
            y = torch.arange(cfg.finetune.batch_size, device=device) % n_classes
            out[name] = cfg.finetune.accum_steps * per_step(clf, lambda m, v: F.cross_entropy(m(v).float(), y),
                                                            evaluate.speed_video(cfg.finetune.batch_size, enc, device))
        elif name == "MANN meta-training":
            backbone = models.build_backbone(mc.backbone, enc, pixels_size=mc.pixels_size,
                                             channels=mc.pixels_channels or None, pool=mc.pool).to(device)
            model = models.MetaLearner(backbone, models.MANN(cfg.mann, backbone.out_dim, mc.n_way),
                                       input_norm=mc.input_norm, input_dropout=mc.input_dropout).to(device)
            # a mix of K (meta.k_shot_max) is timed at its mean K: a step's cost grows with the episode's length
            k = (mc.k_shot + mc.k_shot_max + 1) // 2 if mc.k_shot_max > mc.k_shot else mc.k_shot
            per_class = max(20, k + mc.n_query, mc.seq_shots)
            labels = [c for c in range(2 * mc.n_way) for _ in range(per_class)]
            sampler = data.EpisodeSampler(labels, np.arange(len(labels)), list(range(2 * mc.n_way)), mc.n_way,
                                          k, mc.n_query, mc.layout, mc.seq_shots)
            ep = sampler.sample(mc.batch_size, torch.Generator().manual_seed(0)).to(device)
            cached = mann_inputs(cfg) == "embeddings"
            if cached:  # the table of embeddings the episodes index
                table = torch.randn(len(labels), backbone.out_dim, device=device)
                backbone.requires_grad_(False)
                loss = lambda m, _: models.episode_loss(m, table[ep.clips], ep)[0]  # noqa: E731
            else:  # every step's clips through the backbone (trained end to end, or on augmented clips)
                clips = evaluate.speed_video(ep.clips.numel(), enc, device)
                backbone.requires_grad_(not mc.freeze_backbone)
                loss = lambda m, v: models.episode_loss(m, m.backbone(v).view(*ep.clips.shape, -1), ep)[0]  # noqa
            out[name] = mc.accum_steps * per_step(model, loss, None if cached else clips, steps=5 if cached else 2)
            with torch.no_grad():  # a frozen backbone's one pass over every clip, per clip
                video = evaluate.speed_video(64, enc, device)
                t0 = time.perf_counter()
                backbone(video)
                evaluate.speed_sync(device)
                out["embedding"] = (time.perf_counter() - t0) / 64
            with torch.no_grad():  # the evaluation: the MANN and the baselines on 20 episodes of each setting
                t0 = time.perf_counter()
                layouts = [(k, "support_query") for k in (1, 5)] + ([(1, "sequence")] if mc.layout == "sequence" else [])
                for k, layout in layouts:  # eval.py fewshot's settings: 1- and 5-shot (and the training layout)
                    ev = data.EpisodeSampler(labels, np.arange(len(labels)), list(range(2 * mc.n_way)), mc.n_way, k,
                                             mc.n_query, layout, mc.seq_shots).sample(20, torch.Generator()
                                                                                       .manual_seed(k)).to(device)
                    x = torch.randn(*ev.clips.shape, backbone.out_dim, device=device)
                    model(x, ev.label_in)
                    evaluate.logreg_predict(evaluate.baseline_input(x), ev, mc.n_way)
                evaluate.speed_sync(device)
                out["evaluation"] = (time.perf_counter() - t0) / 20
                out["evaluation embedding"] = out["embedding"]  # the held-out clips, once more
    torch.random.set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    return out


# the work whose steps read clips through the loader (the MANN's too when mann_inputs is "loader")
CLIP_LOADING = frozenset({"MAE pretraining", "MAE reconstruction", "classification", "embedding"})


class RunETA:
    """What is left of the whole run: the running phase's own ETA (its measured steps), plus
    every later phase's estimate, x (measured / calibrated step time of the running phase) for
    the later phases that load clips as the running one does (the loader's share of a step is
    what the calibration leaves out), as calibrated for the others."""

    def __init__(self, plan: list[str], work: dict[str, int], unit_seconds: dict[str, float],
                 loading: set[str] | None = None):
        self.plan, self.current = plan, None
        self.estimate = {k: work[k] * unit_seconds.get(k, 0.0) for k in work}
        self.unit = unit_seconds
        self.loading = CLIP_LOADING if loading is None else loading

    def total(self) -> float:
        return sum(self.estimate.values())

    def remaining(self, phase_left: float, step_seconds: float) -> float:
        k = self.plan.index(self.current)
        calibrated = self.unit.get(self.current, 0.0)
        scale = min(max(step_seconds / calibrated, 0.5), 4.0) if calibrated > 0 else 1.0
        later = [p for p in self.plan[k + 1:] if p != "evaluation"] + \
            (["embedding"] if "MANN meta-training" in self.plan[k + 1:] else [])
        alike = (self.current in self.loading)
        training = sum(self.estimate.get(p, 0.0) * (scale if (p in self.loading) == alike else 1.0) for p in later)
        evaluation = self.estimate.get("evaluation", 0.0) + self.estimate.get("evaluation embedding", 0.0)
        return phase_left + training + (evaluation if "evaluation" in self.plan[k + 1:] else 0.0)


RUN_ETA: RunETA | None = None  # set by run() for runs of more than one phase; read by Meter


def phases(args, cfg, has_source: bool) -> list[str]:
    """The phases this run goes through, in order: what "phase k/n" counts."""
    if args.stage == 1:
        return ["MAE reconstruction"]
    if args.stage == 2:
        return ([] if has_source else ["MAE pretraining"]) + ["classification"]
    mae = cfg.meta.backbone == "mae"  # a --pretrained encoder skips the MAE, not the classification phase
    return (["MAE pretraining"] if mae and not has_source else []) + \
        (["classification"] if mae and cfg.meta.classify else []) + ["MANN meta-training", "evaluation"]


def run(args, cfg, out, cache, device, precision, dist, source_state) -> dict:
    """The stages, in order; each phase resumes or skips itself from its folder's last.pt.
    Every progress line starts with "phase k/n <name> |"."""
    stmeta.seed_everything(cfg.seed)
    t_run = time.time()
    plan = phases(args, cfg, source_state is not None)
    global RUN_ETA
    RUN_ETA = None
    if len(plan) > 1:  # one phase's own ETA is the run's
        t0 = time.time()
        n_classes = len(classifier_clips(cache, cfg, classifier_classes(args))[0])
        loading = CLIP_LOADING | ({"MANN meta-training"} if mann_inputs(cfg) == "loader" else set())
        RUN_ETA = RunETA(plan, phase_work(plan, args, cfg, cache, dist.world_size),
                         calibrate(plan, cfg, device, precision, max(n_classes, 2)), loading)
        estimate = (f"; their steps alone about {stmeta.format_duration(RUN_ETA.total())} (each timed here in "
                    f"{time.time() - t0:.0f} s; `run eta` on the progress lines adds loading and validation)")
    if dist.is_main:
        print(f"plan: {len(plan)} phase(s): " + ", ".join(plan) + (estimate if RUN_ETA else ""))

    def begin(name: str, what: str) -> None:
        k = plan.index(name) + 1
        stmeta.RunLog.prefix = f"phase {k}/{len(plan)} {name} | " if len(plan) > 1 else ""
        if RUN_ETA is not None:
            RUN_ETA.current = name
        if dist.is_main:
            print(f"== phase {k}/{len(plan)}: {what}")

    result: dict = {"run": out}
    if args.stage == 1:
        begin("MAE reconstruction", f"MAE reconstruction in {out}")
        ck = train_mae(cfg, cache, out, device, precision, dist, args, init_state=source_state)
        m = ck["metrics"]
        if dist.is_main:
            print(f"stage 1 done: val reconstruction loss {m.get('start_val_loss', float('nan')):.4f} (start) -> "
                  f"{m.get('val_loss', float('nan')):.4f}; checkpoints in {out}; next: "
                  f"python eval.py recon --run {out}")
        result.update(m)
    elif args.stage == 2:
        if source_state is not None:
            enc_state = encoder_of(source_state)
        else:
            begin("MAE pretraining", f"MAE pretraining (mask ratio {cfg.model.mask_ratio}) in {out}/pretrain")
            enc_state = encoder_of(train_mae(cfg, cache, os.path.join(out, "pretrain"), device, precision, dist,
                                             args, train_classes=None if args.classes == "all" else "meta_train")
                                   ["model"])
        begin("classification", f"fine-tuning encoder + head ({args.recipe}) in {out}")
        ck = train_classifier(cfg, cache, out, device, precision, dist, args, enc_state, args.classes)
        m = ck["metrics"]
        if dist.is_main:
            print(f"stage 2 done: val top-1 {m.get('val_acc', float('nan')):.3f}, top-5 "
                  f"{m.get('val_top5', float('nan')):.3f} (best top-1 {m.get('best_val_acc', float('nan')):.3f}); "
                  f"next: python eval.py classify --run {out}")
        result.update(m)
    else:
        enc_state = None
        if cfg.meta.backbone == "mae":
            if source_state is not None:
                enc_state = encoder_of(source_state)
            else:
                begin("MAE pretraining", f"no --pretrained given, so MAE pretraining on the meta-train classes "
                                         f"first (mask ratio {cfg.model.mask_ratio}) in {out}/pretrain")
                enc_state = encoder_of(train_mae(cfg, cache, os.path.join(out, "pretrain"), device, precision,
                                                 dist, args)["model"])
            if cfg.meta.classify:  # on our MAE or on the --pretrained one alike
                begin("classification", f"fine-tuning the {'--pretrained' if source_state is not None else 'MAE'} "
                                        f"encoder with a classification head on the meta-train classes (stage 2's "
                                        f"recipe; --meta.classify=false skips it) in {out}/classify")
                enc_state = encoder_of(train_classifier(cfg, cache, os.path.join(out, "classify"), device,
                                                        precision, dist, args, enc_state, "meta_train")["model"])
        episode = (f"{cfg.meta.n_way}-way {evaluate.shot_range(cfg.meta)} episodes" if cfg.meta.layout == "support_query"
                   else f"{cfg.meta.n_way}-way sequences of {cfg.meta.seq_shots} instances a class")
        begin("MANN meta-training", f"meta-training the {'LSTM' if cfg.mann.read_heads == 0 else 'MANN'} on "
                                    f"{episode} in {out}")
        ck = train_mann(cfg, cache, out, device, precision, dist, args, enc_state)
        result.update(ck["metrics"])
        if dist.is_main:
            begin("evaluation", f"scoring the final checkpoint on fixed held-out episodes (eval.py fewshot)")
            res = evaluate.fewshot(out, device=str(device), cache=cache)
            result["fewshot"] = res
            if cfg.meta.layout == "sequence":
                seq, blind = res["mann"]["sequence"], res["label_count"]["sequence"]
                print(f"stage 3 done: {cfg.meta.n_way}-way, held-out classes, accuracy at the 1st / 2nd / "
                      f"{stmeta.ordinal(cfg.meta.seq_shots)} presentation: " + " / ".join(
                          f"{100 * seq['per_instance'][i]:.1f}%" for i in (0, 1, cfg.meta.seq_shots - 1))
                      + " (label counting: " + " / ".join(
                          f"{100 * blind['per_instance'][i]:.1f}%" for i in (0, 1, cfg.meta.seq_shots - 1))
                      + f"; {seq['episodes']} episodes)")
            else:
                one = res["mann"].get(1) or next(iter(res["mann"].values()))
                print(f"stage 3 done: {cfg.meta.n_way}-way 1-shot accuracy on held-out classes: "
                      f"{100 * one['mean']:.1f}% +- {100 * one['ci95']:.1f}% (95% CI, {one['episodes']} episodes; "
                      f"chance {100 / cfg.meta.n_way:.0f}%)")
    stmeta.RunLog.prefix = ""
    RUN_ETA = None
    if dist.is_main:
        print(f"run took {stmeta.format_duration(time.time() - t_run)}")
    stmeta.cleanup_distributed(dist)
    return result


if __name__ == "__main__":
    stmeta.cli(main)
