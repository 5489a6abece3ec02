"""data.py: everything between video and image files on disk and tensors.

1. Decoding (`decode_video`): one ffmpeg pass per file (imageio-ffmpeg's binary) that resamples
   to 10 FPS and scales + centre-crops to 64x64 with ffmpeg's own filters, as paper section 4.1
   prepares its clips (100 frames at 10 FPS, 64x64). Longer clips keep a window (the centre, or
   the annotated time_start..time_end); shorter ones are padded with their last frame.
   Still images (`decode_image`: png, jpg, bmp, tif, webp, ppm/pgm) go through Pillow instead,
   with the same short-side resize and centre crop, as clips of one frame (Omniglot, the MANN
   paper's benchmark, is 20 drawings of each of 964 characters).
2. Sources: one small reader per annotation format (folder per class, Kinetics CSV, `path label`
   lists, TinyVIRAT-v2 JSON, few-shot split lists), combined into one composite dataset with
   class names merged across sources, as the paper combines Kinetics-400, Mini-Kinetics-200 and
   TinyVIRAT (518 classes, 414 meta-train / 104 meta-test).
3. The clip cache (`prepare`, `ClipCache`): <dir>/clips.npy, a memory-mapped uint8 array
   (N, F, H, W, 3), plus <dir>/meta.json (classes, labels, sources, splits, failures, whether
   every frame is grey). Parallel, resumable, and a bad file is a line in the failure report,
   never a crash.
4. The synthetic action benchmark (`build_synthetic`): procedurally generated clips whose class
   is *how things move*; the default data when no real videos are given.
5. Loading (`ClipDataset`, `mixup_cutmix`): T frames at sampling rate r, random resized crop,
   flip, RandAugment (`rand-m7-mstd0.5-inc1`, paper Table 1), random erasing (Table 2), mixup /
   cutmix with label smoothing; each augmentation is the same for every frame of a clip.
6. Episodes (`EpisodeSampler`): N-way K-shot episodes for the MANN (Santoro et al. 2016,
   arXiv 1605.06065), support/query or Santoro's label-offset sequence.

Shapes: N clips in a cache, F cached frames, H/W pixels, C channels, T sampled frames,
V views, B batch, S episode steps.

Run:
    python data.py synth --out data_cache/synth          # the built-in benchmark
    python data.py prepare --source folder:path/to/videos --out data_cache/mine
    python data.py prepare --source folder:omniglot/images_background --size 20 --out data_cache/omniglot
    python data.py prepare --source kinetics:k400/videos:k400/val.csv \\
                           --source tinyvirat:TinyVIRAT-v2:TinyVIRAT-v2/tiny_train_v2.json \\
                           --out data_cache/composite
    python data.py info data_cache/mine
    python data.py bench data_cache/synth                # loader clips/s with training augmentation
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import stmeta
from stmeta import MEAN, STD

FORMAT_VERSION = 1  # of clips.npy + meta.json; bump when the layout changes
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".3gp", ".ogv", ".ts")
# Still images, decoded with Pillow as one-frame clips. GIFs stay videos (ffmpeg reads their
# frames, and a one-frame GIF decodes to one frame there too).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
SOURCE_KINDS = {
    "folder": "folder:ROOT                 ROOT/<class>/<video>, ROOT/<class>[/<sub>...]/<image>",
    "kinetics": "kinetics:VIDEOS:CSV         Kinetics / Mini-Kinetics-200 CSV (label,youtube_id,time_start,...)",
    "list": "list:ROOT:LIST              `path label [label ...]` lines (mae_st, VideoMAE, mmaction2)",
    "tinyvirat": "tinyvirat:ROOT:JSON         TinyVIRAT-v2 JSON; videos under ROOT/videos/<split>/",
    "splitlist": "splitlist:VIDEOS:LIST       few-shot split list, `class name/video id` lines (CMN Kinetics-100)",
}


CACHE_FILES = ("meta.json", "clips.npy")  # a prepared clip cache: its index and its frames


class DataError(stmeta.InputError):
    """A mistake in the user's input (path, source, setting): printed as one line by the CLI."""


class DecodeError(DataError):
    """ffmpeg (a video) or Pillow (an image) could not give frames for one file; the message names
    the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# -----------------------------------------------------------------------------
# Decoding: one ffmpeg process per file, resampling and resizing inside ffmpeg

_PROBE_BYTES = 16 * 2**20  # files bigger than this are probed for their duration first (see below)


def ffmpeg_filter(size: int, fps: float) -> str:
    """The filter chain ffmpeg runs while decoding: drop/duplicate frames to `fps` first (so the
    scaler sees only the frames we keep), scale the short side to `size` in *display* pixels
    (`dar` honours a non-square sample aspect ratio, e.g. mmaction2's demo.mp4 is 340x256 stored,
    427x256 shown), then centre-crop a size x size square. flags=area averages the source pixels
    under each output pixel: a proper anti-aliased downscale."""
    w = f"max({size},ceil({size}*dar))"
    h = f"max({size},ceil({size}/dar))"
    return f"fps={fps},scale=w='{w}':h='{h}':flags=area,setsar=1,crop={size}:{size}"


_FFMPEG_BOILERPLATE = ("Task finished with error code", "Terminating thread", "Nothing was written",
                       "Error opening input file", "Error opening input files", "Could not open encoder",
                       "Cannot determine format", "Conversion failed")


def _ffmpeg_reason(stderr: bytes) -> str:
    """ffmpeg's own words for a failure: its first distinct messages, without the
    '[h264 @ 0x55d1...]' prefixes and the generic lines every failure ends with."""
    lines = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = re.sub(r"^(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+", "", line.strip())
        if line and line not in lines:
            lines.append(line)
    useful = [x for x in lines if not x.startswith(_FFMPEG_BOILERPLATE)] or lines
    text = "; ".join(useful[:3])
    if "partial file" in text:
        text = "truncated file: " + text
    elif "moov atom not found" in text:  # an MP4's index, written last: cut off, or not an MP4
        text = "truncated or not an MP4: " + text
    return text[:300] if text else "ffmpeg failed without a message"


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary that ships with imageio-ffmpeg (no system ffmpeg needed)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_duration(path) -> float | None:
    """Container duration in seconds from ffmpeg's header printout (None if it has none)."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=60).stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)", out)
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def _check_file(path: Path, what: str) -> int:
    """The checks every decoder makes first (with one stat: that counts when an image decodes in
    half a millisecond); returns the file's size in bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError(path, "file not found") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError(path, f"is a directory, not {what}")
    if st.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError(path, "not readable (permission denied)")
    return st.st_size


def _decode(path, size=64, fps=10, frames=100, start=None, end=None, timeout=600.0):
    """decode_video, plus a warning string when ffmpeg complained but still gave frames
    (a truncated file, say): those clips are kept, their true length tells how much survived."""
    path = Path(path)
    nbytes = _check_file(path, "a video file (raw-frame folders are not supported)")

    # Which seconds to decode. An annotated window is seeked to directly. Without one we want
    # the centre `frames`: for ordinary clips it is cheapest to decode everything (small at
    # 64x64) and cut the centre out; a big file is probably a long video, so we ask for its
    # duration first and seek to its centre rather than decode minutes we would throw away.
    seek, duration = None, None
    if end is not None and (probe_duration(path) or math.inf) < float(end) - 0.5:
        # the file ends before the window does, so it cannot be the long video the window was
        # cut from: it is the cut clip itself (Kinetics mirrors often name those {youtube_id}.mp4)
        start = end = None
    if start is not None or end is not None:
        seek = max(float(start or 0.0), 0.0)
        duration = None if end is None else float(end) - seek
        if duration is not None and duration <= 0:
            raise DecodeError(path, f"empty time window [{start}, {end}]")
    elif nbytes > _PROBE_BYTES:
        total = probe_duration(path)
        want = frames / fps
        if total and total > 2 * want:
            seek, duration = (total - want) / 2, want + 2 / fps

    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1"]
    if seek:
        cmd += ["-ss", f"{seek:.3f}"]  # before -i: fast input seek, still frame-accurate
    cmd += ["-i", str(path)]
    if duration is not None:
        cmd += ["-t", f"{duration:.3f}"]
    cmd += ["-map", "0:v:0", "-an", "-sn", "-dn", "-vf", ffmpeg_filter(size, fps), "-filter_threads", "1",
            "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DecodeError(path, f"ffmpeg took longer than {timeout:.0f} s") from None

    frame_bytes = size * size * 3
    n = len(proc.stdout) // frame_bytes
    if n == 0:
        reason = _ffmpeg_reason(proc.stderr) if proc.stderr.strip() else "no video frames decoded"
        if "matches no streams" in reason:
            reason = "no video stream in this file"
        elif seek and not proc.stderr.strip():
            reason += f" (is the window starting at {seek:.1f} s past the end of the video?)"
        raise DecodeError(path, reason)
    video = np.frombuffer(proc.stdout[: n * frame_bytes], np.uint8).reshape(n, size, size, 3)  # (n, H, W, 3)
    warning = _ffmpeg_reason(proc.stderr) if (proc.returncode != 0 or proc.stderr.strip()) else None
    video, length = centre_window(video, frames)
    return video, length, warning


def centre_window(video: np.ndarray, frames: int) -> tuple[np.ndarray, int]:
    """(n, H, W, 3) -> (frames, H, W, 3): the centre `frames` of a longer clip, or a shorter clip
    padded by repeating its last frame. Returns the true number of frames (before padding)."""
    n = len(video)
    if n >= frames:
        s = (n - frames) // 2
        return video[s: s + frames].copy(), frames  # a copy: `video` may be ffmpeg's read-only buffer
    pad = np.repeat(video[-1:], frames - n, axis=0)
    return np.concatenate([video, pad]), n


def decode_video(path, size=64, fps=10, frames=100, start=None, end=None) -> tuple[np.ndarray, int]:
    """Decode one video (anything ffmpeg reads: mp4, avi, mkv, webm, GIF, ...) in one ffmpeg pass.

    Returns (frames uint8 (F, size, size, 3), true length before padding). With `start`/`end`
    (seconds) only that window is decoded; otherwise the centre `frames` frames are kept.
    Raises DecodeError naming the file and ffmpeg's reason when nothing can be decoded.
    """
    video, length, _ = _decode(path, size, fps, frames, start, end)
    return video, length


def _to_8bit(im):
    """A Pillow image of any mode -> mode 'L' (grey: one channel, a third of the resizing work) or
    'RGB'. Transparency is composited over white (a transparent background is paper, not black).
    16-bit grey ('I;16*') is scaled by its range, 0..65535 -> 0..255 (convert('L') would clip
    everything above 255 to white); 32-bit 'I' the same when its values fit in 16 bits (16-bit
    files often open as 'I'), else by its own min..max, as is float 'F' outside 0..1."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)  # (H, W)
        lo, hi = float(a.min()), float(a.max())
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            lo, hi = 0.0, 65535.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        grey = np.round((a - lo) * (255 / max(hi - lo, 1e-12))).astype(np.uint8)
        if isinstance(im.info.get("transparency"), int):  # a PNG colour key on 16-bit grey
            grey[np.asarray(im) == im.info["transparency"]] = 255
        return Image.fromarray(grey)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # applies a palette's or a colour key's transparency too
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")  # 0 / 255
    try:
        return im.convert("RGB")  # P, CMYK, YCbCr, HSV, ...
    except ValueError:
        raise DecodeError(im.filename, f"unsupported image mode {mode!r}") from None


def _square_box(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """The part of a w x h image that ffmpeg_filter's geometry keeps: the short side scaled to
    `size`, the long side to max(size, ceil(size * aspect)), then the centre size x size square.
    Returned in source pixels (left, top, right, bottom) so that one resize does both steps."""
    nw, nh = max(size, math.ceil(size * w / h)), max(size, math.ceil(size * h / w))
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh
    return x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy


def _decode_image(path, size=64, frames=1):
    """decode_image -> (uint8 (frames, size, size, 3), true length 1, warning (always None: Pillow
    decodes an image or fails), grey), grey known from the mode or checked on the output."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _check_file(path, "an image file")
    try:
        with Image.open(path) as im:
            im.draft(None, (2 * size, 2 * size))  # JPEG: decode at 1/2..1/8 scale, still >= 2x the output
            ImageOps.exif_transpose(im, in_place=True)  # loads the pixels; phone photos stand upright
            im = _to_8bit(im)  # 'L' or 'RGB'
            w, h = im.size
            # downscaling: area averaging (BOX), as ffmpeg's flags=area does for videos; enlarging
            # a small image: bilinear (BOX would enlarge in blocks)
            resample = Image.Resampling.BOX if min(w, h) >= size else Image.Resampling.BILINEAR
            small = np.asarray(im.resize((size, size), resample, box=_square_box(w, h, size)))
    except UnidentifiedImageError:
        raise DecodeError(path, "not an image (Pillow cannot identify the file's format)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(path, f"image too large: {e}") from None
    except PermissionError:
        raise DecodeError(path, "not readable (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on bad bytes
        kind = "truncated image" if "truncated" in str(e) or isinstance(e, EOFError) else "corrupt image"
        raise DecodeError(path, f"{kind}: {e or type(e).__name__}") from None
    grey = small.ndim == 2
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = small[:, :, None] if grey else small  # the one frame, repeated: (frames, size, size, 3)
    return video, 1, None, grey or is_grey(small)


def decode_image(path, size=64, frames=1) -> tuple[np.ndarray, int]:
    """Decode one still image (png, jpg, bmp, tif, webp, ppm/pgm; the first frame of a multi-frame
    file) with Pillow into a clip of one frame.

    EXIF orientation applied; any mode made 8-bit RGB (see `_to_8bit`); the short side resized
    to `size` with an anti-aliased filter and the centre square kept, the geometry of
    `ffmpeg_filter`. Returns (uint8 (frames, size, size, 3), 1): the frame repeated to `frames`,
    true length 1. Raises DecodeError naming the file and the reason when it is not a readable image.
    """
    video, length, _, _ = _decode_image(path, size, frames)
    return video, length


def is_grey(video: np.ndarray) -> bool:
    """(..., 3) uint8 -> whether R == G == B everywhere (a grey image or clip stored as RGB)."""
    return bool((video[..., 0] == video[..., 1]).all() and (video[..., 1] == video[..., 2]).all())


def _decode_batch(batch: list[dict], size: int, fps: float, frames: int) -> list:
    """_decode_clip over a few clips in one worker task; a clip that fails gives its exception in
    its place (an interrupt still stops the batch)."""
    out = []
    for entry in batch:
        try:
            out.append(_decode_clip(entry, size, fps, frames))
        except Exception as e:  # noqa: BLE001 - one odd file must not end a long build
            out.append(e)
    return out


def _decode_clip(entry: dict, size: int, fps: float, frames: int):
    """One clip of prepare's work list -> (uint8 (frames, size, size, 3), true length, warning or
    None, grey): an image through Pillow, anything else through ffmpeg."""
    if _is_image(entry["path"]):
        return _decode_image(entry["path"], size, frames)
    video, length, warning = _decode(entry["path"], size, fps, frames, entry["start"], entry["end"])
    return video, length, warning, is_grey(video[:length])


# -----------------------------------------------------------------------------
# Sources: one small reader per annotation format -> (list[ClipRecord], list[failure dict])


@dataclass
class ClipRecord:
    """One clip to decode: where it is, its (normalised) class names, and what its source says."""

    path: str
    labels: list[str]  # all of them (multi-label sources); [] = unlabelled
    source: str  # e.g. "kinetics:val_k200.csv"
    start: float | None = None  # seconds; None = the centre of the file
    end: float | None = None
    split_hint: str | None = None  # the source's own clip split: "train" | "val" | "test"
    class_split_hint: str | None = None  # "meta_train" | "meta_test" when a few-shot split list says so


def normalise_class(name: str) -> str:
    """One spelling per class across sources: 'Playing_Guitar ' -> 'playing guitar'."""
    name = str(name).strip().strip("\"'").replace("_", " ").lower()
    return " ".join(name.split())


def normalise_class_path(path) -> str:
    """The class of an image in a folder source, from its folder relative to the root: each part
    normalised, joined with '/': 'Alphabet_of_the_Magi/character01' -> 'alphabet of the magi/character01'.
    Empty and '.' parts are dropped, so `find .` and `ls -d */` spellings name the same class."""
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(filter(None, (normalise_class(part) for part in parts if part != ".")))


def _failure(file, reason: str, source: str = "") -> dict:
    return {"file": str(file), "reason": reason, "source": source}


def _existing(path, what: str, want_dir: bool | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path}: no such file or directory")
    if want_dir is True and not path.is_dir():
        raise DataError(f"{what} {path}: is a file, expected a directory")
    if want_dir is False and path.is_dir():
        raise DataError(f"{what} {path}: is a directory, expected a file")
    return path


def _extension(path) -> str:
    """'.mp4' for 'a/b.MP4'; '' for hidden files ('._b.mp4', what macOS leaves next to copies)."""
    name = os.path.basename(path)
    return "" if name.startswith(".") else os.path.splitext(name)[1].lower()


def _is_video(path) -> bool:
    return _extension(path) in VIDEO_EXTENSIONS


def _is_image(path) -> bool:
    return _extension(path) in IMAGE_EXTENSIONS


def _video_index(root: Path) -> dict[str, list[Path]]:
    """Every video file under root by its name without extension, so a reader can find a clip
    whether it sits flat in root or under a class folder."""
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_video(p):
                index.setdefault(p.stem, []).append(p)
    return index


def _pick(paths: list[Path], label: str | None) -> Path:
    """Of several files with the same stem, prefer the one inside the label's class folder."""
    for p in paths:
        if label is not None and normalise_class(p.parent.name) == label:
            return p
    return paths[0]


