"""A benchmark stmeta did not build, made as a user would bring one: Omniglot characters moving in
class-specific ways, written as mp4 files in OUT/<class>/<clip>.mp4 (python docs/make_moving_characters.py
OMNIGLOT_IMAGES_BACKGROUND OUT; about 1 min here). 30 characters x 4 motions = 120
classes, 12 clips a class, 32 frames of 64 px. Independent of data.py's glyph benchmark: other
motions, other rendering (PIL affine on the 105 px drawing), black ink on a noisy white page."""
import math
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

SRC, OUT = Path(sys.argv[1]), Path(sys.argv[2])
N_CHARS, CLIPS, T, S = 30, 12, 32, 64
MOTIONS = ("fall", "circle", "zoom", "shake")

chars = sorted(p for p in SRC.glob("*/*") if p.is_dir())
rng0 = np.random.default_rng(12345)
pick = [chars[i] for i in sorted(rng0.choice(len(chars), N_CHARS, replace=False))]


def glyph(path):
    im = Image.open(path).convert("L")
    a = 255 - np.asarray(im)  # ink = 255
    ys, xs = np.nonzero(a > 128)
    a = a[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = a.shape
    side = max(h, w) + 8
    pad = np.zeros((side, side), np.uint8)
    pad[(side - h) // 2: (side - h) // 2 + h, (side - w) // 2: (side - w) // 2 + w] = a
    return Image.fromarray(pad)


def path(kind, rng):
    t = np.arange(T, dtype=np.float64)
    scale = np.ones(T)
    ang = np.full(T, rng.uniform(-15, 15))
    if kind == "fall":
        x = np.full(T, rng.uniform(0.35, 0.65))
        g, y, v, ys = rng.uniform(0.004, 0.007), rng.uniform(0.2, 0.3), 0.0, []
        for _ in t:
            v += g; y += v
            if y > 0.72:
                y, v = 0.72, -v * 0.8
            ys.append(y)
        xy = np.stack([x, np.array(ys)], 1)
    elif kind == "circle":
        w = rng.choice((-1, 1)) * 2 * math.pi / rng.uniform(12, 20)
        a0, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.22)
        xy = 0.5 + r * np.stack([np.cos(a0 + w * t), np.sin(a0 + w * t)], 1)
    elif kind == "zoom":
        c = rng.uniform(0.4, 0.6, 2)
        xy = np.repeat(c[None], T, 0)
        s0, s1 = (0.55, 1.35) if rng.random() < 0.5 else (1.35, 0.55)
        scale = np.linspace(s0, s1, T)
    elif kind == "shake":
        c = rng.uniform(0.4, 0.6, 2)
        xy = c + rng.normal(0, 0.035, (T, 2))
        ang = ang + rng.normal(0, 8, T)
    return xy, ang, scale


def clip(char_dir, kind, rng):
    drawings = sorted(char_dir.glob("*.png"))
    g = glyph(drawings[rng.integers(len(drawings))])
    base = rng.uniform(0.36, 0.46) * S
    xy, ang, scale = path(kind, rng)
    page = rng.uniform(215, 250)
    frames = []
    for i in range(T):
        side = max(4, int(round(base * scale[i])))
        a = g.rotate(float(ang[i]), resample=Image.BILINEAR).resize((side, side), Image.BILINEAR)
        canvas = Image.new("L", (S, S), 0)
        canvas.paste(a, (int(round(xy[i, 0] * S - side / 2)), int(round(xy[i, 1] * S - side / 2))))
        alpha = np.asarray(canvas, np.float64) / 255
        img = page + rng.normal(0, 6, (S, S))
        img = img * (1 - alpha) + 20 * alpha
        frames.append(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, 2))
    return np.stack(frames)


for ci, cd in enumerate(pick):
    for kind in MOTIONS:
        name = f"{cd.parent.name}-{cd.name}_{kind}"
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(CLIPS):
            rng = np.random.default_rng([ci, MOTIONS.index(kind), k, 99])
            imageio.mimwrite(d / f"clip{k:02d}.mp4", clip(cd, kind, rng), fps=10, macro_block_size=16)
print("done", len(pick) * len(MOTIONS), "classes")