def _split_from_name(name: str) -> str | None:
    """'tiny_val_v2.json' -> 'val', 'kinetics_train.csv' -> 'train'."""
    words = re.split(r"[^a-z]+", name.lower())
    for hint, keys in (("train", ("train", "training")), ("val", ("val", "validate", "validation")),
                       ("test", ("test", "testing"))):
        if any(w in keys for w in words):
            return hint
    return None


def read_folder(path) -> tuple[list[ClipRecord], list[dict]]:
    """`path/<class>/<video>` and `path/<class>[/<sub>...]/<image>`. A video's class is its
    first-level folder (the video may sit deeper inside it). An image's class is the folder it
    sits in, relative to path, each part normalised and joined with '/' (`normalise_class_path`):
    Omniglot's `<alphabet>/characterNN/*.png` gives 'alphabet of the magi/character01', and any
    `<class>/<image>` dataset gives plain class names. A folder may mix images and videos."""
    root = _existing(path, "folder source", want_dir=True)
    src = f"folder:{root.name}"
    records, failures = [], []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p.name != "__MACOSX")  # what unzipping a macOS zip leaves: resource forks only
    if not class_dirs:
        raise DataError(f"folder source {root}: no class folders in it (expected {root}/<class>/<video> "
                        f"or {root}/<class>/<image>)")
    for class_dir in class_dirs:
        video_label = normalise_class(class_dir.name)
        files = []  # (path parts below root, label); strings, not Paths: Omniglot has 19,280 files
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints, .thumbnails, ...
            rel = os.path.relpath(dirpath, root).split(os.sep)
            image_label = normalise_class_path("/".join(rel))
            files += [(rel + [f], image_label if _is_image(f) else video_label) for f in filenames
                      if _is_video(f) or _is_image(f)]
        if not files:
            failures.append(_failure(class_dir, "empty class: no video or image files in this class folder", src))
        records += [ClipRecord(os.path.join(root, *parts), [label], src) for parts, label in sorted(files)]
    for p in sorted(root.iterdir()):
        if (_is_video(p) or _is_image(p)) and p.is_file():
            failures.append(_failure(p, "not inside a class folder (expected ROOT/<class>/<video> or "
                                        "ROOT/<class>/<image>)", src))
    return records, failures


def read_kinetics_csv(csv_file, video_root) -> tuple[list[ClipRecord], list[dict]]:
    """Kinetics-style CSV `label,youtube_id,time_start,time_end,split[,is_cc]` (Kinetics-400/600/700,
    Mini-Kinetics-200). A trimmed clip `{youtube_id}_{start:06d}_{end:06d}.<ext>` is used whole;
    a `{youtube_id}.<ext>` file is cut to [time_start, time_end] if it is the full video, used
    whole if it is shorter than time_end (then it is the trimmed clip; see _decode). Either may
    sit flat in video_root or under class folders. A row without a video is a failure, not an error."""
    csv_file = _existing(csv_file, "Kinetics CSV", want_dir=False)
    root = _existing(video_root, "Kinetics video folder", want_dir=True)
    src = f"kinetics:{csv_file.name}"
    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    if not {"youtube_id", "time_start", "time_end"} <= set(header):
        raise DataError(f"{csv_file}: not a Kinetics CSV (need columns youtube_id,time_start,time_end; "
                        f"found {','.join(header) or 'an empty file'})")
    index = _video_index(root)
    records, failures = [], []
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{csv_file}:{line_no}"
        try:
            t0, t1 = float(row["time_start"]), float(row["time_end"])
        except (TypeError, ValueError):
            failures.append(_failure(where, f"bad time_start/time_end {row.get('time_start')!r}, "
                                            f"{row.get('time_end')!r}", src))
            continue
        ytid = (row["youtube_id"] or "").strip()
        label = normalise_class(row["label"]) if (row.get("label") or "").strip() else None
        split = _split_from_name(row.get("split") or "")
        trimmed = f"{ytid}_{int(t0):06d}_{int(t1):06d}"
        if trimmed in index:  # already cut to the annotated 10 s: use the whole file
            path, start, end = _pick(index[trimmed], label), None, None
        elif ytid in index:  # the full YouTube video: cut the annotated window out of it
            path, start, end = _pick(index[ytid], label), t0, t1
        else:
            failures.append(_failure(where, f"video not found: no {trimmed}.* or {ytid}.* under {root}", src))
            continue
        records.append(ClipRecord(str(path), [label] if label else [], src, start, end, split))
    return records, failures


def _split_path_labels(tokens: list[str], root: Path) -> tuple[str, list[str]]:
    """A `path label [label ...]` line split into tokens: paths may contain spaces (Kinetics class
    folders do), so the path is the longest prefix of tokens that names an existing file."""
    for k in range(len(tokens) - 1, 0, -1):
        candidate = " ".join(tokens[:k])
        if (root / candidate).exists():
            return candidate, tokens[k:]
    return tokens[0], tokens[1:]


def read_list(list_file, root, class_list: list[str] | None = None) -> tuple[list[ClipRecord], list[dict]]:
    """`path label [label ...]` lines, the video list format of mae_st, VideoMAE and mmaction2
    (several labels = a multi-label clip). Paths are relative to root. Integer labels index into
    `class_list` when one is given (e.g. label_map_k400.txt); otherwise a label is a class name."""
    list_file = _existing(list_file, "list file", want_dir=False)
    root = _existing(root, "list root", want_dir=True)
    src = f"list:{list_file.name}"
    records, failures = [], []
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{line_no}"
        tokens = [t.strip() for t in line.split("\t")] if "\t" in line else line.split()
        if len(tokens) >= 2 and "," in tokens[-1]:
            tokens = tokens[:-1] + [t for t in tokens[-1].split(",") if t]  # the `path 1,3,5` spelling
        rel, label_tokens = _split_path_labels(tokens, root)
        labels, bad = [], None
        for tok in label_tokens:
            if tok.lstrip("-").isdigit() and class_list is not None:
                i = int(tok)
                if not 0 <= i < len(class_list):
                    bad = f"label index {i} is outside the class list ({len(class_list)} classes)"
                    break
                labels.append(normalise_class(class_list[i]))
            else:
                labels.append(normalise_class(tok))
        if bad is None and not (root / rel).exists():
            bad = f"video not found: {root / rel}"
            if not Path(rel).suffix and len(label_tokens) >= 2 and label_tokens[0].isdigit():
                # mmaction2's raw-frame lists read `frame_dir total_frames label`: not a video path
                bad += " (this looks like a raw-frame list, `dir total_frames label`; raw frames are not supported)"
        if bad:
            failures.append(_failure(where, bad, src))
            continue
        records.append(ClipRecord(str(root / rel), list(dict.fromkeys(labels)), src))
    return records, failures


def read_tinyvirat(json_file, root) -> tuple[list[ClipRecord], list[dict]]:
    """TinyVIRAT-v2 annotations: a JSON list of {id, video_id, path, dim: [frames, H, W],
    label: [names]} (multi-label; the public test file has no labels: unlabelled clips).
    Videos are looked for under root/videos/<split>/<path>, then root/<split>/<path>, root/<path>,
    where <split> comes from the file name (tiny_train_v2.json -> train)."""
    json_file = _existing(json_file, "TinyVIRAT JSON", want_dir=False)
    root = _existing(root, "TinyVIRAT root", want_dir=True)
    src = f"tinyvirat:{json_file.name}"
    try:
        entries = json.loads(json_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(entries, dict):  # tolerate {"tubes": [...]}-style wrappers with one list inside
        lists = [v for v in entries.values() if isinstance(v, list)]
        entries = lists[0] if len(lists) == 1 else entries
    if not isinstance(entries, list):
        raise DataError(f"{json_file}: expected a JSON list of clip entries")
    split = _split_from_name(json_file.name)
    records, failures = [], []
    for i, entry in enumerate(entries):
        where = f"{json_file}[{i}]"
        if not isinstance(entry, dict) or not entry.get("path"):
            failures.append(_failure(where, "entry has no 'path'", src))
            continue
        rel = entry["path"]
        candidates = ([root / "videos" / split / rel, root / split / rel] if split else []) + [root / rel]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            failures.append(_failure(where, f"video not found: {rel} (looked in "
                                            f"{', '.join(str(c.parent) for c in candidates)})", src))
            continue
        raw = entry.get("label") or []
        labels = [normalise_class(x) for x in ([raw] if isinstance(raw, str) else raw)]
        records.append(ClipRecord(str(path), list(dict.fromkeys(labels)), src, split_hint=split))
    return records, failures


def _class_split_from_name(name: str) -> str | None:
    """Few-shot split files: test classes are meta-test; train (and val) classes meta-train."""
    split = _split_from_name(name)
    return {"test": "meta_test", "train": "meta_train", "val": "meta_train"}.get(split)


def read_split_list(list_file, root) -> tuple[list[ClipRecord], list[dict]]:
    """A few-shot split list (CMN's Kinetics-100: `class name/youtubeid_start_end` per line). The
    videos are found by name under root (flat or in class folders); the file's name sets the
    classes' meta split: *test* -> meta-test, *train* / *val* -> meta-train."""
    list_file = _existing(list_file, "split list", want_dir=False)
    root = _existing(root, "split-list video folder", want_dir=True)
    src = f"splitlist:{list_file.name}"
    class_split = _class_split_from_name(list_file.name)
    index = _video_index(root)
    records, failures = [], []
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{list_file}:{line_no}"
        if "/" not in line:
            failures.append(_failure(where, f"expected `class name/video id`, got {line!r}", src))
            continue
        cls, vid = line.rsplit("/", 1)
        label = normalise_class(cls)
        stem = Path(vid).stem if Path(vid).suffix.lower() in VIDEO_EXTENSIONS else vid
        if stem not in index:
            failures.append(_failure(where, f"video not found: no {stem}.* under {root}", src))
            continue
        records.append(ClipRecord(str(_pick(index[stem], label)), [label], src, class_split_hint=class_split))
    return records, failures


class SourceSpec(NamedTuple):
    kind: str
    path: str
    annotations: str | None


def parse_source(spec: str) -> SourceSpec:
    """'KIND:PATH[:ANNOTATIONS]' -> SourceSpec, checking the kind and that the paths exist."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in SOURCE_KINDS:
        kinds = "\n  ".join(SOURCE_KINDS.values())
        raise DataError(f"unknown source kind {kind!r} in --source {spec!r}; the kinds are:\n  {kinds}")
    path, _, ann = rest.partition(":")
    if not path:
        raise DataError(f"--source {spec!r}: missing PATH (write {SOURCE_KINDS[kind].split()[0]})")
    if kind != "folder" and not ann:
        raise DataError(f"--source {spec!r}: a {kind} source needs an annotation file: "
                        f"{SOURCE_KINDS[kind].split()[0]}")
    for p in (path, ann):
        if p and not Path(p).exists():
            raise DataError(f"--source {spec!r}: {p}: no such file or directory")
    return SourceSpec(kind, path, ann or None)


def read_source(spec: SourceSpec | str, class_list: list[str] | None = None):
    """Dispatch one source to its reader."""
    spec = parse_source(spec) if isinstance(spec, str) else spec
    if spec.kind == "folder":
        return read_folder(spec.path)
    if spec.kind == "kinetics":
        return read_kinetics_csv(spec.annotations, spec.path)
    if spec.kind == "list":
        return read_list(spec.annotations, spec.path, class_list)
    if spec.kind == "tinyvirat":
        return read_tinyvirat(spec.annotations, spec.path)
    return read_split_list(spec.annotations, spec.path)


def read_class_list(path) -> list[str]:
    """One class name a line (e.g. label_map_k400.txt); order matters for integer labels."""
    path = _existing(path, "class list", want_dir=False)
    names = [normalise_class(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not names:
        raise DataError(f"class list {path}: no class names in it")
    return names


def read_sources(specs: list, class_list: list[str] | None = None, class_list_name: str = "the class list"):
    """All sources into one composite list. Classes merge by normalised name; a file listed by
    several sources (Mini-Kinetics-200 is a subset of Kinetics-400) becomes one clip carrying the
    union of its labels and sources. With a class list, a row whose label is not in it fails."""
    records, failures = [], []
    for spec in specs:
        r, f = read_source(spec, class_list)
        records += r
        failures += f
    if class_list is not None:
        allowed, kept = set(class_list), []
        for rec in records:
            outside = [x for x in rec.labels if x not in allowed]
            if outside:
                failures.append(_failure(rec.path, f"label {outside[0]!r} is not in {class_list_name}", rec.source))
            else:
                kept.append(rec)
        records = kept
    merged: dict[tuple, ClipRecord] = {}
    for rec, real in zip(records, _realpaths([r.path for r in records])):
        key = (real, rec.start, rec.end)
        if key in merged:
            first = merged[key]
            first.labels = list(dict.fromkeys(first.labels + rec.labels))
            if rec.source not in first.source.split("+"):
                first.source += "+" + rec.source
            first.split_hint = first.split_hint or rec.split_hint
            first.class_split_hint = first.class_split_hint or rec.class_split_hint
        else:
            merged[key] = replace(rec, labels=list(rec.labels))  # a copy: the merge above edits it
    return list(merged.values()), failures


def _realpaths(paths: list[str]) -> list[str]:
    """os.path.realpath of each path, each folder resolved once: realpath costs a system call per
    path component, and Omniglot's 19,280 files sit in 964 folders."""
    dirs: dict[str, str] = {}
    out = []
    for p in paths:
        d, name = os.path.split(p)
        if name in ("", ".", ".."):
            out.append(os.path.realpath(p))
            continue
        if d not in dirs:
            dirs[d] = os.path.realpath(d or ".")
        full = os.path.join(dirs[d], name)
        out.append(os.path.realpath(full) if os.path.islink(full) else full)
    return out


# -----------------------------------------------------------------------------
# Splits: classes into meta-train / meta-test, each class's clips into train / val


def _stable_key(seed: int, name: str) -> float:
    """A seeded random number per name, so adding a class does not reshuffle the others."""
    return float(np.random.default_rng([seed, zlib.crc32(name.encode())]).random())


def split_classes(classes: list[str], meta_test_fraction: float, seed: int,
                  fixed: dict[str, str] | None = None) -> list[str]:
    """Per class 'meta_train' | 'meta_test'. Classes named in split lists (`fixed`) keep their
    split and every other class is meta-train (the list defines the test set exactly);
    otherwise a seeded `meta_test_fraction` of the classes (at least one, never all) is held out."""
    if fixed:
        return [fixed.get(c, "meta_train") for c in classes]
    n = len(classes)
    n_test = 0
    if meta_test_fraction > 0 and n >= 2:
        n_test = min(n - 1, max(1, round(n * meta_test_fraction)))
    ranked = sorted(classes, key=lambda c: _stable_key(seed, c))
    test = set(ranked[:n_test])
    return ["meta_test" if c in test else "meta_train" for c in classes]


def split_clips(primary: list[str | None], hints: list[str | None], val_fraction: float, seed: int) -> list[str]:
    """Per clip 'train' | 'val', class by class. A class whose clips come with both train and
    val/test hints from their source follows them; otherwise a seeded `val_fraction` of its
    clips (never all of them) is validation. Unlabelled clips follow their hint (default train)."""
    out = ["train"] * len(primary)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(primary):
        if c is None:
            out[i] = "val" if hints[i] in ("val", "test") else "train"
        else:
            by_class.setdefault(c, []).append(i)
    for c, idx in by_class.items():
        hs = {hints[i] for i in idx}
        if "train" in hs and hs & {"val", "test"}:
            for i in idx:
                out[i] = "train" if hints[i] == "train" else "val"
            continue
        rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
        n_val = min(len(idx) - 1, round(len(idx) * val_fraction))
        for j in rng.permutation(len(idx))[:n_val]:
            out[idx[j]] = "val"
    return out


def read_split_lists(specs: list[str]) -> list[tuple[str, str, str]]:
    """`--split-list [meta_train=|meta_test=]FILE` -> (meta split, line, file) for every non-empty
    line; without a prefix the file name decides (test -> meta_test). `resolve_split_lists` then
    finds the classes the lines name."""
    listed = []
    for spec in specs:
        split, sep, file = spec.partition("=")
        if not sep:
            split, file = _class_split_from_name(Path(spec).name), spec
            if split is None:
                raise DataError(f"--split-list {spec}: cannot tell meta_train from meta_test by its name; "
                                f"write meta_train={spec} or meta_test={spec}")
        if split not in ("meta_train", "meta_test"):
            raise DataError(f"--split-list {spec}: the prefix must be meta_train= or meta_test=")
        path = _existing(file, "split list", want_dir=False)
        listed += [(split, line.strip(), str(path)) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    return listed


def resolve_split_lists(listed: list[tuple[str, str, str]], present) -> tuple[dict[str, str], list[str]]:
    """Split-list lines against the classes in the data -> ({class: meta split}, lines that name none).

    A line (normalised part by part, as folder-source classes are) names, in this order:
    a class ('Alphabet_of_the_Magi/character01', 'juggling'); a folder of classes, every class
    under it ('Alphabet_of_the_Magi' holds out the whole alphabet); or `class/file`, the class
    without the last part ('Alphabet_of_the_Magi/character01/0709_01.png', CMN's
    'juggling/abc_000001_000011'). A class given both splits is an error.
    """
    present = set(present)
    under: dict[str, list[str]] = {}  # folder -> the classes inside it
    for c in sorted(present):
        parts = c.split("/")
        for k in range(1, len(parts)):
            under.setdefault("/".join(parts[:k]), []).append(c)
    fixed: dict[str, str] = {}
    unmatched: list[str] = []
    for split, line, file in listed:
        name = normalise_class_path(line)
        parent = name.rsplit("/", 1)[0] if "/" in name else None
        if name in present:
            classes = [name]
        elif name in under:
            classes = under[name]
        elif parent in present:
            classes = [parent]
        else:
            unmatched.append(line)
            continue
        for c in classes:
            if fixed.setdefault(c, split) != split:
                raise DataError(f"class {c!r} is listed as both meta_train and meta_test (last in {file}: {line!r})")
    return fixed, unmatched


# -----------------------------------------------------------------------------
# The clip cache: <dir>/clips.npy (N, F, H, W, 3) uint8 + <dir>/meta.json


def _write_json(path: Path, obj: dict) -> None:
    """Atomic: a reader (or a crash) never sees half a file. One line per top-level key and per
    item of a list of dicts (a clip, a failure): readable, greppable, and written by json's C
    encoder (indent= falls back to the pure-Python one: seconds for 20,000 clips, every save)."""
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            parts.append(f"{json.dumps(k)}: [\n  " + ",\n  ".join(json.dumps(x) for x in v) + "\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("{\n " + ",\n ".join(parts) + "\n}\n")
    os.replace(tmp, path)


def _clip_keys(clips: list[dict]) -> list[str]:
    """What makes two clip entries the same clip: the real file and the window."""
    return [f"{real}|{c['start']}|{c['end']}" for c, real in zip(clips, _realpaths([c["path"] for c in clips]))]


def _save_meta(out: Path, meta: dict, read_failures: list[dict] = ()) -> None:
    """meta.json, its 'failures' being the readers' (rows without a video, ...) followed by the
    clips that failed to decode."""
    decode = [_failure(c["path"], c["error"], c["source"]) for c in meta["clips"] if c["status"] == "failed"]
    meta["failures"] = list(read_failures) + decode
    _write_json(out / "meta.json", meta)


def _open_for_update(out: Path, records: list[ClipRecord], size: int, fps: float, frames: int, frames_rule: str = ""):
    """(clip entries, clips memmap) for this run. An existing cache with the same settings is reused:
    clips it already decoded (same file and window) are kept, so only the missing ones are
    decoded. Anything else starts a fresh array. `frames_rule` explains a defaulted frame count
    in the error for a cache made with another."""
    meta_path, clips_path = out / "meta.json", out / "clips.npy"
    old, old_clips = None, None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = None  # a corrupt meta.json cannot tell us which rows are good: start over
        if old is not None and old.get("kind") == "synthetic":
            raise DataError(f"{out} holds the synthetic benchmark; give prepare another --out")
        if old is not None and (old.get("format_version"), old.get("size"), old.get("fps"), old.get("frames")) \
                != (FORMAT_VERSION, size, fps, frames):
            raise DataError(f"{out} holds a cache made with size={old.get('size')} fps={old.get('fps')} "
                            f"frames={old.get('frames')} (format {old.get('format_version')}); this run asks for "
                            f"size={size} fps={fps} frames={frames}{frames_rule}: use another --out or delete {out}")
        try:
            old_clips = np.load(clips_path, mmap_mode="r+") if old is not None else None
        except (OSError, ValueError):
            old_clips = None
        if old_clips is not None and old_clips.shape != (len(old["clips"]), frames, size, size, 3):
            old_clips = None

    entries = [dict(vars(r), labels=list(r.labels), status="pending", length=0, error=None, warning=None, grey=None)
               for r in records]
    keys = _clip_keys(entries)
    done = {}
    if old is not None and old_clips is not None:
        old_keys = _clip_keys(old["clips"])
        done = {k: (row, c) for row, (k, c) in enumerate(zip(old_keys, old["clips"])) if c["status"] != "pending"}
    same_layout = old_clips is not None and old_keys == keys
    if same_layout:
        clips = old_clips
        for e, k in zip(entries, keys):
            row, c = done.get(k, (None, None))
            if c is not None:
                e.update(status=c["status"], length=c["length"], error=c["error"], warning=c.get("warning"),
                         grey=c.get("grey"))
        return entries, clips

    # A different set of clips: a new array. Rows decoded before are copied over (cheap next to
    # decoding). The old meta.json goes *before* clips.npy is replaced, so a crash in between
    # costs re-decoding, never a meta.json describing rows that are not there.
    if meta_path.exists():
        meta_path.unlink()
    tmp = out / "clips.npy.tmp"
    clips = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), frames, size, size, 3))
    for i, (e, k) in enumerate(zip(entries, keys)):
        row, c = done.get(k, (None, None))
        if c is not None:
            if c["status"] == "ok":
                clips[i] = old_clips[row]
            e.update(status=c["status"], length=c["length"], error=c["error"], warning=c.get("warning"),
                     grey=c.get("grey"))
    clips.flush()
    del old_clips
    os.replace(tmp, clips_path)
    return entries, np.load(clips_path, mmap_mode="r+")


def prepare(sources: list[str], out, size: int = 64, fps: float = 10, frames: int | None = None,
            workers: int | None = None, seed: int = 0, meta_test_fraction: float = 0.2, val_fraction: float = 0.2,
            split_lists: list[str] = (), class_list: str | None = None, retry_failed: bool = False,
            verbose: bool = True) -> dict:
    """Decode `sources` ('KIND:PATH[:ANNOTATIONS]') into a clip cache at `out`; returns meta.

    `frames` (F) defaults to 1 when every clip is a still image, else 100 (paper 4.1); images
    among videos are one-frame clips padded to F. Resumable: run it again over the same `out`
    and only clips not yet decoded are decoded (with `retry_failed`, failed ones too). Every few
    seconds the decoded rows are flushed and then meta.json is written, so an interrupted run
    loses at most those seconds.
    """
    if not sources:
        raise DataError("no --source given")
    fps = int(fps) if float(fps) == int(fps) else float(fps)  # 10.0 -> 10: one spelling in meta.json
    specs = [parse_source(s) for s in sources]
    names = read_class_list(class_list) if class_list else None
    records, read_failures = read_sources(specs, names, f"the class list {class_list}")
    if not records:
        reasons = "; ".join(f"{f['file']}: {f['reason']}" for f in read_failures[:3])
        raise DataError(f"no clips found in {', '.join(sources)}" + (f" ({reasons})" if reasons else ""))
    listed = read_split_lists(list(split_lists))
    fixed, unmatched = resolve_split_lists(listed, {c for r in records for c in r.labels})
    for r in records:  # split hints carried by splitlist sources
        for c in r.labels:
            if r.class_split_hint and fixed.setdefault(c, r.class_split_hint) != r.class_split_hint:
                raise DataError(f"class {c!r} is in both a meta-train and a meta-test split list")
    if (listed or fixed) and "meta_test" not in fixed.values():
        tests = [line for split, line, _ in listed if split == "meta_test"]
        example = f" (e.g. {next((x for x in tests if x in unmatched), tests[0])!r})" if tests else ""
        raise DataError(f"the split lists name no meta-test class that is in the data{example}; "
                        f"check --split-list against the sources' class names")
    n_images = sum(_is_image(r.path) for r in records)
    frames_rule = ""
    if frames is None:
        frames = 1 if n_images == len(records) else 100
        frames_rule = " (--frames defaults to 1 when every clip is an image, else 100)"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, clips = _open_for_update(out, records, size, fps, frames, frames_rule)
    meta = {"format_version": FORMAT_VERSION, "kind": "prepared", "complete": False, "size": size, "fps": fps,
            "frames": frames, "seed": seed, "meta_test_fraction": meta_test_fraction, "val_fraction": val_fraction,
            "sources": list(sources), "class_list": class_list, "split_lists": list(split_lists),
            "clips": entries}
    todo = [i for i, e in enumerate(entries) if e["status"] == "pending" or (retry_failed and e["status"] == "failed")]
    _save_meta(out, meta, read_failures)

    workers = workers or os.cpu_count() or 1
    if verbose:
        what = f" ({n_images} still images, {frames}-frame clips)" if n_images else ""
        print(f"prepare: {len(entries)} clips{what} from {len(sources)} source(s), {len(entries) - len(todo)} "
              f"already done, decoding {len(todo)} with {workers} workers -> {out}", flush=True)
    t0, last_save, save_every = time.time(), time.time(), 5.0
    progress = stmeta.Progress(len(todo), "decode") if (verbose and todo) else None
    # Threads are enough: a video's work happens in its ffmpeg child process (one per worker,
    # each single-threaded); an image's in Pillow, which releases the GIL while it decodes and
    # resizes. The Python side copies the results into the memmap. An image takes a fraction of a
    # millisecond, so images go 64 to a task (one a task spent a third of the time handing
    # results between threads); a video is a task of its own.
    batches, run = [], []
    for i in todo:
        if not _is_image(entries[i]["path"]):
            batches.append([i])
            continue
        run.append(i)
        if len(run) == 64:
            batches.append(run)
            run = []
    batches += [run] if run else []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(_decode_batch, [entries[i] for i in b], size, fps, frames): b for b in batches}
        for fut in as_completed(futures):
            for i, result in zip(futures[fut], fut.result()):
                if isinstance(result, DecodeError):
                    entries[i].update(status="failed", length=0, error=result.reason, warning=None, grey=None)
                elif isinstance(result, Exception):
                    entries[i].update(status="failed", length=0, error=f"{type(result).__name__}: {result}",
                                      warning=None, grey=None)
                else:
                    video, length, warning, grey = result
                    clips[i] = video
                    entries[i].update(status="ok", length=length, error=None, warning=warning, grey=grey)
            if progress:
                progress.update(len(futures[fut]))
            if time.time() - last_save > save_every:
                t_save = time.time()
                clips.flush()  # rows first, then the meta that says they are done
                _save_meta(out, meta, read_failures)
                last_save = time.time()
                save_every = max(5.0, 20 * (last_save - t_save))  # saving a big meta.json: at most 5% of the time
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        clips.flush()
        _save_meta(out, meta, read_failures)
        n_done = sum(e["status"] != "pending" for e in entries)
        raise DataError(f"interrupted: {n_done}/{len(entries)} clips done and saved in {out}; "
                        f"run the same command again to resume") from None
    finally:
        pool.shutdown(wait=True)
        if progress:
            progress.close()
    clips.flush()
    elapsed = time.time() - t0

    meta.update(_finalise_labels(entries, seed, meta_test_fraction, val_fraction, fixed))
    meta["grey"] = _all_grey(entries, clips)
    meta["warnings"] = _data_warnings(entries, frames, unmatched)
    meta["complete"] = True
    meta["decode_seconds"] = round(elapsed, 2)
    _save_meta(out, meta, read_failures)
    if not meta["classes"] and not any(e["status"] == "ok" for e in entries):
        raise DataError(f"none of the {len(entries)} clips could be decoded; {out}/meta.json lists why\n"
                        + failure_report(meta))
    if verbose:
        print(f"prepare: decoded {len(todo)} clips in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.1f} clips/s)"
              + (", grey: every frame has R == G == B" if meta["grey"] else ""))
        print(ClipCache(out).summary())
        print(failure_report(meta))
    return meta


def _finalise_labels(entries, seed, meta_test_fraction, val_fraction, fixed) -> dict:
    """Classes (those with at least one decoded clip), their meta split, each clip's train/val."""
    ok = [e for e in entries if e["status"] == "ok"]
    classes = sorted({c for e in ok for c in e["labels"]})
    everywhere = sorted({c for e in entries for c in e["labels"]})
    empty = [c for c in everywhere if c not in set(classes)]
    class_split = split_classes(classes, meta_test_fraction, seed, fixed)
    primary = [e["labels"][0] if e["labels"] and e["status"] == "ok" else None for e in entries]
    splits = split_clips(primary, [e["split_hint"] for e in entries], val_fraction, seed)
    for e, s in zip(entries, splits):
        e["split"] = s if e["status"] == "ok" else None
    return {"classes": classes, "class_split": class_split, "empty_classes": empty}


def _all_grey(entries: list[dict], clips: np.ndarray) -> bool:
    """Whether every decoded clip is grey: the flag each decode returned, or, for rows carried
    over from a cache made before the flag existed, a look at the row (stored back in its entry)."""
    ok = [i for i, e in enumerate(entries) if e["status"] == "ok"]
    for i in ok:
        if entries[i].get("grey") is None:
            entries[i]["grey"] = is_grey(clips[i][: max(entries[i]["length"], 1)])
        if not entries[i]["grey"]:
            return False
    return bool(ok)


# A horizontal flip swaps left and right and turns clockwise into counter-clockwise: a class so
# named ("pushing something from left to right", "turning clockwise") becomes another class.
_DIRECTION = re.compile(r"(?<![a-z])(left|right|leftwards?|rightwards?|(counter|anti)?-?clockwise|cw|ccw)(?![a-z])",
                        re.IGNORECASE)


def direction_classes(names) -> list[str]:
    """The class names that suggest a left/right or rotational direction (see _DIRECTION)."""
    return sorted(c for c in names if _DIRECTION.search(c.replace("_", " ")))


def flip_warning(directional: list[str], n_classes: int) -> str:
    return (f"{len(directional)} of {n_classes} classes name a direction that a horizontal flip reverses "
            f"(e.g. {directional[0]!r}); training flips clips at random by default: pass --data.hflip=false "
            f"to train.py if flipping changes the class")


def _data_warnings(entries: list[dict], frames: int, unmatched_split_lines: list[str]) -> list[str]:
    """What prepare kept but a person should know: classes too small for an episode, still images
    among videos, split-list lines that matched no class."""
    out = []
    count: dict[str, int] = {}
    for e in entries:
        if e["status"] == "ok":
            for c in e["labels"]:
                count[c] = count.get(c, 0) + 1
    single = sorted(c for c, n in count.items() if n == 1)
    if single:
        more = f" and {len(single) - 3} more" if len(single) > 3 else ""
        these = "1 class has" if len(single) == 1 else f"{len(single)} classes have"
        out.append(f"{these} a single clip (kept; an episode needs several per class): "
                   + ", ".join(repr(c) for c in single[:3]) + more)
    ok = [e for e in entries if e["status"] == "ok"]
    n_images = sum(_is_image(e["path"]) for e in ok)
    if 0 < n_images < len(ok):
        out.append(f"{n_images} still images are one-frame clips (repeated to {frames} frames) among "
                   f"{len(ok) - n_images} videos")
    directional = direction_classes(count)
    if directional:
        out.append(flip_warning(directional, len(count)))
    if unmatched_split_lines:
        n = len(unmatched_split_lines)
        these = "1 split-list line names" if n == 1 else f"{n} split-list lines name"
        out.append(f"{these} no class in the data (e.g. {unmatched_split_lines[0]!r})")
    return out


def failure_report(meta: dict, limit: int = 3) -> str:
    """Failures grouped by kind of reason, with a few examples each (all of them are in meta.json)."""
    failures = meta.get("failures", [])
    lines = [f"failures: {len(failures)}" + (" (all listed in meta.json)" if failures else "")]
    groups: dict[str, list[dict]] = {}
    for f in failures:
        # 'video not found: no abc_000001_000011.* ...' and "label 'x' is not in ..." group by
        # what went wrong, not by which file or label
        # (only free-standing numbers are masked, as N: "MP4" and "x264" stay as they are)
        kind = re.sub(r"'[^']*'|\"[^\"]*\"", "_", f["reason"].split(":")[0])
        kind = re.sub(r"(?<![\w.])\d[\d,.]*(?![\w])", "N", kind)[:100]
        groups.setdefault(kind, []).append(f)
    for kind, fs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(fs)} x {kind}")
        lines += [f"      {f['file']}: {f['reason'][:160]}" for f in fs[:limit]]
        if len(fs) > limit:
            lines.append(f"      ... and {len(fs) - limit} more")
    warnings = [c for c in meta.get("clips", []) if c.get("warning")]
    if warnings:
        lines.append(f"kept with decoder warnings: {len(warnings)}")
        lines += [f"  {c['path']} ({c['length']} frames): {c['warning'][:100]}" for c in warnings[:limit]]
    for c in meta.get("empty_classes", []):
        lines.append(f"empty class (no clip decoded, left out): {c!r}")
    lines += [f"warning: {w}" for w in meta.get("warnings", [])]
    return "\n".join(lines)


class ClipCache:
    """A prepared clip cache, memory-mapped: clips[i] is (F, H, W, 3) uint8."""

    def __init__(self, root):
        self.root = Path(root)
        hint = f"make one with `python data.py synth --out {root}` or `python data.py prepare ... --out {root}`"
        if not self.root.is_dir():
            raise DataError(f"{root}: no such directory ({hint})")
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{root}: no meta.json, not a clip cache ({hint})")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path}: corrupt ({e}); rebuild the cache") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{root}: cache format {meta.get('format_version')}, this data.py reads "
                            f"{FORMAT_VERSION}; rebuild it")
        if not meta.get("complete"):
            n_done = sum(c.get("status") != "pending" for c in meta.get("clips", []))
            raise DataError(f"{root}: incomplete cache ({n_done}/{len(meta.get('clips', []))} clips decoded); "
                            f"run the same prepare command again to finish it")
        self.meta = meta
        self.clips = self._open()
        self.classes: list[str] = meta["classes"]
        self.class_split: list[str] = meta["class_split"]
        index = {c: i for i, c in enumerate(self.classes)}
        clips = meta["clips"]
        self.valid = np.array([c["status"] == "ok" for c in clips], dtype=bool)
        self.all_labels: list[list[int]] = [[index[x] for x in c["labels"]] if ok else []
                                            for c, ok in zip(clips, self.valid)]
        self.labels = np.array([ls[0] if ls else -1 for ls in self.all_labels], dtype=np.int64)  # primary
        self.clip_split = np.array([c.get("split") or "" for c in clips])
        self.lengths = np.array([c["length"] for c in clips], dtype=np.int64)
        self.fps, self.size, self.frames = meta["fps"], meta["size"], meta["frames"]
        # every decoded frame has R == G == B (Omniglot, say); False where meta.json does not say
        # (the synthetic benchmark, caches made before the flag)
        self.grey: bool = bool(meta.get("grey", False))
        # a built-in benchmark says whether a horizontal flip changes a clip's class (glyphs do)
        self.flip_changes_class: bool = bool(meta.get("flip_changes_class", False))

    def _open(self) -> np.memmap:
        path = self.root / "clips.npy"
        try:
            clips = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"{path}: missing; rebuild the cache") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: corrupt or truncated ({e}); rebuild the cache") from None
        m = self.meta
        want = (len(m["clips"]), m["frames"], m["size"], m["size"], 3)
        if clips.shape != want or clips.dtype != np.uint8:
            raise DataError(f"{path}: shape {clips.shape} {clips.dtype}, meta.json says {want} uint8; rebuild it")
        return clips

    # DataLoader workers started by 'spawn' receive a pickled dataset: reopen the memmap there
    # instead of pickling gigabytes of frames.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["clips"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.clips = self._open()

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, clip_split: str | None = None, class_split: str | None = None,
                labelled_only: bool = True) -> np.ndarray:
        """Decoded clips, filtered: clip_split 'train'|'val', class_split 'meta_train'|'meta_test'
        (by the clip's primary label), labelled_only drops unlabelled clips."""
        keep = self.valid.copy()
        if clip_split is not None:
            keep &= self.clip_split == clip_split
        if labelled_only or class_split is not None:
            keep &= self.labels >= 0
        if class_split is not None:
            in_split = np.array([s == class_split for s in self.class_split] + [False])  # [-1] -> False
            keep &= in_split[self.labels]
        return np.flatnonzero(keep)

    def pretrain_pool(self, pool: str = "meta_train") -> np.ndarray:
        """The clips self-supervised pretraining may use, labels unused: "meta_train" = clips of
        the meta-train classes plus every unlabelled clip; "all" = every decoded clip
        (transductive: the held-out classes' clips too)."""
        if pool == "all":
            return self.indices(labelled_only=False)
        if pool != "meta_train":
            raise DataError(f"pretraining pool must be 'meta_train' or 'all', got {pool!r}")
        unlabelled = np.flatnonzero(self.valid & (self.labels < 0))
        return np.sort(np.concatenate([self.indices(class_split="meta_train"), unlabelled]))

    def classes_in(self, class_split: str) -> list[int]:
        return [i for i, s in enumerate(self.class_split) if s == class_split]

    def summary(self) -> str:
        """One line: what data, classes and clips per split, frames, size, fps."""
        m = self.meta
        if m["kind"] == "synthetic":
            what = f"synthetic {m['synthetic'].get('benchmark', 'actions')} benchmark (seed {m['seed']})"
        else:
            what = "prepared from " + ", ".join(m["sources"])
        n_tr, n_te = len(self.classes_in("meta_train")), len(self.classes_in("meta_test"))
        n_unl = int((self.valid & (self.labels < 0)).sum())
        n_warn = len(m.get("warnings", []))
        return (f"{what}: {len(self.classes)} classes ({n_tr} meta-train / {n_te} meta-test), "
                f"{int(self.valid.sum())} clips (train {len(self.indices('train', labelled_only=False))} / "
                f"val {len(self.indices('val', labelled_only=False))}"
                + (f", {n_unl} unlabelled" if n_unl else "") + f"), "
                f"{self.frames} frame{'s' if self.frames != 1 else ''} {self.size}x{self.size} at {self.fps} FPS"
                + (", grey" if self.grey else "") + f", {len(m['failures'])} failures"
                + (f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else ""))


def labelled_subset(cache: ClipCache, indices, fraction: float, seed: int) -> np.ndarray:
    """Semi-supervised: keep `fraction` of each class's labelled clips among `indices` (at least
    one per class, chosen with `seed`); the rest are treated as unlabelled by the caller."""
    if not 0 < fraction <= 1:
        raise DataError(f"labeled fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    indices = indices[cache.labels[indices] >= 0]
    if fraction == 1:
        return np.sort(indices)
    keep = []
    for c in np.unique(cache.labels[indices]):
        idx = np.sort(indices[cache.labels[indices] == c])
        rng = np.random.default_rng([seed, int(c)])
        keep.append(rng.permutation(idx)[: max(1, round(len(idx) * fraction))])
    return np.sort(np.concatenate(keep)) if keep else indices


# -----------------------------------------------------------------------------
# The synthetic action benchmark: classes defined by how things move
#
# Class grammar: a class is one (path, action, partner) triple, 8 x 4 x 4 = 128 classes.
#   path    how the actor travels:
#           drift-h / drift-v / drift-diag  constant velocity, wrapping round the frame edges
#           orbit    circles a point          swing    back and forth along a line (any angle)
#           hop      bounces along the floor  figure8  a figure-of-eight loop
#           jitter   an erratic random walk
#   action  what the actor does in place: rigid | spin | pulse (grows and shrinks) | blink
#   partner a second object and how it moves relative to the actor:
#           alone (none) | follower (retraces the actor's path a few frames behind)
#           mirror (point reflection of the actor through the frame centre) | satellite (circles the actor)
# Each clip draws everything else at random: shapes, colours, sizes, start positions, speeds,
# directions and phases, a muted textured background (value noise, stripes, checks) with static
# clutter, and 1-3 small slow distractors. Directions are random signs, so every class is
# unchanged by a horizontal flip. Objects are two-tone so that spinning is visible. A single
# frame shows only shapes at places, which says nothing about the class; the motion does.
# Salience matters: with small actors on busy backgrounds (our first version) a video ViT
# learned nothing that transferred; actors of about 3x3 patches on muted backgrounds it does.
# Meta-test classes are a seeded set of triples whose primitives all also occur in meta-train:
# new combinations of known motions, the few-shot question the paper asks.

SYNTH_PATHS = ("drift-h", "drift-v", "drift-diag", "orbit", "swing", "hop", "figure8", "jitter")
SYNTH_ACTIONS = ("rigid", "spin", "pulse", "blink")
SYNTH_PARTNERS = ("alone", "follower", "mirror", "satellite")
SYNTH_SHAPES = ("disc", "square", "diamond", "triangle", "cross", "ring")
SYNTH_FPS = 10  # nominal: speeds and periods below are per frame at 10 FPS
_HISTORY = 8  # frames of path evaluated before t = 0, for the follower to retrace
ACTOR_RADIUS = 0.17  # of the frame side: about 3x3 patches of 8 px at 64 px, so the motion is not averaged away
# Measured (H200, the paper's SPT/LSA ViT, MAE-pretrained 95 s then fine-tuned 35 s on meta-train
# classes; 5-way 1-shot nearest class mean on the held-out classes): 16 clips per class gives
# 30% (the model memorises 13 clips a class instead of learning motion), 48 gives 74%, while
# the same clips reduced to one repeated frame stay at 24%.
SYNTH_CLIPS_PER_CLASS = 48


def synth_class_names() -> list[str]:
    """All 128 class names, 'path action partner', in grammar order."""
    return [f"{p} {a} {q}" for p in SYNTH_PATHS for a in SYNTH_ACTIONS for q in SYNTH_PARTNERS]


def _wrap(p: np.ndarray, L: float) -> np.ndarray:
    """Leave one edge, come back at the other (with a margin so objects leave fully)."""
    m = 0.15 * L
    return (p + m) % (L + 2 * m) - m


def _fold(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect a free walk back into [lo, hi] (a triangle wave): a random walk that bounces."""
    w = hi - lo
    q = (p - lo) % (2 * w)
    return lo + np.where(q > w, 2 * w - q, q)


def _synth_path(kind: str, t: np.ndarray, L: float, rng: np.random.Generator) -> np.ndarray:
    """Centre (x, y) in pixels at integer frames t -> (len(t), 2)."""
    u, sign = rng.uniform, lambda: float(rng.choice((-1.0, 1.0)))
    tt = t[:, None].astype(np.float64)  # (n, 1)
    if kind.startswith("drift"):
        if kind == "drift-h":
            direction = np.array([sign(), 0.0])
        elif kind == "drift-v":
            direction = np.array([0.0, sign()])
        else:  # one of the four diagonals
            direction = np.array([sign(), sign()]) / math.sqrt(2)
        return _wrap(u(0.2, 0.8, 2) * L + u(0.025, 0.045) * L * tt * direction, L)
    if kind == "orbit":
        a = sign() * 2 * math.pi / u(14, 22) * tt + u(0, 2 * math.pi)
        return u(0.38, 0.62, 2) * L + u(0.18, 0.27) * L * np.hstack([np.cos(a), np.sin(a)])
    if kind == "swing":
        alpha = u(0, math.pi)
        s = u(0.18, 0.28) * L * np.sin(2 * math.pi / u(10, 16) * tt + u(0, 2 * math.pi))
        return u(0.3, 0.7, 2) * L + s * np.array([math.cos(alpha), math.sin(alpha)])
    if kind == "hop":
        x = _wrap(u(0.2, 0.8) * L + sign() * u(0.008, 0.015) * L * tt, L)
        period = u(8, 12)
        y = u(0.72, 0.85) * L - u(0.3, 0.45) * L * np.abs(np.sin(math.pi * (tt + u(0, period)) / period))
        return np.hstack([x, y])
    if kind == "figure8":
        a = sign() * 2 * math.pi / u(16, 24) * tt + u(0, 2 * math.pi)
        amp = u(0.2, 0.28) * L
        xy = np.hstack([amp * np.sin(a), 0.5 * amp * np.sin(2 * a)])
        return u(0.4, 0.6, 2) * L + (xy[:, ::-1] if rng.random() < 0.5 else xy)
    if kind == "jitter":
        walk = u(0.3, 0.7, 2) * L + np.cumsum(rng.normal(0, 0.04 * L, (len(t), 2)), axis=0)
        return _fold(walk, 0.15 * L, 0.85 * L)
    raise ValueError(kind)


def _synth_action(kind: str, t: np.ndarray, rng: np.random.Generator):
    """(angle (n,), scale (n,), visible (n,)) of an object doing `kind` in place."""
    u = rng.uniform
    theta = np.full(len(t), u(0, 2 * math.pi))
    scale = np.ones(len(t))
    visible = np.ones(len(t), dtype=bool)
    if kind == "spin":
        theta = theta + float(rng.choice((-1, 1))) * u(0.2, 0.35) * t
    elif kind == "pulse":
        scale = 1 + 0.4 * np.sin(2 * math.pi * t / u(6, 10) + u(0, 2 * math.pi))
    elif kind == "blink":
        period = int(rng.integers(6, 11))
        visible = (t + int(rng.integers(period))) % period < period // 2
    return theta, scale, visible


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's own frame (unit radius)."""
    if shape == "disc":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    if shape == "triangle":
        return (v >= -0.5) & (v <= 1 - 1.732 * np.abs(u))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1)) | ((av <= 0.33) & (au <= 1))
    r2 = u * u + v * v
    return (r2 <= 1) & (r2 >= 0.3)  # ring


def _hsv_colour(rng: np.random.Generator, saturation: tuple, value: tuple) -> np.ndarray:
    """A colour of random hue, saturation and value drawn from the given ranges: (3,) uint8 RGB."""
    h, s, v = rng.uniform(0, 6), rng.uniform(*saturation), rng.uniform(*value)
    k = (np.array([5.0, 3.0, 1.0]) + h) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).astype(np.uint8)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour (objects)."""
    return _hsv_colour(rng, (0.6, 1), (0.75, 1))


def _synth_background(L: int, rng: np.random.Generator) -> np.ndarray:
    """A static textured background (L, L, 3) uint8 with a little clutter. Muted and of low
    contrast on purpose: it must vary from clip to clip (so appearance says nothing) without
    drowning the moving objects, which carry the class."""
    from PIL import Image

    base = rng.uniform(50, 150, 3)
    contrast = rng.uniform(10, 30)
    y, x = np.mgrid[0:L, 0:L].astype(np.float64)
    kind = int(rng.integers(3))
    if kind == 0:  # value noise: a coarse random grid, smoothly upsampled
        g = int(rng.integers(3, 8))
        grid = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
        tex = np.asarray(Image.fromarray(grid).resize((L, L), Image.BILINEAR), dtype=np.float64) / 127.5 - 1
    elif kind == 1:  # stripes at a random angle and frequency
        a, f = rng.uniform(0, math.pi), rng.uniform(2, 6) / L
        tex = np.sin(2 * math.pi * f * (x * math.cos(a) + y * math.sin(a)))[..., None] * rng.uniform(-1, 1, 3)
    else:  # checks
        k = int(rng.integers(L // 16 + 2, L // 5 + 3))
        tex = (2 * (((x // k) + (y // k)) % 2) - 1)[..., None] * rng.uniform(-1, 1, 3)
    bg = base + contrast * tex
    for _ in range(int(rng.integers(2, 8))):  # clutter: small static blocks, a little darker or lighter
        h, w = rng.integers(1, max(2, L // 12), 2)
        y0, x0 = rng.integers(0, L - 1, 2)
        bg[y0: y0 + h, x0: x0 + w] = base + rng.uniform(-2, 2, 3) * contrast
    bg += rng.normal(0, 3, bg.shape)  # a little sensor noise, still static
    return np.clip(bg, 0, 255).astype(np.uint8)


def _draw(video, xy, theta, scale, visible, radius, shape, colour) -> None:
    """Paint one two-tone object into video (T, H, W, 3) in place; xy (T, 2), theta/scale (T,).
    Only a small window around the object is computed each frame (vectorised over frames)."""
    T, H, W, _ = video.shape
    half = int(math.ceil(radius * scale.max() * 1.2)) + 1  # every shape fits in 1.2 radii
    win = np.arange(2 * half)
    ys = np.floor(xy[:, 1]).astype(np.int64)[:, None] - half + 1 + win  # (T, b) rows of the window
    xs = np.floor(xy[:, 0]).astype(np.int64)[:, None] - half + 1 + win  # (T, b) columns
    dy = (ys + 0.5 - xy[:, 1, None])[:, :, None]  # (T, b, 1) from the centre, in pixels
    dx = (xs + 0.5 - xy[:, 0, None])[:, None, :]  # (T, 1, b)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    r = (radius * scale)[:, None, None]
    u = (c * dx + s * dy) / r  # (T, b, b) the object's own coordinates, unit radius
    v = (c * dy - s * dx) / r
    on_screen = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
    inside = _shape_mask(shape, u, v) & on_screen & visible[:, None, None]
    front = u >= 0  # two tones, so rotation shows
    for part, col in ((inside & front, colour), (inside & ~front, colour // 2)):
        t, i, j = np.nonzero(part)
        video[t, ys[t, i], xs[t, j]] = col


def render_synthetic_clip(class_name: str, seed: int, clip_index: int, frames: int = 32, size: int = 64) -> np.ndarray:
    """One clip of class 'path action partner' -> (frames, size, size, 3) uint8. Pure: the same
    arguments give the same bits, whatever process renders it."""
    path_kind, action, partner = class_name.split()
    class_id = synth_class_names().index(class_name)
    rng = np.random.default_rng([seed, class_id, clip_index])
    L = float(size)
    t_all = np.arange(-_HISTORY, frames)  # path history before t = 0 for the follower
    t = t_all[_HISTORY:]

    video = np.repeat(_synth_background(size, rng)[None], frames, axis=0)  # (T, H, W, 3)
    for _ in range(int(rng.integers(1, 4))):  # distractors: small slow drifters that turn a little
        heading = rng.uniform(0, 2 * math.pi)
        velocity = rng.uniform(0, 0.012) * L * np.array([math.cos(heading), math.sin(heading)])
        p = _wrap(rng.uniform(0, L, 2) + t[:, None] * velocity, L)  # (T, 2)
        theta = rng.uniform(0, 2 * math.pi) + rng.uniform(-0.05, 0.05) * t
        _draw(video, p, theta, np.ones(frames), np.ones(frames, bool), rng.uniform(0.04, 0.07) * L,
              SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))], _bright_colour(rng))

    track = _synth_path(path_kind, t_all, L, rng)  # (HISTORY + T, 2)
    actor = track[_HISTORY:]
    if partner != "alone":
        if partner == "follower":
            lag = int(rng.integers(5, 8))
            other = track[_HISTORY - lag: _HISTORY - lag + frames]
        elif partner == "mirror":
            other = L - actor
        else:  # satellite
            a = float(rng.choice((-1, 1))) * 2 * math.pi / rng.uniform(8, 12) * t + rng.uniform(0, 2 * math.pi)
            other = actor + rng.uniform(0.3, 0.38) * L * np.stack([np.cos(a), np.sin(a)], axis=1)
        _draw(video, other, *_synth_action(action, t, rng), ACTOR_RADIUS * L * rng.uniform(0.8, 1.2),
              SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))], _bright_colour(rng))
    _draw(video, actor, *_synth_action(action, t, rng), ACTOR_RADIUS * L * rng.uniform(0.8, 1.2),
          SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))], _bright_colour(rng))
    return video


# -----------------------------------------------------------------------------
# The glyph benchmark: what moves and how it moves. A class is (glyph, motion): one of 24
# stroke-drawn glyphs doing one of 5 motions, so appearance and motion both define it (two
# classes of an episode may share a glyph and differ only in motion, or share a motion and differ
# only in glyph). A glyph is 2-4 pen strokes (quadratic Bezier curves) drawn from a seed, redrawn
# for every clip with its control points jittered and a new stroke width, scale, tilt and colour,
# like one character written by different hands; `glyph_images=DIR` uses real drawings instead
# (any folder of <class>/<image> files, e.g. Omniglot's <alphabet>/<character>/*.png: each clip a
# random drawing of its character). Motions have random directions and senses, but a glyph is not
# mirror-symmetric, so a horizontal flip turns a clip into another glyph: this benchmark is
# flip-sensitive and its cache says so (train.py then leaves flips off).

GLYPH_MOTIONS = ("drift", "orbit", "spin", "pulse", "hop")
GLYPHS = 24
GLYPH_RADIUS = 0.3  # of the frame side: a glyph spans about 60% of the frame, 2-3 patches of 8 px at 32 px
_GLYPH_RES = 48  # glyph bitmaps are drawn at this side, then sampled into each frame


def glyph_class_names(n_glyphs: int = GLYPHS, characters: list[str] | None = None) -> list[str]:
    """'glyphNN motion' (or '<character> motion' for real drawings), glyph-major order."""
    glyphs = characters if characters is not None else [f"glyph{g:02d}" for g in range(n_glyphs)]
    return [f"{g} {m}" for g in glyphs for m in GLYPH_MOTIONS]


def _stroke_glyph(seed: int, glyph: int, rng: np.random.Generator) -> np.ndarray:
    """One hand's drawing of procedural glyph `glyph`: (R, R) float alpha in [0, 1]. The strokes
    come from (seed, glyph); rng jitters them (the hand). Drawn with PIL's pen at 4x, then
    reduced: anti-aliased strokes in well under a millisecond."""
    from PIL import Image, ImageDraw

    g = np.random.default_rng([seed, 7_000_003, glyph])
    n = int(g.integers(2, 5))
    ctrl = g.uniform(-1, 1, (n, 3, 2))  # start, control, end of each stroke
    for k in range(1, n):  # strokes start on an earlier stroke half the time, so glyphs hang together
        if g.random() < 0.5:
            ctrl[k, 0] = ctrl[int(g.integers(k)), int(g.choice((0, 2)))]
    s = np.linspace(0, 1, 16)[:, None, None]  # (S, 1, 1) along each curve
    def curve(c):  # (n, 3, 2) -> (S, n, 2)
        return (1 - s) ** 2 * c[None, :, 0] + 2 * s * (1 - s) * c[None, :, 1] + s ** 2 * c[None, :, 2]
    lo, hi = curve(ctrl).reshape(-1, 2).min(0), curve(ctrl).reshape(-1, 2).max(0)
    ctrl = (ctrl - (lo + hi) / 2) * (1.5 / max(float((hi - lo).max()), 1e-6))  # the ink fills [-0.75, 0.75]
    ctrl = ctrl + rng.normal(0, 0.05, ctrl.shape)
    width = g.uniform(0.08, 0.12) * rng.uniform(0.8, 1.2)  # in glyph units (the frame of the glyph is 2)
    big = 4 * _GLYPH_RES
    pts = (curve(ctrl) + 1) / 2 * big
    im = Image.new("L", (big, big))
    pen = ImageDraw.Draw(im)
    w = max(1, int(round(width * big)))
    for k in range(n):
        pen.line([tuple(p) for p in pts[:, k]], fill=255, width=w, joint="curve")
        for p in (pts[0, k], pts[-1, k]):  # round caps
            pen.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=255)
    return np.asarray(im.resize((_GLYPH_RES, _GLYPH_RES), Image.BOX), dtype=np.float64) / 255


@functools.lru_cache(maxsize=4096)
def _image_glyph(path: str) -> np.ndarray:
    """A drawing as an (R, R) alpha: ink (dark on light, or light on dark) cropped to its box,
    centred in a square with a margin."""
    from PIL import Image, ImageFilter

    try:
        with Image.open(path) as im:
            x = np.asarray(im.convert("L"), dtype=np.float64) / 255
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if np.median(x) > 0.5:  # dark ink on a light page
        x = 1 - x
    ys, xs = np.nonzero(x > 0.5)
    if len(ys) == 0:
        raise DataError(f"{path}: no ink found (an empty drawing)")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = int(max(y1 - y0, x1 - x0) * 1.15) + 2
    sq = np.zeros((side, side))
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    sq[oy: oy + y1 - y0, ox: ox + x1 - x0] = x[y0:y1, x0:x1]
    # a pen as broad as the procedural glyphs' (about 8% of the side): a thin scan would fade
    # to a hairline at the size glyphs are drawn
    big = Image.fromarray((sq * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(max(3, int(0.05 * side) | 1)))
    small = big.resize((_GLYPH_RES, _GLYPH_RES), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255


def _paste_glyph(video, alpha, xy, theta, scale, radius, colour) -> None:
    """Composite a glyph bitmap into video (T, H, W, 3) in place at centres xy (T, 2), angles
    theta (T,) and scales (T,), half-side `radius` pixels: every pixel maps back into the bitmap
    (bilinear), colour blended by the sampled alpha. Whole frames at once (a glyph covers most)."""
    T, H, W, _ = video.shape
    R = _GLYPH_RES
    f32 = np.float32
    dy = ((np.arange(H) + 0.5)[None, :, None] - xy[:, 1, None, None]).astype(f32)  # (T, H, 1) from the centre, px
    dx = ((np.arange(W) + 0.5)[None, None, :] - xy[:, 0, None, None]).astype(f32)  # (T, 1, W)
    k = R / (2 * radius * scale)  # bitmap pixels per frame pixel, (T,)
    c, s = (np.cos(theta) * k).astype(f32)[:, None, None], (np.sin(theta) * k).astype(f32)[:, None, None]
    u = c * dx + s * dy + f32(R / 2 - 0.5)  # bitmap column, (T, H, W)
    v = c * dy - s * dx + f32(R / 2 - 0.5)  # bitmap row
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    pad = np.pad(alpha.astype(f32), 1).ravel()  # zero outside the bitmap
    i = (np.clip(v0, -1, R - 1).astype(np.int64) + 1) * (R + 2) + np.clip(u0, -1, R - 1).astype(np.int64) + 1
    a = ((1 - fv) * ((1 - fu) * pad[i] + fu * pad[i + 1]) + fv * ((1 - fu) * pad[i + R + 2] + fu * pad[i + R + 3]))
    a *= (u > -1) & (u < R) & (v > -1) & (v < R)  # far outside the bitmap: no ink
    a = a[..., None]  # (T, H, W, 1)
    video[:] = np.clip(video * (1 - a) + colour.astype(f32) * a + f32(0.5), 0, 255).astype(np.uint8)


def _glyph_motion(kind: str, t: np.ndarray, L: float, rng: np.random.Generator):
    """(centre (T, 2) px, angle (T,), scale (T,)) of a glyph doing `kind`; directions and senses
    random, so every motion class is unchanged by a flip (the glyph is not)."""
    u, sign = rng.uniform, lambda: float(rng.choice((-1.0, 1.0)))
    tt = t[:, None].astype(np.float64)
    theta = np.full(len(t), u(-0.3, 0.3))  # a hand's tilt
    scale = np.ones(len(t))
    if kind == "drift":
        heading = u(0, 2 * math.pi)
        xy = _wrap(u(0.3, 0.7, 2) * L + u(0.025, 0.04) * L * tt * np.array([math.cos(heading), math.sin(heading)]), L)
    elif kind == "orbit":
        a = sign() * 2 * math.pi / u(14, 22) * tt + u(0, 2 * math.pi)
        xy = u(0.45, 0.55, 2) * L + u(0.14, 0.2) * L * np.hstack([np.cos(a), np.sin(a)])
    elif kind == "spin":
        xy = np.repeat(u(0.4, 0.6, (1, 2)) * L, len(t), axis=0)
        theta = theta + sign() * u(0.2, 0.35) * t
    elif kind == "pulse":
        xy = np.repeat(u(0.4, 0.6, (1, 2)) * L, len(t), axis=0)
        scale = 1 + 0.35 * np.sin(2 * math.pi * t / u(6, 10) + u(0, 2 * math.pi))
    elif kind == "hop":
        x = _wrap(u(0.2, 0.8) * L + sign() * u(0.01, 0.02) * L * tt, L)
        period = u(8, 12)
        y = u(0.62, 0.7) * L - u(0.2, 0.3) * L * np.abs(np.sin(math.pi * (tt + u(0, period)) / period))
        xy = np.hstack([x, y])
    else:
        raise ValueError(kind)
    return xy, theta, scale


def _ink_colour(rng: np.random.Generator) -> np.ndarray:
    """A dark ink: blue-black, brown, green-black, ..."""
    return _hsv_colour(rng, (0.3, 0.8), (0.1, 0.4))


GLYPH_BACKGROUNDS = ("paper", "textured")


def render_glyph_clip(class_name: str, seed: int, clip_index: int, frames: int = 32, size: int = 64,
                      glyph_images: dict[str, list[str]] | None = None, background: str = "paper") -> np.ndarray:
    """One clip of class 'glyph motion' -> (frames, size, size, 3) uint8. Pure, like
    render_synthetic_clip. glyph_images maps a character to its drawings' files (real glyphs).
    background "paper": dark inks on a plain light page of random brightness, as handwriting is
    seen; "textured": the action benchmark's coloured textures and bright colours (much harder for
    the MAE at the cpu preset: README, Results)."""
    glyph, motion = class_name.rsplit(" ", 1)
    key = zlib.crc32(class_name.encode())  # a class's stream, whatever else the benchmark holds
    rng = np.random.default_rng([seed, 7_000_001, key, clip_index])
    L = float(size)
    t = np.arange(frames)
    if background == "paper":
        page, colour = np.full((size, size, 3), rng.uniform(190, 235), np.uint8), _ink_colour
    elif background == "textured":
        page, colour = _synth_background(size, rng), _bright_colour
    else:
        raise DataError(f"unknown glyph background {background!r}; choose one of {', '.join(GLYPH_BACKGROUNDS)}")
    video = np.repeat(page[None], frames, axis=0)
    for _ in range(int(rng.integers(0, 3))):  # small slow distractors, as in the action benchmark
        heading = rng.uniform(0, 2 * math.pi)
        velocity = rng.uniform(0, 0.012) * L * np.array([math.cos(heading), math.sin(heading)])
        p = _wrap(rng.uniform(0, L, 2) + t[:, None] * velocity, L)
        _draw(video, p, np.full(frames, rng.uniform(0, 2 * math.pi)), np.ones(frames), np.ones(frames, bool),
              rng.uniform(0.04, 0.07) * L, SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))], colour(rng))
    if glyph_images is not None:
        drawings = glyph_images[glyph]
        alpha = _image_glyph(drawings[int(rng.integers(len(drawings)))])
    else:
        alpha = _stroke_glyph(seed, int(glyph.removeprefix("glyph")), rng)
    xy, theta, scale = _glyph_motion(motion, t, L, rng)
    _paste_glyph(video, alpha, xy, theta, scale, GLYPH_RADIUS * L * rng.uniform(0.85, 1.15), colour(rng))
    return video


def read_glyph_images(root, n_glyphs: int, seed: int) -> dict[str, list[str]]:
    """n_glyphs characters (a seeded choice, in name order) from a folder of <class>/<image>
    files -> {character: [drawing paths]}; refused when the folder has fewer."""
    records, _ = read_folder(root)
    by_class: dict[str, list[str]] = {}
    for r in records:
        if _is_image(r.path):
            by_class.setdefault(r.labels[0].replace(" ", "_"), []).append(str(r.path))
    if len(by_class) < n_glyphs:
        raise DataError(f"{root}: {len(by_class)} classes of images, the glyph benchmark asked for {n_glyphs}")
    names = sorted(by_class)
    pick = sorted(np.random.default_rng(seed).choice(len(names), n_glyphs, replace=False))
    chosen, bad = {}, []
    for i in pick:  # every drawing read once here: a bad file is skipped and reported, not met mid-build
        good = []
        for path in sorted(by_class[names[i]]):
            try:
                _image_glyph(path)
                good.append(path)
            except DataError as e:
                bad.append(str(e))
        if not good:
            raise DataError(f"{root}: character {names[i]!r} has no usable drawing ({bad[-1]})")
        chosen[names[i]] = good
    if bad:
        print(f"glyph images: skipped {len(bad)} unusable drawing(s): " + "; ".join(bad[:3])
              + (" ..." if len(bad) > 3 else ""))
    return chosen


def _synth_split(names: list[str], meta_test_fraction: float, seed: int) -> list[str]:
    """The seeded class split, redrawn (deterministically) until every path, action and partner
    also occurs in meta-train, so meta-test classes are new combinations of known primitives."""
    split = split_classes(names, meta_test_fraction, seed)
    for attempt in range(1, 100):
        seen = {w for n, s in zip(names, split) if s == "meta_train" for w in n.split()}
        if seen >= {w for n in names for w in n.split()}:
            break
        split = split_classes(names, meta_test_fraction, seed + 7919 * attempt)
    return split


def _synth_worker(job) -> int:
    """Render a batch of rows straight into the shared clips.npy (and optionally mp4 files)."""
    out, rows, seed, frames, size, mp4_paths, benchmark, glyph_images, background = job
    clips = np.load(Path(out) / "clips.npy", mmap_mode="r+")
    for (row, name, k), mp4 in zip(rows, mp4_paths):
        clips[row] = (render_synthetic_clip(name, seed, k, frames, size) if benchmark == "actions" else
                      render_glyph_clip(name, seed, k, frames, size, glyph_images, background))
        if mp4:
            import imageio.v2 as iio

            Path(mp4).parent.mkdir(parents=True, exist_ok=True)
            iio.mimwrite(mp4, clips[row], fps=SYNTH_FPS, codec="libx264", macro_block_size=1,
                         ffmpeg_log_level="error", output_params=["-threads", "1"])
    clips.flush()
    return len(rows)


def _synth_params(n_classes, clips_per_class, frames, size, seed, meta_test_fraction, val_fraction, write_mp4,
                  benchmark="actions", glyph_images=None, glyph_background="paper"):
    params = {"n_classes": n_classes, "clips_per_class": clips_per_class, "frames": frames, "size": size,
              "seed": seed, "meta_test_fraction": meta_test_fraction, "val_fraction": val_fraction,
              "mp4": bool(write_mp4)}
    if benchmark != "actions":  # the action benchmark's params stay as they were: old caches still match
        params.update(benchmark=benchmark, glyph_images=os.path.abspath(glyph_images) if glyph_images else None,
                      glyph_background=glyph_background)
    return params


def refuse_to_replace(out: Path) -> None:
    """`synth` rebuilds its own cache (an older or partial synthetic build), never anything
    else: a prepared cache of decoded videos, or a folder holding other files, is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: a file, not a folder; choose another --out")
    meta = out / "meta.json"
    if meta.exists():
        try:
            kind = json.loads(meta.read_text()).get("kind")
        except (OSError, ValueError):
            kind = None
        if kind != "synthetic":
            raise DataError(f"{out} holds a clip cache that `synth` did not make (kind {kind!r}); it would be "
                            f"replaced: choose another --out, or delete it first")
    ours = {"meta.json", "clips.npy", "videos"}
    other = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))
    if other:
        raise DataError(f"{out} is not empty and not a synthetic cache (it holds {', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}): choose another --out")


BENCHMARKS = {  # the built-in benchmarks: what defines a class, how many, whether a flip keeps it
    "actions": "motion only: a path x an action x a partner (128 classes); flips keep the class",
    "glyphs": f"appearance and motion: {GLYPHS} stroke glyphs x {len(GLYPH_MOTIONS)} motions "
              f"({GLYPHS * len(GLYPH_MOTIONS)} classes), ink on paper; a flip makes another glyph",
}


def default_classes(benchmark: str) -> int:
    """How many classes a built-in benchmark has in all (what n_classes=None builds)."""
    return len(synth_class_names()) if benchmark == "actions" else GLYPHS * len(GLYPH_MOTIONS)


def benchmark_names(benchmark: str, n_classes: int | None, seed: int, glyph_images=None):
    """The class names of a built-in benchmark (a seeded subset when n_classes is smaller than
    the whole), and for real glyphs their drawings."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if glyph_images and benchmark != "glyphs":
        raise DataError("glyph images are for the glyphs benchmark (--benchmark glyphs)")
    drawings = None
    if benchmark == "actions":
        names_all = synth_class_names()
        n_classes = n_classes or default_classes(benchmark)
        if not 2 <= n_classes <= len(names_all):
            raise DataError(f"the synthetic grammar has {len(names_all)} classes; n_classes must be "
                            f"2..{len(names_all)}, got {n_classes}")
    else:
        n_motions = len(GLYPH_MOTIONS)
        n_classes = n_classes or default_classes(benchmark)
        if n_classes < n_motions or n_classes % n_motions:
            raise DataError(f"the glyph benchmark's classes are glyphs x {n_motions} motions: n_classes must be a "
                            f"multiple of {n_motions}, got {n_classes}")
        if glyph_images:
            drawings = read_glyph_images(glyph_images, n_classes // n_motions, seed)
            names_all = glyph_class_names(characters=list(drawings))
        else:
            names_all = glyph_class_names(n_classes // n_motions)
    if n_classes == len(names_all):
        return names_all, drawings
    pick = np.random.default_rng(seed).choice(len(names_all), n_classes, replace=False)  # grammar order kept
    return [names_all[i] for i in sorted(pick)], drawings


def build_synthetic(out, n_classes: int | None = None, clips_per_class: int = SYNTH_CLIPS_PER_CLASS,
                    frames: int = 32, size: int = 64, seed: int = 0, write_mp4: bool = False,
                    workers: int | None = None, meta_test_fraction: float = 0.2, val_fraction: float = 0.2,
                    verbose: bool = True, benchmark: str = "actions", glyph_images=None,
                    glyph_background: str = "paper") -> dict:
    """Render a built-in benchmark (`BENCHMARKS`) into the clip-cache format at `out` and return
    its meta. Bitwise reproducible from the arguments (worker count does not matter). With
    `write_mp4` each clip is also written to out/videos/<class>/<k>.mp4, a folder source for
    `prepare`. glyph_images: a folder of <character>/<image> drawings for the glyphs benchmark;
    glyph_background: "paper" or "textured" (render_glyph_clip)."""
    if glyph_background not in GLYPH_BACKGROUNDS:
        raise DataError(f"unknown glyph background {glyph_background!r}; choose one of {', '.join(GLYPH_BACKGROUNDS)}")
    if clips_per_class < 1 or frames < 1 or size < 8:
        raise DataError(f"need clips_per_class >= 1, frames >= 1, size >= 8 (got {clips_per_class}, {frames}, {size})")
    names, drawings = benchmark_names(benchmark, n_classes, seed, glyph_images)
    n_classes = len(names)
    out = Path(out)
    refuse_to_replace(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").exists():  # never leave an old 'complete' meta next to new frames
        (out / "meta.json").unlink()
    t0 = time.time()
    jobs_rows = [(row, name, k) for row, (name, k) in
                 enumerate((n, k) for n in names for k in range(clips_per_class))]
    clips = np.lib.format.open_memmap(out / "clips.npy", mode="w+", dtype=np.uint8,
                                      shape=(len(jobs_rows), frames, size, size, 3))
    del clips  # workers open it themselves
    mp4s = [str(out / "videos" / name.replace(" ", "_") / f"{k:03d}.mp4") if write_mp4 else None
            for _, name, k in jobs_rows]
    chunk = max(1, clips_per_class)
    jobs = [(str(out), jobs_rows[i: i + chunk], seed, frames, size, mp4s[i: i + chunk], benchmark,
             {n.rsplit(" ", 1)[0]: drawings[n.rsplit(" ", 1)[0]] for _, n, _ in jobs_rows[i: i + chunk]}
             if drawings else None, glyph_background)
            for i in range(0, len(jobs_rows), chunk)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    progress = stmeta.Progress(len(jobs_rows), "synth") if verbose else None
    if workers == 1:
        for job in jobs:
            n = _synth_worker(job)
            progress and progress.update(n)
    else:
        import multiprocessing as mp

        # fork where there is one: workers start at once, without re-importing torch
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for n in pool.imap_unordered(_synth_worker, jobs):
                progress and progress.update(n)
    if progress:
        progress.close()

    # actions: held-out classes are new combinations of known primitives; glyphs: a plain seeded
    # class split, as `prepare` makes for any folder of (what, how) classes
    class_split = (_synth_split(names, meta_test_fraction, seed) if benchmark == "actions"
                   else split_classes(names, meta_test_fraction, seed))
    clip_split = split_clips([name for _, name, _ in jobs_rows], [None] * len(jobs_rows), val_fraction, seed)
    entries = [{"path": mp4 or f"synthetic:{name}/{k:03d}", "labels": [name], "source": "synthetic",
                "start": None, "end": None, "split_hint": None, "class_split_hint": None, "status": "ok",
                "length": frames, "error": None, "warning": None, "split": s}
               for (_, name, k), mp4, s in zip(jobs_rows, mp4s, clip_split)]
    meta = {"format_version": FORMAT_VERSION, "kind": "synthetic", "complete": True, "size": size,
            "fps": SYNTH_FPS, "frames": frames, "seed": seed, "meta_test_fraction": meta_test_fraction,
            "val_fraction": val_fraction, "sources": ["synthetic"],
            "synthetic": {"params": _synth_params(n_classes, clips_per_class, frames, size, seed,
                                                  meta_test_fraction, val_fraction, write_mp4, benchmark, glyph_images,
                                                  glyph_background),
                          "benchmark": benchmark, "about": BENCHMARKS[benchmark],
                          "grammar": ({"paths": SYNTH_PATHS, "actions": SYNTH_ACTIONS, "partners": SYNTH_PARTNERS}
                                      if benchmark == "actions" else {"motions": GLYPH_MOTIONS,
                                                                      "glyphs": "drawings" if drawings else "strokes",
                                                                      "background": glyph_background})},
            # a flip turns a glyph into another glyph; the action classes are flip-symmetric
            "flip_changes_class": benchmark == "glyphs",
            "classes": names, "class_split": class_split, "empty_classes": [], "clips": entries}
    _save_meta(out, meta)
    if verbose:
        print(f"synth: {len(entries)} clips in {time.time() - t0:.1f}s with {workers} workers -> {out}")
    return meta


def ensure_synthetic(out, **kw) -> str:
    """The synthetic cache at `out`, built if missing, incomplete or made with other settings;
    otherwise returned at once. train.py calls this when no --data is given."""
    benchmark = kw.get("benchmark", "actions")
    defaults = dict(n_classes=default_classes(benchmark),
                    clips_per_class=SYNTH_CLIPS_PER_CLASS, frames=32, size=64, seed=0,
                    meta_test_fraction=0.2, val_fraction=0.2, write_mp4=False, benchmark="actions", glyph_images=None,
                    glyph_background="paper")
    params = _synth_params(**{**defaults, **{k: v for k, v in kw.items() if k in defaults and v is not None}})
    try:
        cache = ClipCache(out)
        if cache.meta.get("kind") == "synthetic" and cache.meta["synthetic"]["params"] == params:
            return str(out)
    except DataError:
        pass
    build_synthetic(out, **kw)
    return str(out)


# -----------------------------------------------------------------------------
# Loading: T frames at sampling rate r, augmentations identical for every frame, normalisation


def clip_span(num_frames: int, sampling_rate: int) -> int:
    """Cached frames covered by T samples taken every r-th frame."""
    return (num_frames - 1) * sampling_rate + 1


def frame_indices(start: int, num_frames: int, sampling_rate: int, length: int) -> np.ndarray:
    """(T,) cached-frame indices from `start`, every `sampling_rate`-th. Past the clip's true
    end the last real frame repeats, which is what the padded rows hold anyway."""
    return np.minimum(start + sampling_rate * np.arange(num_frames), max(length, 1) - 1)


def view_starts(length: int, span: int, num_views: int) -> list[int]:
    """Evaluation windows: the centred one, or K evenly spaced over the clip's true length."""
    room = max(length - span, 0)
    if num_views == 1:
        return [room // 2]
    return [int(round(s)) for s in np.linspace(0, room, num_views)]


def random_resized_crop_box(H: int, W: int, scale: tuple, ratio: tuple, rng: np.random.Generator):
    """(top, left, h, w) of a crop covering a random `scale` fraction of the frame with a random
    aspect `ratio` (Inception-style, as torchvision and timm draw it); centre crop if 10 draws fail."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    w, h = W, H
    if W / H < ratio[0]:
        h = round(W / ratio[0])
    elif W / H > ratio[1]:
        w = round(H * ratio[1])
    return (H - h) // 2, (W - w) // 2, h, w


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(T, C, h, w) -> (T, C, size, size), bilinear, anti-aliased when shrinking."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    # the anti-aliasing kernel only matters when shrinking, and is slower
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=max(h, w) > size)


# RandAugment (Cubuk et al. 2019) in timm's grammar, which mae_st (paper Table 1) uses: each clip
# gets `n` ops drawn with replacement, each applied with probability 0.5 at magnitude m (out of
# 10) plus N(0, mstd) noise. "inc1" picks the variants whose strength grows with m. Ops run on
# the whole (T, C, H, W) clip at once: every frame gets the same op at the same magnitude.

_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_RAND_OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentPolicy:
    magnitude: float  # m, out of 10
    num_ops: int = 2  # n
    mstd: float = 0.0  # magnitude noise std
    mmax: float = 10.0  # magnitude clip
    prob: float = 0.5  # per op
    ops: tuple = _RAND_OPS


def parse_rand_augment(spec: str) -> RandAugmentPolicy:
    """'rand-m7-mstd0.5-inc1' -> RandAugmentPolicy (timm's grammar: m, n, mstd, mmax, p, inc)."""
    parts = spec.strip().split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise DataError(f"RandAugment policy {spec!r}: expected timm's form rand-m<M>[-n<N>][-mstd<S>][-inc1]")
    kw, inc = {}, False
    names = {"m": "magnitude", "n": "num_ops", "mstd": "mstd", "mmax": "mmax", "p": "prob"}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)
        if not m or m[1] not in (*names, "inc"):
            raise DataError(f"RandAugment policy {spec!r}: unknown part {part!r} (known: m, n, mstd, mmax, p, inc)")
        if m[1] == "inc":
            inc = bool(int(float(m[2])))
        else:
            kw[names[m[1]]] = int(m[2]) if m[1] == "n" else float(m[2])
    if "magnitude" not in kw:
        raise DataError(f"RandAugment policy {spec!r}: needs a magnitude, e.g. m7")
    return RandAugmentPolicy(**kw, ops=_RAND_OPS_INCREASING if inc else _RAND_OPS)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) -> (T, 1, H, W), ITU-R 601 luma as PIL's 'L' mode."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance: factor 0 gives the degenerate image, 1 the original, >1 extrapolates."""
    return (degenerate + factor * (x - degenerate)).clamp(0, 1)


def _affine(x: torch.Tensor, m, fill: float) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, m): output pixel at continuous (u, v) samples the input at
    m @ (u, v, 1), pixel centres at +0.5. Converted to grid_sample's [-1, 1] coordinates; the
    area brought in from outside the frame is filled with `fill`."""
    T, C, H, W = x.shape
    A = torch.tensor([[m[0], m[1]], [m[3], m[4]]], dtype=x.dtype)
    t = torch.tensor([m[2], m[5]], dtype=x.dtype)
    S = torch.tensor([W / 2, H / 2], dtype=x.dtype)  # pixel = S * normalised + S
    theta = torch.cat([A * S[None, :] / S[:, None], ((A @ S + t - S) / S)[:, None]], dim=1)  # (2, 3)
    grid = F.affine_grid(theta.expand(T, 2, 3), [T, C + 1, H, W], align_corners=False)
    out = F.grid_sample(torch.cat([x, x.new_ones(T, 1, H, W)], 1), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[:, :C] + (1 - out[:, C:]) * fill  # last channel: how much of each pixel came from inside


def _rotate(x, degrees, fill):
    """PIL Image.rotate: counter-clockwise about the centre."""
    _, _, H, W = x.shape
    a = -math.radians(degrees)
    cx, cy = W / 2, H / 2
    c, s = math.cos(a), math.sin(a)
    return _affine(x, (c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy), fill)


def _posterize(x, bits):
    if bits >= 8:
        return x
    q = (x * 255).round().to(torch.uint8)
    return (q & ((0xFF << (8 - bits)) & 0xFF)).float() / 255


def _solarize(x, threshold):
    return torch.where((x * 255).round() >= threshold, 1 - x, x)


def _solarize_add(x, add, threshold=128):
    q = (x * 255).round()
    return torch.where(q < threshold, (q + add).clamp(max=255), q) / 255


def _autocontrast(x):
    """Per frame and channel, stretch [min, max] to [0, 1] (PIL ImageOps.autocontrast)."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-8), x)


def _equalize(x):
    """Per frame and channel histogram equalisation, PIL ImageOps.equalize's lookup table."""
    T, C, H, W = x.shape
    q = (x * 255).round().long().reshape(T * C, H * W)
    hist = torch.zeros(T * C, 256).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))  # (TC, 256)
    last = 255 - (hist.flip(1) > 0).float().argmax(1, keepdim=True)  # highest non-empty bin
    step = ((hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255)  # (TC, 1)
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)).clamp(0, 255)  # (TC, 256)
    lut = torch.where(step > 0, lut, torch.arange(256.0))  # a flat image stays as it is
    return (lut.gather(1, q) / 255).view(T, C, H, W)


def _sharpness(x, factor):
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5); the border keeps its pixels."""
    T, C, H, W = x.shape
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x.reshape(T * C, 1, H, W), k.view(1, 1, 3, 3)).view(T, C, H - 2, W - 2)
    return _blend(smooth, x, factor)


def _op(name: str, x: torch.Tensor, m: float, rng: np.random.Generator, fill: float) -> torch.Tensor:
    """One RandAugment op at magnitude m (0..10), with timm's level-to-argument rules."""
    f = m / 10
    neg = -1.0 if rng.random() > 0.5 else 1.0  # timm randomly negates signed magnitudes
    _, _, H, W = x.shape
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 1 - x
    if name == "Rotate":
        return _rotate(x, neg * 30 * f, fill)
    if name == "ShearX":
        return _affine(x, (1, neg * 0.3 * f, 0, 0, 1, 0), fill)
    if name == "ShearY":
        return _affine(x, (1, 0, 0, neg * 0.3 * f, 1, 0), fill)
    if name == "TranslateXRel":
        return _affine(x, (1, 0, neg * 0.45 * f * W, 0, 1, 0), fill)
    if name == "TranslateYRel":
        return _affine(x, (1, 0, 0, 0, 1, neg * 0.45 * f * H), fill)
    if name.startswith("Posterize"):
        return _posterize(x, 4 - int(f * 4) if name.endswith("Increasing") else int(f * 4))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return _solarize(x, 256 - int(f * 256) if name.endswith("Increasing") else int(f * 256))
    if name == "SolarizeAdd":
        return _solarize_add(x, int(f * 110))
    # the enhancers: 'Increasing' variants move away from 1 (no change) as m grows
    factor = max(0.1, 1 + neg * 0.9 * f) if name.endswith("Increasing") else 1.8 * f + 0.1
    if name.startswith("Color"):
        return _blend(_gray(x).expand_as(x), x, factor)
    if name.startswith("Contrast"):
        return _blend(_gray(x).mean((2, 3), keepdim=True).expand_as(x), x, factor)
    if name.startswith("Brightness"):
        return _blend(torch.zeros_like(x), x, factor)
    if name.startswith("Sharpness"):
        return _sharpness(x, factor)
    raise ValueError(name)


def rand_augment(x: torch.Tensor, policy: RandAugmentPolicy, rng: np.random.Generator,
                 fill: float = MEAN[0]) -> torch.Tensor:
    """(T, C, H, W) in [0, 1] -> the same, RandAugment'ed identically in every frame."""
    for i in rng.choice(len(policy.ops), policy.num_ops):  # with replacement, as timm
        if rng.random() > policy.prob:
            continue
        m = policy.magnitude
        if policy.mstd > 0:
            m = rng.normal(m, policy.mstd)
        x = _op(policy.ops[i], x, min(policy.mmax, max(0.0, m)), rng, fill)
    return x


def random_erase(x: torch.Tensor, rng: np.random.Generator, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017; timm's 'pixel' mode as mae_st uses it) on a normalised
    (T, C, H, W) clip: one box of N(0, 1) noise, the same box and noise in every frame."""
    T, C, H, W = x.shape
    for _ in range(10):
        target = H * W * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < H and 0 < w < W:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            x = x.clone()
            x[:, :, top: top + h, left: left + w] = torch.from_numpy(rng.standard_normal((C, h, w), dtype=np.float32))
            return x
    return x


class ClipDataset(torch.utils.data.Dataset):
    """Clips of a ClipCache as normalised float tensors (C, T, size, size), with their label.

    Train: a random window of T frames every `sampling_rate`-th, random resized crop, flip,
    RandAugment, random erasing. Eval: the centred window (or `num_views` evenly spaced ones,
    stacked to (V, C, T, size, size)), resized. Randomness is a pure function of
    (seed, epoch, index), so it does not depend on the number of DataLoader workers and a
    resumed run sees the same clips; call set_epoch() before each epoch (and do not use
    persistent_workers, which would keep a stale epoch in the workers).
    """

    def __init__(self, cache: ClipCache, indices, num_frames: int, sampling_rate: int, size: int, train: bool, *,
                 rand_augment: str = "", random_erase: float = 0.0, scale_min: float = 0.5, hflip: bool = True,
                 num_views: int = 1, label_map: dict[int, int] | None = None, seed: int = 0):
        if num_frames < 1 or sampling_rate < 1 or num_views < 1 or size < 1:
            raise DataError(f"need num_frames, sampling_rate, num_views, size >= 1 "
                            f"(got {num_frames}, {sampling_rate}, {num_views}, {size})")
        if not 0 < scale_min <= 1:
            raise DataError(f"scale_min must be in (0, 1], got {scale_min}")
        self.cache, self.indices = cache, np.asarray(indices, dtype=np.int64)
        self.num_frames, self.sampling_rate, self.size, self.train = num_frames, sampling_rate, size, train
        self.policy = parse_rand_augment(rand_augment) if rand_augment else None
        self.random_erase, self.scale_min, self.hflip, self.num_views = random_erase, scale_min, hflip, num_views
        self.label_map, self.seed, self.epoch = label_map, seed, 0
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = int(self.indices[i])
        length = int(self.cache.lengths[idx])
        span = clip_span(self.num_frames, self.sampling_rate)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)]) if self.train else None
        if self.train:
            starts = [int(rng.integers(0, max(length - span, 0) + 1))]
        else:
            starts = view_starts(length, span, self.num_views)
        views = [self._view(idx, s, length, rng) for s in starts]
        video = views[0] if len(views) == 1 and self.num_views == 1 else torch.stack(views)  # (C,T,S,S) | (V,C,T,S,S)
        label = int(self.cache.labels[idx])
        if self.label_map is not None:
            label = self.label_map.get(label, -1)
        return video, torch.tensor(label, dtype=torch.int64)

    def _view(self, idx: int, start: int, length: int, rng: np.random.Generator | None) -> torch.Tensor:
        frames = self.cache.clips[idx, frame_indices(start, self.num_frames, self.sampling_rate, length)]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
        if self.train:  # crop while still uint8: fewer bytes to convert
            _, _, H, W = x.shape
            top, left, h, w = random_resized_crop_box(H, W, (self.scale_min, 1.0), (3 / 4, 4 / 3), rng)
            x = resize(x[:, :, top: top + h, left: left + w].float().div_(255), self.size)
            if self.hflip and rng.random() < 0.5:
                x = x.flip(-1)
            if self.policy is not None:
                x = rand_augment(x, self.policy, rng)
        else:
            x = resize(x.float().div_(255), self.size)
        x = x.sub_(self.mean).div_(self.std)  # in place: x is this call's own float copy
        if self.train and self.random_erase > 0 and rng.random() < self.random_erase:
            x = random_erase(x, rng)
        return x.permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)


def mixup_cutmix(video: torch.Tensor, target: torch.Tensor, num_classes: int, mixup_alpha: float,
                 cutmix_alpha: float, prob: float, smoothing: float, generator: torch.Generator):
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) with label smoothing, as timm's Mixup:
    each batch is mixed with its reverse with probability `prob`, by CutMix or mixup (half each
    when both alphas are > 0); the CutMix box is the same in every frame and lambda is corrected
    to the box's true area. video (B, C, T, H, W), target (B,) -> (video, soft target (B, classes))."""
    off = smoothing / num_classes
    y = F.one_hot(target, num_classes).float() * (1 - smoothing) + off  # (B, classes), rows sum to 1
    if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return video, y
    if torch.rand((), generator=generator).item() >= prob:
        return video, y
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch has no Beta sampler that takes a Generator: seed numpy's from it
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    other = video.flip(0)
    if use_cutmix:
        H, W = video.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(torch.randint(0, H, (), generator=generator)), int(torch.randint(0, W, (), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        video = video * lam + other * (1 - lam)
    return video, y * lam + y.flip(0) * (1 - lam)


# -----------------------------------------------------------------------------
# Batching: seeded epoch orders and the DataLoader the training loops and benchmarks share


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
                  ) -> list[list[int]]:
    """A seeded permutation of range(n) per epoch, cut into this rank's batches (dropping the
    ragged end). The order depends only on (seed, epoch), so a resumed run can skip straight
    to where it stopped without loading anything."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // world_size
    mine = perm[rank * per_rank:(rank + 1) * per_rank] if world_size > 1 else perm
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def loader(dataset, batches, workers: int, seed: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader over precomputed index batches (any iterable of index lists); pinned memory
    on CUDA for asynchronous copies."""
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
    # RNG, so a resumed run (which opens one more loader) would drift from an uninterrupted one.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False,
                                       prefetch_factor=4 if workers > 0 else None,
                                       generator=torch.Generator().manual_seed(seed))


class StepClips(ClipDataset):
    """The clips of one training step, for end-to-end stage 3: item (step, i) is clip i of
    the cache augmented with randomness that is a pure function of (seed, step, i), so a
    DataLoader's workers can prepare whole steps ahead and a resumed run sees the same clips."""

    def __getitem__(self, key):
        step, i = key
        self.epoch = step  # this worker's own copy: no effect on other workers
        return super().__getitem__(i)


# -----------------------------------------------------------------------------
# Episodes: N-way K-shot tasks for the MANN (Santoro et al. 2016, arXiv 1605.06065)


class Episode(NamedTuple):
    """A batch of episodes; every field is (B, S). `clips` index the cache."""

    clips: torch.Tensor  # long, indices into the cache
    target: torch.Tensor  # long in [0, n_way): the episode label of each step
    label_in: torch.Tensor  # long: the label shown to the model at that step, -1 = hidden
    is_query: torch.Tensor  # bool: the steps that are scored
    instance: torch.Tensor  # long: how many times this step's class was shown (labelled) before
    rotation: torch.Tensor  # long in 0..3: quarter turns of the step's clip (its class's rotation)
    down: torch.Tensor  # long: the clip's translation in pixels, down (negative: up) ...
    right: torch.Tensor  # ... and right (negative: left)

    def to(self, device, non_blocking: bool = True) -> "Episode":
        return Episode(*[t.to(device, non_blocking=non_blocking) for t in self])


class EpisodeSampler:
    """N-way K-shot episodes over a pool of clips and classes, driven by a torch.Generator, so
    the same generator seed gives the same evaluation episodes for every run and model.

    layout "support_query": N*K support steps (labels shown) then N*Q queries (labels hidden),
    each part in shuffled order (a fixed order would let a model learn positions, not content).
    layout "sequence" (Santoro): N*seq_shots steps in shuffled order, step t shows the label of
    step t-1 (label_in[0] = -1), all steps scored.
    Each episode assigns labels 0..N-1 to its classes in random order. A multi-label clip is in
    the pool of each of its classes, but never stands for class c in an episode that also
    contains another of its labels.

    Santoro's augmentation (sec. 4.1), drawn for every episode: with `rotations` each class also
    exists turned by 90, 180 and 270 degrees, as three more classes (an episode may hold a class
    and its rotation: they are different classes), and every step's clip is translated by up to
    `max_shift` pixels. The episode only says how (`rotation`, `down`, `right`); `augment_clips`
    does it.
    """

    def __init__(self, cache_or_labels, pool_indices, classes, n_way: int, k_shot: int, n_query: int,
                 layout: str = "support_query", seq_shots: int = 10, drop_small: bool = False,
                 rotations: bool = False, max_shift: int = 0):
        if layout not in ("support_query", "sequence"):
            raise DataError(f"episode layout must be 'support_query' or 'sequence', got {layout!r}")
        if n_way < 1 or (layout == "support_query" and (k_shot < 1 or n_query < 0)) or seq_shots < 1:
            raise DataError(f"need n_way >= 1, k_shot >= 1, n_query >= 0, seq_shots >= 1 "
                            f"(got {n_way}, {k_shot}, {n_query}, {seq_shots})")
        if max_shift < 0:
            raise DataError(f"max_shift must be >= 0 pixels, got {max_shift}")
        if isinstance(cache_or_labels, ClipCache):
            all_labels, self.class_names = cache_or_labels.all_labels, cache_or_labels.classes
        else:  # a list of label lists, or one label per clip (-1 = unlabelled)
            all_labels = [list(x) if isinstance(x, (list, tuple, set)) else ([int(x)] if int(x) >= 0 else [])
                          for x in cache_or_labels]
            self.class_names = None
        self.n_way, self.k_shot, self.n_query, self.layout, self.seq_shots = n_way, k_shot, n_query, layout, seq_shots
        self.rotations, self.max_shift = rotations, max_shift
        self.per_class = k_shot + n_query if layout == "support_query" else seq_shots
        pool = np.unique(np.asarray(pool_indices, dtype=np.int64))
        self.clip_labels = {int(i): frozenset(all_labels[i]) for i in pool}
        classes = [int(c) for c in classes]
        self.pools = {c: np.array([i for i in pool if c in self.clip_labels[int(i)]], dtype=np.int64) for c in classes}
        small = [c for c in classes if len(self.pools[c]) < self.per_class]
        if small and not drop_small:
            c = small[0]
            more = f" ({len(small) - 1} more classes are short too)" if len(small) > 1 else ""
            n = len(self.pools[c])
            raise DataError(f"class {self._name(c)} has {n} clip{'' if n == 1 else 's'} in this pool; {self._need()} "
                            f"needs {self.per_class} per class{more}")
        self.dropped = small
        self.classes = [c for c in classes if c not in small]
        # the classes an episode draws from: (class, quarter turns); rotated copies are classes of their own
        self.variants = [(c, r) for c in self.classes for r in (range(4) if rotations else (0,))]
        if len(self.variants) < n_way:
            raise DataError(f"only {len(self.classes)} classes with at least {self.per_class} clips in this pool; "
                            f"{self._need()} needs {n_way} classes")
        self.multi_label = any(len(s) > 1 for s in self.clip_labels.values())

    def _name(self, c: int) -> str:
        return f"{self.class_names[c]!r} ({c})" if self.class_names else str(c)

    def _need(self) -> str:
        if self.layout == "support_query":
            return f"a {self.n_way}-way {self.k_shot}-shot episode with {self.n_query} {'query' if self.n_query == 1 else 'queries'} per class"
        return f"a {self.n_way}-way sequence episode with {self.seq_shots} shots per class"

    @property
    def steps(self) -> int:
        """S, the episode length."""
        return self.n_way * self.per_class

    def _draw(self, generator: torch.Generator) -> tuple[list[np.ndarray], list[int]]:
        """Classes for one episode (their order is the label assignment), per_class clips each,
        and each class's quarter turns."""
        for _ in range(100):
            chosen = [self.variants[j] for j in torch.randperm(len(self.variants), generator=generator)[: self.n_way]]
            picks = []
            for c, _r in chosen:
                cand = self.pools[c]
                if self.multi_label:  # not as class c if it also shows another class of the episode
                    others = {o for o, _ in chosen} - {c}
                    cand = cand[[not (self.clip_labels[int(i)] & others) for i in cand]]
                if len(cand) < self.per_class:
                    break
                picks.append(cand[torch.randperm(len(cand), generator=generator)[: self.per_class].numpy()])
            else:
                return picks, [r for _, r in chosen]
        raise DataError(f"could not draw {self._need()} in 100 tries: multi-label clips overlap too much once "
                        f"clips sharing two classes of an episode are set aside")

    def sample(self, batch_size: int, generator: torch.Generator) -> Episode:
        """batch_size episodes -> Episode with (B, S) fields. `generator` must be a CPU generator."""
        fields = [[] for _ in range(len(Episode._fields))]
        for _ in range(batch_size):
            picks, turns = self._draw(generator)  # picks[label] = (per_class,) clip indices
            steps = self._layout(picks, generator)
            clips, target = steps[0], steps[1]
            rotation = torch.tensor(turns, dtype=torch.int64)[target]  # (S,)
            if self.max_shift > 0:
                shift = torch.randint(-self.max_shift, self.max_shift + 1, (2, len(clips)), generator=generator)
            else:
                shift = torch.zeros(2, len(clips), dtype=torch.int64)
            for f, v in zip(fields, (*steps, rotation, *shift)):
                f.append(v)
        return Episode(*(torch.stack(f) for f in fields))

    def _layout(self, picks: list[np.ndarray], g: torch.Generator):
        N = self.n_way
        if self.layout == "support_query":
            K, Q = self.k_shot, self.n_query
            sup = [(p[k], lab) for lab, p in enumerate(picks) for k in range(K)]
            qry = [(p[K + q], lab) for lab, p in enumerate(picks) for q in range(Q)]
            sup = [sup[j] for j in torch.randperm(len(sup), generator=g)]
            qry = [qry[j] for j in torch.randperm(len(qry), generator=g)]
            steps = sup + qry
            target = torch.tensor([lab for _, lab in steps], dtype=torch.int64)
            is_query = torch.arange(len(steps)) >= len(sup)
            label_in = torch.where(is_query, -1, target)
            seen = [0] * N
            instance = []
            for _, lab in sup:  # support: 0, 1, ... K-1 per class; queries: K (all shown)
                instance.append(seen[lab])
                seen[lab] += 1
            instance += [K] * len(qry)
        else:
            steps = [(p[k], lab) for lab, p in enumerate(picks) for k in range(self.seq_shots)]
            steps = [steps[j] for j in torch.randperm(len(steps), generator=g)]
            target = torch.tensor([lab for _, lab in steps], dtype=torch.int64)
            label_in = torch.cat([torch.tensor([-1]), target[:-1]])  # x_t comes with y_{t-1}
            is_query = torch.ones(len(steps), dtype=torch.bool)
            seen, instance = [0] * N, []
            for _, lab in steps:
                instance.append(seen[lab])
                seen[lab] += 1
        clips = torch.tensor([int(c) for c, _ in steps], dtype=torch.int64)
        return clips, target, label_in, is_query, torch.tensor(instance, dtype=torch.int64)


class ShotMix:
    """Support/query episodes whose shot count K varies from batch to batch: each `sample` draws
    one K uniformly from the samplers' (with the same generator, so a batch stays a pure function
    of its seed), then a batch of that sampler's episodes. A MANN meta-trained on 1-shot episodes
    alone meets 5 x as many support steps at 5-shot as it ever saw, and does worse there than
    nearest class mean; trained on K = 1..5 it has seen every length it is tested on."""

    def __init__(self, samplers: list[EpisodeSampler]):
        if not samplers or any(s.layout != "support_query" for s in samplers):
            raise DataError("mixing shot counts needs one or more support/query samplers")
        self.samplers = samplers
        self.k_shots = [s.k_shot for s in samplers]

    @property
    def steps(self) -> int:
        """The longest episode's length."""
        return max(s.steps for s in self.samplers)

    def sample(self, batch_size: int, generator: torch.Generator) -> Episode:
        j = int(torch.randint(len(self.samplers), (1,), generator=generator))
        return self.samplers[j].sample(batch_size, generator)


class ViewEpisodes(EpisodeSampler):
    """Episodes whose classes are single clips and whose instances are augmented views of them
    (Khodadadeh et al. 2019, UMTRA: unsupervised meta-learning with tasks constructed by random
    sampling and augmentation), so clips without labels meta-train the MANN too: each episode
    draws n_way distinct clips of `pool`, gives each a label, and shows k_shot + n_query distinct
    views of each (support and query are never the same view: the query is another window and
    crop of a clip the support holds). A step's index encodes (view v, clip i) as
    n_clips * (1 + v) + i, above every cache index, so an episode can sit in one batch source
    with labelled episodes; `split_view_index` decodes it."""

    def __init__(self, pool_indices, n_clips: int, n_views: int, n_way: int, k_shot: int, n_query: int,
                 layout: str = "support_query", seq_shots: int = 10):
        if layout not in ("support_query", "sequence"):
            raise DataError(f"episode layout must be 'support_query' or 'sequence', got {layout!r}")
        self.n_way, self.k_shot, self.n_query, self.layout, self.seq_shots = n_way, k_shot, n_query, layout, seq_shots
        self.max_shift = 0  # sample() reads it: view episodes are never translated
        self.per_class = k_shot + n_query if layout == "support_query" else seq_shots
        if self.per_class > n_views:
            raise DataError(f"view episodes: {self._need()} shows {self.per_class} distinct views of each clip, "
                            f"and each clip has {n_views}")
        self.pool = np.unique(np.asarray(pool_indices, dtype=np.int64))
        if len(self.pool) < n_way:
            raise DataError(f"view episodes: {len(self.pool)} clips in the pool; {self._need()} needs {n_way}")
        self.n_clips, self.n_views = int(n_clips), int(n_views)

    def _draw(self, generator: torch.Generator) -> tuple[list[np.ndarray], list[int]]:
        chosen = self.pool[torch.randperm(len(self.pool), generator=generator)[: self.n_way].numpy()]
        picks = [self.n_clips * (1 + torch.randperm(self.n_views, generator=generator)[: self.per_class].numpy()) + c
                 for c in chosen]
        return picks, [0] * self.n_way


def split_view_index(clips: torch.Tensor, n_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ViewEpisodes' step indices (any shape) -> (view, clip), each that shape; a plain cache index
    (< n_clips) -> (-1, itself)."""
    virtual = clips >= n_clips
    view = torch.where(virtual, clips // n_clips - 1, -1)
    return view, torch.where(virtual, clips % n_clips, clips)


class EpisodeMix:
    """Batches from several episode sources (EpisodeSampler or ShotMix): each `sample` draws
    source j with probability weights[j] (with the batch's generator, so a batch stays a pure
    function of its seed), then a batch of that source's episodes. Meta-training on the labelled
    clips' episodes and on cluster episodes of the unlabelled ones (`cluster_labels`) mixes two."""

    def __init__(self, parts: list, weights: list[float]):
        if len(parts) != len(weights) or not parts or min(weights) < 0 or sum(weights) <= 0:
            raise DataError(f"an episode mix needs one non-negative weight per source, got {weights}")
        self.parts = parts
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    @property
    def steps(self) -> int:
        """The longest episode's length."""
        return max(p.steps for p in self.parts)

    def sample(self, batch_size: int, generator: torch.Generator) -> Episode:
        j = int(torch.multinomial(self.weights, 1, generator=generator))
        return self.parts[j].sample(batch_size, generator)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means on the rows of x (n, d), seeded by k-means++ (Arthur & Vassilvitskii 2007:
    each new centre drawn with probability proportional to its squared distance from the nearest
    chosen one): (n,) cluster ids in [0, k). A centre left with no points keeps its place. On x's
    device; deterministic for a seed."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise DataError(f"k-means: {k} clusters asked of {n} points")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)]
    d2 = ((x - centres) ** 2).sum(1)
    for _ in range(1, k):
        j = torch.multinomial(d2.cpu().double().clamp_min(0) + 1e-30, 1, generator=g)
        centres = torch.cat([centres, x[j]])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def cluster_labels(emb: torch.Tensor, pool, k: int, seed: int) -> np.ndarray:
    """Pseudo-labels for meta-training without labels (Hsu et al. 2019, CACTUs: clusters of an
    unsupervised embedding stand in for classes): k-means on the pool's embeddings, each
    LayerNorm'ed and scaled to unit length (the cosine the nearest-class-mean baseline uses).
    emb (N, D) for every clip of the cache -> (N,) cluster ids, -1 outside the pool."""
    pool = np.asarray(pool, dtype=np.int64)
    z = F.normalize(F.layer_norm(emb[torch.as_tensor(pool)].float(), emb.shape[-1:]), dim=-1)
    out = np.full(emb.shape[0], -1, dtype=np.int64)
    out[pool] = kmeans(z, k, seed).cpu().numpy()
    return out


def augment_clips(video: torch.Tensor, rotation: torch.Tensor, down: torch.Tensor, right: torch.Tensor
                  ) -> torch.Tensor:
    """Turn and translate each clip as its episode step says (EpisodeSampler): video
    (n, C, T, H, W) with H == W, rotation (n,) quarter turns counter-clockwise (torch.rot90's
    sense), then a shift by down, right (n,) pixels with the edges replicated -> (n, C, T, H, W).
    Every frame of a clip alike; on the video's device, for the whole batch at once (one gather,
    no Python loop over clips)."""
    n, C, T, H, W = video.shape
    if H != W and bool((rotation % 2).any()):
        raise DataError(f"quarter turns need square frames, got {H}x{W}")
    dev = video.device
    rotation = rotation.to(dev) % 4
    # source pixel (r, c) of each output pixel (i, j): undo the shift, then the turn
    i = torch.arange(H, device=dev).view(1, H, 1) - down.to(dev).view(n, 1, 1)  # (n, H, 1)
    j = torch.arange(W, device=dev).view(1, 1, W) - right.to(dev).view(n, 1, 1)  # (n, 1, W)
    i, j = i.clamp(0, H - 1).expand(n, H, W), j.clamp(0, W - 1).expand(n, H, W)  # replicated edges
    k = rotation.view(n, 1, 1)
    # torch.rot90(x, k, dims=(-2, -1)) maps output (i, j) to input: k=1 (j, W-1-i), k=2 (H-1-i, W-1-j), k=3 (H-1-j, i)
    r = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, H - 1 - i, W - 1 - j)))
    c = torch.where(k == 0, j, torch.where(k == 1, W - 1 - i, torch.where(k == 2, W - 1 - j, i)))
    flat = (r * W + c).view(n, 1, 1, H * W).expand(n, C, T, H * W)  # (n, C, T, H*W)
    return video.reshape(n, C, T, H * W).gather(3, flat).view(n, C, T, H, W)


# -----------------------------------------------------------------------------
# Command line: python data.py synth | prepare | info


def info(root) -> str:
    """What `python data.py info DIR` prints: the summary, classes with their clip counts per
    split, and the failure report."""
    cache = ClipCache(root)
    grey = "yes, every decoded frame has R == G == B" if cache.grey else "no"
    flips = ("change the class (this benchmark says so): train.py leaves them off" if cache.flip_changes_class else
             "keep the class, as far as the cache knows" + (" (but see the warning on direction-named classes)"
                                                          if direction_classes(cache.classes) else ""))
    lines = [cache.summary(), f"grey: {grey}", f"horizontal flips: {flips}", "",
             f"{'class':40s} {'meta split':10s} {'train':>6s} {'val':>6s}"]
    for c, name in enumerate(cache.classes):
        mine = cache.valid & (cache.labels == c)
        n_train = int((mine & (cache.clip_split == "train")).sum())
        n_val = int((mine & (cache.clip_split == "val")).sum())
        lines.append(f"{name[:40]:40s} {cache.class_split[c]:10s} {n_train:6d} {n_val:6d}")
    multi = sum(len(ls) > 1 for ls in cache.all_labels)
    if multi:
        lines.append(f"({multi} multi-label clips are counted under their first label)")
    lines += ["", failure_report(cache.meta)]
    return "\n".join(lines)


def bench_loader(root, num_frames: int = 16, sampling_rate: int = 4, size: int = 64, rand_augment: str = "",
                 random_erase: float = 0.0, workers: int = 2, batch_size: int = 16, batches: int = 100) -> float:
    """Clips per second a DataLoader delivers from a cache with training augmentation (what
    `python data.py bench` prints; compare with the clips/s a training step consumes)."""
    cache = ClipCache(root)
    ds = ClipDataset(cache, cache.indices("train", labelled_only=False), num_frames, sampling_rate, size, train=True,
                     rand_augment=rand_augment, random_erase=random_erase)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch_size * (batches + 2))
    it = iter(torch.utils.data.DataLoader(ds, batch_size, sampler=sampler, num_workers=workers))
    next(it), next(it)  # workers started and warm
    t0 = time.time()
    n = sum(len(video) for video, _ in it)
    return n / (time.time() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="build a built-in benchmark (the synthetic actions, or glyphs)")
    s.add_argument("--out", required=True, help="cache directory to write (clips.npy + meta.json)")
    s.add_argument("--benchmark", default="actions", choices=sorted(BENCHMARKS),
                   help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()) + " (default actions)")
    s.add_argument("--glyph-images", default=None, metavar="DIR",
                   help="glyphs: draw real characters from a folder of <class>/<image> files (e.g. Omniglot's "
                        "images_background) instead of procedural strokes")
    s.add_argument("--glyph-background", default="paper", choices=GLYPH_BACKGROUNDS,
                   help="glyphs: dark ink on plain paper (default), or the action benchmark's coloured textures "
                        "(a harder nuisance)")
    s.add_argument("--classes", type=int, default=None,
                   help="number of classes (default all: 128 actions, 120 glyphs; glyphs take a multiple of 5)")
    s.add_argument("--clips-per-class", type=int, default=SYNTH_CLIPS_PER_CLASS,
                   help=f"clips per class (default {SYNTH_CLIPS_PER_CLASS}; 16 proved too few to learn from)")
    s.add_argument("--frames", type=int, default=32, help="frames per clip at 10 FPS (default 32)")
    s.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="everything random derives from it (default 0)")
    s.add_argument("--meta-test-fraction", type=float, default=0.2, help="classes held out for meta-test (default 0.2)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="clips per class for validation (default 0.2)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    s.add_argument("--mp4", action="store_true", help="also write every clip as OUT/videos/<class>/<k>.mp4")

    r = sub.add_parser("prepare", help="decode real videos (and images) into a clip cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="source kinds:\n  " + "\n  ".join(SOURCE_KINDS.values()))
    r.add_argument("--source", action="append", required=True, metavar="KIND:PATH[:ANNOTATIONS]",
                   help="a video or image source (repeatable; several sources make one composite dataset)")
    r.add_argument("--out", required=True, help="cache directory; an existing one is resumed")
    r.add_argument("--size", type=int, default=64, help="frame side after short-side resize + centre crop (default 64)")
    r.add_argument("--fps", type=float, default=10, help="frame rate to resample to (default 10, paper 4.1)")
    r.add_argument("--frames", type=int, default=None,
                   help="frames per clip; longer clips keep the centre or the annotated window, shorter ones (and "
                        "images) are padded (default 100; 1 when every file is an image)")
    r.add_argument("--workers", type=int, default=None,
                   help="parallel decoders: ffmpeg processes for videos, threads for images (default: one per CPU core)")
    r.add_argument("--seed", type=int, default=0, help="for the class and clip splits (default 0)")
    r.add_argument("--meta-test-fraction", type=float, default=0.2, help="classes held out for meta-test (default 0.2)")
    r.add_argument("--val-fraction", type=float, default=0.2, help="clips per class for validation (default 0.2)")
    r.add_argument("--split-list", action="append", default=[], metavar="[meta_train=|meta_test=]FILE",
                   help="take the class split from a list (a line is a class, e.g. `juggling` or "
                        "`Alphabet_of_the_Magi/character01`, a folder of classes, or `class/file`); listed classes get "
                        "that split, all others meta-train; without a prefix, a file named *test* is meta-test")
    r.add_argument("--class-list", default=None, metavar="FILE",
                   help="allowed class names, one a line (e.g. label_map_k400.txt); integer labels in list files "
                        "index into it; rows with other labels are reported as failures")
    r.add_argument("--retry-failed", action="store_true", help="when resuming, try the failed files again")

    i = sub.add_parser("info", help="print a cache's classes, split counts and failures")
    i.add_argument("dir", help="cache directory")

    b = sub.add_parser("bench", help="measure how many clips/s the loader delivers from a cache")
    b.add_argument("dir", help="cache directory")
    b.add_argument("--frames", type=int, default=16, help="T, frames per sampled clip (default 16, Table 1)")
    b.add_argument("--rate", type=int, default=4, help="r, sampling rate (default 4, Table 1)")
    b.add_argument("--size", type=int, default=64, help="output side in pixels (default 64)")
    b.add_argument("--rand-augment", default="", help="RandAugment policy, e.g. rand-m7-mstd0.5-inc1 (default off)")
    b.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability (default 0)")
    b.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")

    args = p.parse_args(argv)
    try:
        if args.cmd == "synth":
            build_synthetic(args.out, n_classes=args.classes, clips_per_class=args.clips_per_class, frames=args.frames,
                            size=args.size, seed=args.seed, write_mp4=args.mp4, workers=args.workers,
                            meta_test_fraction=args.meta_test_fraction, val_fraction=args.val_fraction,
                            benchmark=args.benchmark, glyph_images=args.glyph_images,
                            glyph_background=args.glyph_background)
            print(ClipCache(args.out).summary())
        elif args.cmd == "prepare":
            prepare(args.source, args.out, size=args.size, fps=args.fps, frames=args.frames, workers=args.workers,
                    seed=args.seed, meta_test_fraction=args.meta_test_fraction, val_fraction=args.val_fraction,
                    split_lists=args.split_list, class_list=args.class_list, retry_failed=args.retry_failed)
        elif args.cmd == "bench":
            rate = bench_loader(args.dir, args.frames, args.rate, args.size, args.rand_augment, args.random_erase,
                                args.workers)
            print(f"{rate:.0f} clips/s (T={args.frames}, r={args.rate}, {args.size} px, train augmentation"
                  f"{', ' + args.rand_augment if args.rand_augment else ''}"
                  f"{f', erase {args.random_erase}' if args.random_erase else ''}; {args.workers} workers, "
                  f"{os.cpu_count()} CPU cores)")
        else:
            print(info(args.dir))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `python data.py info DIR | head` ends quietly, as other tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
