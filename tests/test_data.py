"""Tests for data.py: decoding, source readers, the clip cache, the synthetic benchmark, loading,
augmentation and episodes. Every fixture is written here (mp4 through imageio, a GIF, images in
every Pillow mode, CSV, JSON, list files); the real clips and Omniglot in ../shared/data are used
when present and skipped otherwise.

    python -m pytest tests/test_data.py -q --durations=10
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError, DecodeError  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# -----------------------------------------------------------------------------
# fixtures: videos written through imageio


def write_video(path, frames: np.ndarray, fps: float = 30, **kw) -> Path:
    """(n, H, W, 3) uint8 -> an H.264 mp4 (or a GIF when path ends in .gif)."""
    import imageio.v2 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        iio.mimwrite(path, list(frames), duration=1 / fps, loop=0)
    else:
        iio.mimwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error", **kw)
    return path


def ramp(n: int, h: int = 48, w: int = 80, step: int = 4) -> np.ndarray:
    """n solid grey frames, frame k of value step*k: a frame's value says where it came from."""
    v = (np.arange(n) * step).astype(np.uint8)
    return np.broadcast_to(v[:, None, None, None], (n, h, w, 3)).copy()


def noise_clip(n: int, seed: int, h: int = 36, w: int = 48) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A small folder-per-class tree plus broken files, shared by the module's tests."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "Playing_Guitar" / "a.mp4", noise_clip(30, 0), fps=30)  # 1 s -> 10 frames
    write_video(root / "Playing_Guitar" / "b.mp4", noise_clip(45, 1), fps=30)
    write_video(root / "juggling" / "c.mp4", noise_clip(60, 2), fps=30)
    write_video(root / "juggling" / "d.gif", noise_clip(12, 3, 32, 32), fps=10)
    write_video(root / "juggling" / "e.mp4", noise_clip(20, 4), fps=20)
    (root / "juggling" / "corrupt.mp4").write_bytes(os.urandom(4000))
    (root / "juggling" / "empty.avi").write_bytes(b"")
    (root / "juggling" / "notes.txt").write_text("not a video, ignored")
    (root / "empty_class").mkdir()
    write_video(root / "loose.mp4", noise_clip(10, 5), fps=10)  # not in a class folder
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny synthetic cache: 10 classes x 6 clips x 12 frames x 16 px."""
    out = tmp_path_factory.mktemp("synth")
    data.build_synthetic(out, n_classes=10, clips_per_class=6, frames=12, size=16, seed=3, workers=1, verbose=False)
    return data.ClipCache(out)


# -----------------------------------------------------------------------------
# decoding


def test_decode_resamples_frame_rate_and_resizes(tmp_path):
    # 60 frames at 30 FPS = 2 s -> 20 frames at 10 FPS; output frame i is source frame 3i
    path = write_video(tmp_path / "ramp.mp4", ramp(60), fps=30)
    video, length = data.decode_video(path, size=32, fps=10, frames=20)
    assert video.shape == (20, 32, 32, 3) and video.dtype == np.uint8 and length == 20
    np.testing.assert_allclose(video.mean((1, 2, 3)), 12 * np.arange(20), atol=4)


def test_decode_centre_window_and_annotated_window(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", ramp(60), fps=30)
    video, length = data.decode_video(path, size=16, fps=10, frames=10)  # centre 10 of 20: frames 5..14
    assert length == 10
    np.testing.assert_allclose(video.mean((1, 2, 3)), 12 * np.arange(5, 15), atol=4)
    video, length = data.decode_video(path, size=16, fps=10, frames=10, start=1.0, end=1.5)  # source 30..44
    assert length == 5
    np.testing.assert_allclose(video[:5].mean((1, 2, 3)), 12 * np.arange(10, 15), atol=4)
    assert (video[5:] == video[4]).all()  # padded with the last real frame


def test_a_file_shorter_than_its_window_is_the_cut_clip(tmp_path):
    # Kinetics mirrors often store the trimmed 10 s as {youtube_id}.mp4: its CSV window
    # (417..427 s) cannot lie inside a 2 s file, so the whole file is the clip
    path = write_video(tmp_path / "ytid.mp4", ramp(60), fps=30)
    video, length = data.decode_video(path, size=16, fps=10, frames=20, start=417, end=427)
    assert length == 20
    np.testing.assert_allclose(video.mean((1, 2, 3)), 12 * np.arange(20), atol=4)


def test_decode_short_clip_is_padded_with_its_last_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", ramp(9), fps=30)  # 0.3 s -> 3 frames at 10 FPS
    video, length = data.decode_video(path, size=16, fps=10, frames=8)
    assert length == 3 and video.shape == (8, 16, 16, 3)
    assert (video[3:] == video[2]).all() and not (video[0] == video[2]).all()


def test_decode_honours_display_aspect_ratio(tmp_path):
    # stored 32x32, shown 64x32 (sample aspect 2:1). Quarters red, green, blue, white: the
    # centre square of the *displayed* frame holds only green and blue.
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    for q, col in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        frames[:, :, q * 8: (q + 1) * 8] = col
    path = write_video(tmp_path / "sar.mp4", frames, fps=10, output_params=["-aspect", "2:1"])
    video, _ = data.decode_video(path, size=16, fps=10, frames=5)
    row = video[0, 8].astype(int)  # (W, 3)
    assert (row[:6, 1] > 200).all() and (row[-6:, 2] > 200).all()
    assert (row[:, 0] < 60).all()  # no red: the outer quarters were cropped away


def test_decode_gif(tmp_path):
    path = write_video(tmp_path / "anim.gif", noise_clip(12, 0, 32, 32), fps=10)
    video, length = data.decode_video(path, size=16, fps=10, frames=20)
    assert video.shape == (20, 16, 16, 3) and 11 <= length <= 13


@pytest.mark.parametrize("name,content,reason", [
    ("missing.mp4", None, "file not found"),
    ("empty.mp4", b"", "empty file"),
    ("random.mp4", os.urandom(3000), "Invalid data"),
    ("text.avi", b"hello, not a video\n", "Invalid data"),
])
def test_decode_errors_name_the_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DecodeError) as e:
        data.decode_video(path)
    assert str(path) in str(e.value) and reason in str(e.value)


def test_decode_truncated_file(tmp_path):
    # moov atom at the end (imageio's default): half a file cannot be opened at all
    whole = write_video(tmp_path / "whole.mp4", noise_clip(30, 0), fps=30).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DecodeError, match="truncated or not an MP4"):
        data.decode_video(tmp_path / "cut.mp4")
    # moov at the front: the first part decodes; it is kept, with a warning and its true length
    whole = write_video(tmp_path / "fs.mp4", noise_clip(90, 0, 64, 64), fps=30,
                        output_params=["-movflags", "+faststart"]).read_bytes()
    (tmp_path / "fs_cut.mp4").write_bytes(whole[: len(whole) // 2])
    video, length, warning = data._decode(tmp_path / "fs_cut.mp4", 16, 10, 30)
    assert 0 < length < 30 and "truncated" in warning


def test_decode_directory_is_an_error(tmp_path):
    with pytest.raises(DecodeError, match="directory"):
        data.decode_video(tmp_path)


# -----------------------------------------------------------------------------
# still images: Pillow, one-frame clips


def write_image(path, im, **save_kw) -> Path:
    """A PIL image (or an (H, W[, C]) uint8 array) -> a file whose format follows the extension."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(im) if isinstance(im, np.ndarray) else im).save(path, **save_kw)
    return path


def _modes():
    """(name, file, PIL image, expected RGB at the centre, grey) for every mode conversion."""
    from PIL import Image

    half = np.zeros((24, 24), np.uint8)
    half[:, 12:] = 255
    p = Image.new("P", (24, 24), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    ramp16 = np.full((24, 24), 40000, np.uint16)  # 40000 / 65535 * 255 = 155.6
    wide = np.full((24, 24), 100000, np.int32)
    wide[:, 12:] = 300000  # beyond 16 bits: scaled by its own range
    return [
        ("1", "a.png", Image.fromarray(half).convert("1"), [(6, 0), (17, 255)], True),
        ("L", "a.png", Image.new("L", (24, 24), 100), [(12, 100)], True),
        ("P", "a.png", p, [(12, (255, 0, 0))], False),
        ("P transparent", "t.png", p, [(12, 255)], True),  # saved with transparency=1: white
        ("CMYK", "a.tif", Image.new("CMYK", (24, 24), (0, 255, 255, 0)), [(12, (255, 0, 0))], False),
        ("RGBA clear", "a.png", Image.new("RGBA", (24, 24), (255, 0, 0, 0)), [(12, 255)], True),
        ("RGBA half", "a.png", Image.new("RGBA", (24, 24), (0, 0, 0, 128)), [(12, 127)], True),
        ("RGBA opaque", "a.png", Image.new("RGBA", (24, 24), (0, 0, 255, 255)), [(12, (0, 0, 255))], False),
        ("LA", "a.png", Image.new("LA", (24, 24), (0, 128)), [(12, 127)], True),
        ("I;16", "a.png", Image.fromarray(ramp16), [(12, 156)], True),  # convert('L') would give 255
        ("I 16-bit values", "a.tif", Image.fromarray(ramp16.astype(np.int32)), [(12, 156)], True),
        ("I wide", "a.tif", Image.fromarray(wide), [(6, 0), (17, 255)], True),
        ("RGB jpeg", "a.jpg", Image.new("RGB", (24, 24), (200, 30, 30)), [(12, (200, 30, 30))], False),
        ("bmp", "a.bmp", Image.new("RGB", (24, 24), (10, 20, 30)), [(12, (10, 20, 30))], False),
        ("webp", "a.webp", Image.new("RGB", (24, 24), (10, 200, 30)), [(12, (10, 200, 30))], False),
        ("pgm", "a.pgm", Image.new("L", (24, 24), 77), [(12, 77)], True),
    ]


@pytest.mark.parametrize("case", _modes(), ids=lambda c: c[0])
def test_decode_image_any_mode_becomes_8bit_rgb(tmp_path, case):
    name, file, im, expect, grey = case
    path = write_image(tmp_path / file, im, **({"transparency": 1} if "transparent" in name else {}))
    video, length, warning, is_grey = data._decode_image(path, size=24, frames=1)
    assert video.shape == (1, 24, 24, 3) and video.dtype == np.uint8 and length == 1 and warning is None
    assert is_grey == grey == data.is_grey(video)
    tol = 6 if file.endswith((".jpg", ".webp")) else 1
    for x, rgb in expect:
        np.testing.assert_allclose(video[0, 12, x].astype(int), np.broadcast_to(rgb, 3), atol=tol)


def test_decode_image_is_one_frame_padded_to_frames(tmp_path):
    path = write_image(tmp_path / "a.png", noise_clip(1, 0, 30, 40)[0])
    video, length = data.decode_image(path, size=16, frames=5)
    assert video.shape == (5, 16, 16, 3) and length == 1 and (video == video[0]).all()
    assert data.decode_image(path, size=16)[0].shape == (1, 16, 16, 3)


def test_decode_image_geometry_is_the_video_paths(tmp_path):
    # quarters red, green, blue, white across a 64x32 image: the centre square holds green and blue
    frame = np.zeros((32, 64, 3), np.uint8)
    for q, col in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        frame[:, q * 16: (q + 1) * 16] = col
    video, _ = data.decode_image(write_image(tmp_path / "wide.png", frame), size=16)
    row = video[0, 8].astype(int)
    assert (row[:6, 1] > 200).all() and (row[-6:, 2] > 200).all() and (row[:, 0] < 30).all()
    tall, _ = data.decode_image(write_image(tmp_path / "tall.png", frame.transpose(1, 0, 2).copy()), size=16)
    assert (tall[0, :6, 8, 1] > 200).all() and (tall[0, -6:, 8, 2] > 200).all()
    # the same picture as a video (a smooth ramp survives H.264) lands on the same pixels
    y, x = np.mgrid[0:48, 0:96]
    ramp_img = np.stack([x * 255 // 95, y * 255 // 47, 255 - x * 255 // 95], -1).astype(np.uint8)
    still, _ = data.decode_image(write_image(tmp_path / "ramp.png", ramp_img), size=16)
    moving, _ = data.decode_video(write_video(tmp_path / "ramp.mp4", np.stack([ramp_img] * 10), fps=10),
                                  size=16, fps=10, frames=1)
    assert np.abs(still.astype(int) - moving.astype(int)).mean() < 4
    assert 55 < still[0, :, 0, 0].mean() < 75  # the centre crop starts a quarter of the way in


def test_decode_image_enlarges_small_images_smoothly(tmp_path):
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    video, _ = data.decode_image(write_image(tmp_path / "small.png", img), size=32)
    assert video.shape == (1, 32, 32, 3)
    assert len(np.unique(video[0, 16, :, 0])) > 3  # bilinear: a ramp at the edge, not blocks


def test_decode_image_applies_exif_orientation(tmp_path):
    from PIL import Image

    img = np.zeros((20, 40), np.uint8)
    img[:, 20:] = 255  # stored: left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: top black, bottom white
    video, _ = data.decode_image(write_image(tmp_path / "phone.jpg", Image.fromarray(img), exif=exif), size=20)
    assert video[0, :8].mean() < 30 and video[0, -8:].mean() > 225


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty file"),
    ("random.png", os.urandom(3000), "not an image"),
    ("text.jpg", b"hello, not an image\n", "not an image"),
    ("header_only.png", "png[:40]", "truncated image"),
    ("half.jpg", "jpg[:half]", "truncated image"),
    ("flipped.png", "png[corrupt]", "corrupt image"),
])
def test_decode_image_errors_name_the_file_and_reason(tmp_path, name, content, reason):
    if isinstance(content, str):
        img = noise_clip(1, 0, 40, 40)[0]
        whole = write_image(tmp_path / ("whole" + Path(name).suffix), img).read_bytes()
        if content == "png[:40]":
            content = whole[:60]
        elif content == "jpg[:half]":
            content = whole[: len(whole) // 2]
        else:  # zeros over the compressed pixels, chunk checksums kept
            content = whole[:100] + bytes(200) + whole[300:]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecodeError) as e:
        data.decode_image(path)
    assert str(path) in str(e.value) and e.value.reason.startswith(reason)
    with pytest.raises(DecodeError, match="directory"):
        data.decode_image(tmp_path)


# -----------------------------------------------------------------------------
# source readers


def test_read_folder(videos):
    records, failures = data.read_folder(videos)
    by_name = {Path(r.path).name: r for r in records}
    assert set(by_name) == {"a.mp4", "b.mp4", "c.mp4", "d.gif", "e.mp4", "corrupt.mp4", "empty.avi"}
    assert by_name["a.mp4"].labels == ["playing guitar"] and by_name["d.gif"].labels == ["juggling"]
    reasons = {Path(f["file"]).name: f["reason"] for f in failures}
    assert "empty class" in reasons["empty_class"] and "class folder" in reasons["loose.mp4"]


def test_read_kinetics_csv_trimmed_untrimmed_and_missing(tmp_path):
    root = tmp_path / "k"
    write_video(root / "abseiling" / "AAA_000010_000020.mp4", ramp(30), fps=30)  # trimmed, in a class folder
    write_video(root / "BBB.mp4", ramp(30), fps=30)  # untrimmed, flat
    csv = tmp_path / "val.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                   "abseiling,AAA,10,20,val,0\n"
                   "\"Passing American_football (in game)\",BBB,0.2,0.8,train,0\n"
                   "abseiling,CCC,5,15,val,0\n"
                   "abseiling,DDD,x,15,val,0\n")
    records, failures = data.read_kinetics_csv(csv, root)
    assert len(records) == 2 and len(failures) == 2
    a, b = records
    assert a.labels == ["abseiling"] and (a.start, a.end) == (None, None) and a.split_hint == "val"
    assert b.labels == ["passing american football (in game)"] and (b.start, b.end) == (0.2, 0.8)
    assert b.split_hint == "train" and a.source == "kinetics:val.csv"
    assert failures[0]["file"].endswith("val.csv:4") and "CCC" in failures[0]["reason"]
    assert "bad time_start" in failures[1]["reason"]


def test_read_kinetics_csv_rejects_other_csvs(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a Kinetics CSV"):
        data.read_kinetics_csv(tmp_path / "x.csv", tmp_path)


def test_read_list_multi_label_class_list_and_spaces(tmp_path):
    write_video(tmp_path / "air drumming" / "x.mp4", ramp(10), fps=10)
    write_video(tmp_path / "y.mp4", ramp(10), fps=10)
    lst = tmp_path / "train.txt"
    lst.write_text("air drumming/x.mp4 1\n"
                   "y.mp4 0 2\n"
                   "y.mp4 7\n"
                   "\n# a comment\n"
                   "missing.mp4 0\n")
    classes = ["Abseiling", "air_drumming", "juggling"]
    records, failures = data.read_list(lst, tmp_path, classes)
    assert [r.labels for r in records] == [["air drumming"], ["abseiling", "juggling"]]
    assert records[0].path.endswith("air drumming/x.mp4")
    assert [f["file"].rsplit(":", 1)[1] for f in failures] == ["3", "6"]
    assert "outside the class list" in failures[0]["reason"] and "video not found" in failures[1]["reason"]
    # without a class list, labels are names
    records, _ = data.read_list(lst, tmp_path)
    assert records[1].labels == ["0", "2"]
    # mmaction2's raw-frame list (`frame_dir total_frames label`): skipped, and the reason says what it is
    raw = tmp_path / "rawframes.txt"
    raw.write_text("imgs 5 127\n")
    records, failures = data.read_list(raw, tmp_path)
    assert records == [] and "raw-frame list" in failures[0]["reason"]


def test_read_tinyvirat(tmp_path):
    write_video(tmp_path / "videos" / "val" / "VIRAT_1" / "00000.mp4", ramp(20), fps=30)
    write_video(tmp_path / "videos" / "test" / "00000.mp4", ramp(20), fps=30)
    (tmp_path / "tiny_val_v2.json").write_text(json.dumps([
        {"id": "00000", "video_id": "VIRAT_1", "path": "VIRAT_1/00000.mp4", "dim": [20, 48, 80],
         "label": ["activity_walking", "Loading"]},
        {"id": "00001", "video_id": "VIRAT_1", "path": "VIRAT_1/00001.mp4", "dim": [20, 48, 80],
         "label": ["activity_walking"]},
    ]))
    (tmp_path / "tiny_test_v2_public.json").write_text(json.dumps([
        {"id": "00000", "video_id": "00000", "path": "00000.mp4", "dim": [20, 48, 80]}]))
    records, failures = data.read_tinyvirat(tmp_path / "tiny_val_v2.json", tmp_path)
    assert len(records) == 1 and records[0].labels == ["activity walking", "loading"]
    assert records[0].split_hint == "val" and len(failures) == 1 and "not found" in failures[0]["reason"]
    records, failures = data.read_tinyvirat(tmp_path / "tiny_test_v2_public.json", tmp_path)
    assert records[0].labels == [] and records[0].split_hint == "test" and not failures
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        data.read_tinyvirat(tmp_path / "bad.json", tmp_path)


def test_read_split_list(tmp_path):
    write_video(tmp_path / "blasting sand" / "-kYz_000086_000096.mp4", ramp(10), fps=10)
    write_video(tmp_path / "zz_000001_000011.mp4", ramp(10), fps=10)
    lst = tmp_path / "test.list"
    lst.write_text("blasting sand/-kYz_000086_000096\nbusking/zz_000001_000011\nbusking/nope_000001_000011\n")
    records, failures = data.read_split_list(lst, tmp_path)
    assert [r.labels for r in records] == [["blasting sand"], ["busking"]]
    assert all(r.class_split_hint == "meta_test" for r in records) and len(failures) == 1


def test_parse_source_errors(tmp_path):
    with pytest.raises(DataError, match="unknown source kind 'youtube'"):
        data.parse_source("youtube:x")
    with pytest.raises(DataError, match="no such file"):
        data.parse_source(f"folder:{tmp_path}/nope")
    with pytest.raises(DataError, match="needs an annotation file"):
        data.parse_source(f"kinetics:{tmp_path}")
    assert data.parse_source(f"list:{tmp_path}:{tmp_path}") == ("list", str(tmp_path), str(tmp_path))


def test_class_names_merge_across_sources_and_duplicates_merge(tmp_path, videos):
    lst = tmp_path / "extra.txt"
    lst.write_text("Playing_Guitar/a.mp4 PLAYING_guitar Strumming\njuggling/c.mp4 Juggling\n")
    records, _ = data.read_sources([data.parse_source(f"folder:{videos}"),
                                    data.parse_source(f"list:{videos}:{lst}")])
    a = next(r for r in records if r.path.endswith("a.mp4"))
    assert a.labels == ["playing guitar", "strumming"] and a.source == f"folder:{videos.name}+list:extra.txt"
    assert sum(r.path.endswith("c.mp4") for r in records) == 1
    assert data.normalise_class("  Playing_Guitar ") == data.normalise_class("playing   guitar") == "playing guitar"


def test_composite_with_multi_label_and_unlabelled_clips(tmp_path, videos):
    root = tmp_path / "tv"
    write_video(root / "videos" / "val" / "v1" / "0.mp4", noise_clip(20, 0), fps=30)
    write_video(root / "videos" / "val" / "v1" / "1.mp4", noise_clip(20, 1), fps=30)
    write_video(root / "videos" / "test" / "2.mp4", noise_clip(20, 2), fps=30)
    (root / "tiny_val_v2.json").write_text(json.dumps([
        {"id": "0", "path": "v1/0.mp4", "label": ["Juggling", "activity_walking"]},
        {"id": "1", "path": "v1/1.mp4", "label": ["activity_walking"]}]))
    (root / "tiny_test_v2_public.json").write_text(json.dumps([{"id": "2", "path": "2.mp4"}]))
    data.prepare([f"folder:{videos}", f"tinyvirat:{root}:{root / 'tiny_val_v2.json'}",
                  f"tinyvirat:{root}:{root / 'tiny_test_v2_public.json'}"], tmp_path / "c", size=16, frames=4,
                 verbose=False)
    cache = data.ClipCache(tmp_path / "c")
    assert cache.classes == ["activity walking", "juggling", "playing guitar"]  # 'Juggling' merged
    i = [c["path"] for c in cache.meta["clips"]].index(str(root / "videos" / "val" / "v1" / "0.mp4"))
    assert cache.all_labels[i] == [1, 0] and cache.labels[i] == 1  # all labels kept; the first is primary
    unl = [c["path"] for c in cache.meta["clips"]].index(str(root / "videos" / "test" / "2.mp4"))
    assert cache.labels[unl] == -1 and cache.clip_split[unl] == "val"  # TinyVIRAT's test split stays out of train
    assert unl not in cache.indices() and unl in cache.indices(labelled_only=False)
    assert "1 unlabelled" in cache.summary() and "multi-label" in data.info(tmp_path / "c")
    s = data.EpisodeSampler(cache, cache.indices(), [0, 1], n_way=2, k_shot=1, n_query=0)
    ep = s.sample(20, torch.Generator().manual_seed(0))
    assert i not in ep.clips.flatten().tolist()  # it carries both classes of every such episode


def test_class_list_rejects_other_labels(videos, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("juggling\n")
    records, failures = data.read_sources([data.parse_source(f"folder:{videos}")], ["juggling"], "classes.txt")
    assert all(r.labels == ["juggling"] for r in records)
    assert any("'playing guitar' is not in classes.txt" in f["reason"] for f in failures)


# -----------------------------------------------------------------------------
# splits


def test_class_split_is_seeded_disjoint_and_stable():
    classes = [f"class {i}" for i in range(50)]
    a = data.split_classes(classes, 0.2, seed=0)
    assert a == data.split_classes(classes, 0.2, seed=0) and a.count("meta_test") == 10
    assert a != data.split_classes(classes, 0.2, seed=1)
    # adding a class leaves the others where they were (nearly: the count moves by one at most)
    b = data.split_classes(classes + ["class 50"], 0.2, seed=0)
    assert sum(x != y for x, y in zip(a, b)) <= 1
    fixed = data.split_classes(classes, 0.2, 0, fixed={"class 3": "meta_test"})
    assert fixed.count("meta_test") == 1 and fixed[3] == "meta_test"


def test_clip_split_follows_hints_or_seeds():
    primary = ["a"] * 10 + ["b"] * 4 + [None]
    hints = [None] * 10 + ["train", "train", "val", "test"] + ["test"]
    s = data.split_clips(primary, hints, 0.2, seed=0)
    assert s[:10].count("val") == 2 and s[10:14] == ["train", "train", "val", "val"] and s[14] == "val"
    assert data.split_clips(["c"], [None], 0.5, 0) == ["train"]  # never all of a class


# -----------------------------------------------------------------------------
# prepare, the cache, resume


def test_prepare_end_to_end_with_failures(videos, tmp_path, capsys):
    out = tmp_path / "cache"
    meta = data.prepare([f"folder:{videos}"], out, size=16, fps=10, frames=12, workers=2, val_fraction=0.5)
    cache = data.ClipCache(out)
    assert cache.clips.shape == (7, 12, 16, 16, 3) and cache.clips.dtype == np.uint8
    assert cache.classes == ["juggling", "playing guitar"]
    ok = {Path(c["path"]).name: c for c in meta["clips"] if c["status"] == "ok"}
    assert set(ok) == {"a.mp4", "b.mp4", "c.mp4", "d.gif", "e.mp4"}
    assert ok["a.mp4"]["length"] == 10 and ok["c.mp4"]["length"] == 12  # 1 s padded; 2 s cut to the centre
    failed = {Path(f["file"]).name: f["reason"] for f in meta["failures"]}
    assert set(failed) == {"corrupt.mp4", "empty.avi", "empty_class", "loose.mp4"}
    assert "empty file" in failed["empty.avi"]
    assert sorted(cache.indices()) == sorted(i for i, c in enumerate(meta["clips"]) if c["status"] == "ok")
    assert set(cache.class_split) == {"meta_train", "meta_test"}
    for split in ("meta_train", "meta_test"):  # the two pools share no class
        assert set(cache.labels[cache.indices(class_split=split)]) == set(cache.classes_in(split))
    assert len(cache.indices("train")) + len(cache.indices("val")) == 5
    np.testing.assert_array_equal(cache.clips[cache.indices()[0]], np.load(out / "clips.npy")[cache.indices()[0]])
    printed = capsys.readouterr().out
    assert "failures: 4" in printed and "corrupt.mp4" in printed and "2 classes" in cache.summary()
    assert "corrupt.mp4" in data.info(out) and "juggling" in data.info(out)


def test_prepare_resumes_and_adds_sources(videos, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    data.prepare([f"folder:{videos}"], out, size=16, frames=8, workers=2, verbose=False)
    before = np.load(out / "clips.npy").copy()
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    data.prepare([f"folder:{videos}"], out, size=16, frames=8, workers=2, verbose=False)
    assert calls == []  # nothing left to decode
    data.prepare([f"folder:{videos}"], out, size=16, frames=8, workers=2, verbose=False, retry_failed=True)
    assert sorted(Path(c).name for c in calls) == ["corrupt.mp4", "empty.avi"]
    # a new source: only its clips are decoded, the old rows are carried over
    extra = tmp_path / "more"
    write_video(extra / "juggling" / "f.mp4", noise_clip(20, 9), fps=10)
    calls.clear()
    data.prepare([f"folder:{videos}", f"folder:{extra}"], out, size=16, frames=8, workers=2, verbose=False)
    assert [Path(c).name for c in calls] == ["f.mp4"]
    cache = data.ClipCache(out)
    assert len(cache) == 8
    np.testing.assert_array_equal(np.asarray(cache.clips[:7]), before)


def test_interrupted_prepare_leaves_a_resumable_cache(videos, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real, calls = data._decode, []

    def flaky(*a, **k):
        calls.append(a[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data, "_decode", flaky)
    with pytest.raises(DataError, match="interrupted.*run the same command again"):
        data.prepare([f"folder:{videos}"], out, size=16, frames=8, workers=1, verbose=False)
    with pytest.raises(DataError, match="incomplete cache"):
        data.ClipCache(out)
    monkeypatch.setattr(data, "_decode", real)
    meta = data.prepare([f"folder:{videos}"], out, size=16, frames=8, workers=1, verbose=False)
    assert meta["complete"] and sum(c["status"] == "ok" for c in meta["clips"]) == 5


def test_prepare_refuses_other_settings_and_bad_input(videos, tmp_path):
    out = tmp_path / "cache"
    data.prepare([f"folder:{videos}"], out, size=16, frames=8, verbose=False)
    with pytest.raises(DataError, match="size=16.*size=32"):
        data.prepare([f"folder:{videos}"], out, size=32, frames=8, verbose=False)
    empty = tmp_path / "nothing"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no clips found"):
        data.prepare([f"folder:{empty}"], tmp_path / "c2", verbose=False)


def test_prepare_with_nothing_decodable_says_why(tmp_path):
    (tmp_path / "v" / "a").mkdir(parents=True)
    (tmp_path / "v" / "a" / "x.mp4").write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="(?s)none of the 1 clips could be decoded.*Invalid data"):
        data.prepare([f"folder:{tmp_path / 'v'}"], tmp_path / "c", verbose=False)


def test_split_list_that_names_no_class_in_the_data(videos, tmp_path):
    (tmp_path / "test.list").write_text("juggling balls/abc\n")
    with pytest.raises(DataError, match="name no meta-test class.*juggling balls"):
        data.prepare([f"folder:{videos}"], tmp_path / "c", split_lists=[str(tmp_path / "test.list")], verbose=False)
    (tmp_path / "test.list").write_text("juggling/abc\n")
    meta = data.prepare([f"folder:{videos}"], tmp_path / "c", size=16, frames=4,
                        split_lists=[str(tmp_path / "test.list")], verbose=False)
    assert dict(zip(meta["classes"], meta["class_split"])) == {"juggling": "meta_test", "playing guitar": "meta_train"}


# -----------------------------------------------------------------------------
# prepare with images: classes from folders, one-frame clips, grey, bad files, split lists


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An Omniglot-like tree (<alphabet>/<character>/*.png, 1-bit) plus a `<class>/<image>` class
    of grey JPEGs, a class of one image, bad files, and folders to skip."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for alphabet, chars in (("Alphabet_of_the_Magi", 2), ("Angelic", 1)):
        for c in range(1, chars + 1):
            for k in range(3):
                ink = rng.random((30, 30)) > 0.7
                write_image(root / alphabet / f"character{c:02d}" / f"07{c:02d}_{k:02d}.png",
                            Image.fromarray(~ink).convert("1"))
    for k in range(3):
        write_image(root / "Grey_Shapes" / f"{k}.jpg", (rng.random((20, 28)) * 255).astype(np.uint8))
    write_image(root / "lonely" / "only.png", np.full((10, 10), 50, np.uint8))
    (root / "Grey_Shapes" / "zero.png").write_bytes(b"")
    (root / "Grey_Shapes" / "fake.jpg").write_text("not an image")
    whole = write_image(root / "whole.png", noise_clip(1, 0, 30, 30)[0].mean(-1).astype(np.uint8)).read_bytes()
    (root / "whole.png").unlink()
    (root / "Angelic" / "character01" / "cut.png").write_bytes(whole[: len(whole) // 2])
    write_image(root / "loose.png", np.zeros((8, 8), np.uint8))  # not in a class folder
    write_image(root / "Grey_Shapes" / ".thumbnails" / "0.png", np.zeros((8, 8), np.uint8))  # hidden: skipped
    write_image(root / "__MACOSX" / "Grey_Shapes" / "x.png", np.zeros((8, 8), np.uint8))  # unzip debris: skipped
    return root


def test_read_folder_names_image_classes_by_their_folder(images):
    records, failures = data.read_folder(images)
    labels = {Path(r.path).relative_to(images).as_posix(): r.labels[0] for r in records}
    assert labels["Alphabet_of_the_Magi/character01/0701_00.png"] == "alphabet of the magi/character01"
    assert labels["Alphabet_of_the_Magi/character02/0702_02.png"] == "alphabet of the magi/character02"
    assert labels["Angelic/character01/cut.png"] == "angelic/character01"
    assert labels["Grey_Shapes/1.jpg"] == labels["Grey_Shapes/zero.png"] == "grey shapes"  # `<class>/<image>`
    assert labels["lonely/only.png"] == "lonely" and len(labels) == 16
    assert [Path(f["file"]).name for f in failures] == ["loose.png"] and "class folder" in failures[0]["reason"]
    assert data.normalise_class_path("Alphabet_of_the_Magi/character01/") == "alphabet of the magi/character01"
    assert data.normalise_class_path("./Alphabet_of_the_Magi//character01") == "alphabet of the magi/character01"


def test_prepare_images_one_frame_grey_and_bad_files(images, tmp_path, capsys):
    out = tmp_path / "cache"
    meta = data.prepare([f"folder:{images}"], out, size=12, workers=2, meta_test_fraction=0.25)
    cache = data.ClipCache(out)
    assert meta["frames"] == 1 and cache.clips.shape == (len(meta["clips"]), 1, 12, 12, 3)  # the default for images
    assert cache.classes == ["alphabet of the magi/character01", "alphabet of the magi/character02",
                             "angelic/character01", "grey shapes", "lonely"]
    assert (cache.lengths[cache.valid] == 1).all() and cache.grey and meta["grey"] is True
    failed = {Path(f["file"]).name: f["reason"] for f in meta["failures"]}
    assert set(failed) == {"zero.png", "fake.jpg", "cut.png", "loose.png"}
    assert failed["zero.png"].startswith("empty file") and failed["fake.jpg"].startswith("not an image")
    assert failed["cut.png"].startswith("truncated image")
    assert int(cache.valid.sum()) == 6 + 3 + 3 + 1  # every good file kept
    assert any("1 class has a single clip" in w and "'lonely'" in w for w in meta["warnings"])
    printed = capsys.readouterr().out
    assert "16 clips (16 still images, 1-frame clips)" in printed
    assert "warning: 1 class has a single clip" in printed and "fake.jpg" in printed
    assert "1 frame 12x12" in cache.summary() and ", grey," in cache.summary() and "1 warning" in cache.summary()
    assert "grey: yes" in data.info(out)
    ink = np.asarray(cache.clips[cache.labels == 0])
    assert ink.min() < 100 and ink.max() == 255  # 1-bit ink on white paper became 0..255, not 0..1


def test_prepare_colour_images_and_explicit_frames(tmp_path):
    write_image(tmp_path / "imgs" / "a" / "grey.png", np.full((16, 16), 90, np.uint8))
    write_image(tmp_path / "imgs" / "a" / "red.png", np.full((16, 16, 3), (200, 0, 0), np.uint8))
    write_image(tmp_path / "imgs" / "b" / "rgba.png", np.full((16, 16, 4), (0, 0, 0, 0), np.uint8))
    write_image(tmp_path / "imgs" / "b" / "deep.png", np.full((16, 16), 65535, np.uint16))
    meta = data.prepare([f"folder:{tmp_path / 'imgs'}"], tmp_path / "c", size=8, frames=3, verbose=False)
    cache = data.ClipCache(tmp_path / "c")
    assert cache.clips.shape == (4, 3, 8, 8, 3) and (cache.lengths == 1).all()  # an explicit --frames wins
    assert not cache.grey and meta["grey"] is False
    px = {Path(c["path"]).name: tuple(cache.clips[i, 2, 4, 4]) for i, c in enumerate(meta["clips"])}
    assert px == {"grey.png": (90,) * 3, "red.png": (200, 0, 0), "rgba.png": (255,) * 3, "deep.png": (255,) * 3}


def test_prepare_list_source_of_images(tmp_path):
    for k in range(2):
        write_image(tmp_path / "pics" / f"{k}.png", np.full((12, 12), 40 * k, np.uint8))
    (tmp_path / "train.txt").write_text("pics/0.png cat\npics/1.png dog\n")
    meta = data.prepare([f"list:{tmp_path}:{tmp_path / 'train.txt'}"], tmp_path / "c", size=8, verbose=False)
    assert meta["frames"] == 1 and meta["classes"] == ["cat", "dog"] and not meta["failures"]


def test_prepare_folder_mixing_images_and_videos(tmp_path, capsys):
    root = tmp_path / "mixed"
    write_video(root / "waving" / "a.mp4", noise_clip(20, 0), fps=10)
    write_video(root / "waving" / "b.mp4", noise_clip(20, 1), fps=10)
    write_image(root / "waving" / "still.png", noise_clip(1, 2, 20, 20)[0])
    write_image(root / "waving" / "deeper" / "still2.png", noise_clip(1, 3, 20, 20)[0])
    meta = data.prepare([f"folder:{root}"], tmp_path / "c", size=8, workers=2)
    cache = data.ClipCache(tmp_path / "c")
    assert meta["frames"] == 100  # any video: the video default
    by = {Path(c["path"]).name: (i, c) for i, c in enumerate(meta["clips"])}
    assert {n: c["length"] for n, (_, c) in by.items()} == {"a.mp4": 20, "b.mp4": 20, "still.png": 1, "still2.png": 1}
    assert by["still.png"][1]["labels"] == ["waving"] and by["still2.png"][1]["labels"] == ["waving/deeper"]
    i = by["still.png"][0]
    assert (cache.clips[i] == cache.clips[i, 0]).all()  # one frame, repeated
    assert "warning: 2 still images are one-frame clips (repeated to 100 frames) among 2 videos" \
        in capsys.readouterr().out


def test_prepare_resumes_images_and_opens_caches_without_the_grey_flag(images, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    data.prepare([f"folder:{images}"], out, size=12, workers=1, verbose=False)
    before = np.load(out / "clips.npy").copy()
    calls = []
    real = data._decode_image
    monkeypatch.setattr(data, "_decode_image", lambda *a, **k: calls.append(Path(a[0]).name) or real(*a, **k))
    data.prepare([f"folder:{images}"], out, size=12, workers=1, verbose=False)
    assert calls == []
    data.prepare([f"folder:{images}"], out, size=12, workers=1, verbose=False, retry_failed=True)
    assert sorted(calls) == ["cut.png", "fake.jpg", "zero.png"]
    # a cache made before the flag existed: no "grey" anywhere; it opens (not grey) and a resume
    # works the flag out from the stored rows without decoding anything
    meta = json.loads((out / "meta.json").read_text())
    del meta["grey"]
    for c in meta["clips"]:
        del c["grey"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert data.ClipCache(out).grey is False
    calls.clear()
    again = data.prepare([f"folder:{images}"], out, size=12, workers=1, verbose=False)
    assert calls == [] and again["grey"] is True and data.ClipCache(out).grey
    np.testing.assert_array_equal(np.load(out / "clips.npy"), before)
    with pytest.raises(DataError, match=r"frames=1.*frames=100 \(--frames defaults to 1 when every clip is an image"):
        write_video(tmp_path / "v" / "waving" / "a.mp4", noise_clip(10, 0), fps=10)
        data.prepare([f"folder:{images}", f"folder:{tmp_path / 'v'}"], out, size=12, verbose=False)


def test_synthetic_and_video_caches_are_not_grey(synth, videos, tmp_path):
    assert synth.grey is False and "grey" not in synth.meta
    meta = data.prepare([f"folder:{videos}"], tmp_path / "c", size=16, frames=4, verbose=False)
    assert meta["grey"] is False and all(c["grey"] is False for c in meta["clips"] if c["status"] == "ok")
    write_video(tmp_path / "g" / "grey" / "a.mp4", ramp(10), fps=10)  # solid grey frames
    assert data.prepare([f"folder:{tmp_path / 'g'}"], tmp_path / "g2", size=16, frames=4, verbose=False)["grey"]


def test_resolve_split_lists_names_classes_folders_and_files():
    present = {"alphabet of the magi/character01", "alphabet of the magi/character02", "angelic/character01",
               "angelic/character02", "juggling", "playing guitar"}
    listed = [("meta_test", "Alphabet_of_the_Magi/character01", "a"),  # a class
              ("meta_test", "Angelic", "a"),  # a folder: every class in it
              ("meta_test", "Alphabet_of_the_Magi/character02/0709_01.png", "a"),  # class/file
              ("meta_test", "juggling/abc_000001_000011", "a"),  # class name/video id (CMN)
              ("meta_test", "Playing_Guitar", "a"),
              ("meta_test", "Sanskrit/character01", "a")]  # not in the data
    fixed, unmatched = data.resolve_split_lists(listed, present)
    assert fixed == {c: "meta_test" for c in present} and unmatched == ["Sanskrit/character01"]
    with pytest.raises(DataError, match="'angelic/character01' is listed as both"):
        data.resolve_split_lists(listed + [("meta_train", "angelic/character01/x.png", "b")], present)


def test_split_list_holds_out_a_second_folder_source(tmp_path, capsys):
    """Omniglot as distributed: background and evaluation sets as two folder sources, the
    evaluation characters listed one a line (the README's `ls -d */*`) as meta-test."""
    for part, alphabets in (("images_background", ("Latin", "Greek")), ("images_evaluation", ("Kannada", "Atlantean"))):
        for a in alphabets:
            for c in (1, 2):
                for k in range(2):
                    write_image(tmp_path / part / a / f"character{c:02d}" / f"{k}.png", np.full((9, 9), 30 * c, np.uint8))
    ev = tmp_path / "images_evaluation"
    listing = sorted(f"{a.name}/{c.name}" for a in ev.iterdir() for c in a.iterdir())
    (tmp_path / "eval_classes.txt").write_text("\n".join(listing) + "\n")
    assert data.main(["prepare", "--source", f"folder:{tmp_path / 'images_background'}", "--source",
                      f"folder:{ev}", "--split-list", f"meta_test={tmp_path / 'eval_classes.txt'}", "--size", "8",
                      "--out", str(tmp_path / "c"), "--workers", "1"]) == 0
    cache = data.ClipCache(tmp_path / "c")
    test = {cache.classes[c] for c in cache.classes_in("meta_test")}
    assert test == {"kannada/character01", "kannada/character02", "atlantean/character01", "atlantean/character02"}
    assert len(cache.classes_in("meta_train")) == 4 and cache.frames == 1
    assert "warning" not in capsys.readouterr().out
    # whole alphabets, one a line, do the same
    (tmp_path / "eval_alphabets.txt").write_text("Kannada\nAtlantean\nSanskrit\n")
    meta = data.prepare([f"folder:{tmp_path / 'images_background'}", f"folder:{ev}"], tmp_path / "c2", size=8,
                        split_lists=[f"meta_test={tmp_path / 'eval_alphabets.txt'}"], verbose=False)
    assert {c for c, s in zip(meta["classes"], meta["class_split"]) if s == "meta_test"} == test
    assert meta["warnings"] == ["1 split-list line names no class in the data (e.g. 'Sanskrit')"]
    # a list naming nothing in the data: today's error, naming a line
    (tmp_path / "other.txt").write_text("Sanskrit/character01\n")
    with pytest.raises(DataError, match="name no meta-test class.*'Sanskrit/character01'"):
        data.prepare([f"folder:{ev}"], tmp_path / "c3", size=8, split_lists=[f"meta_test={tmp_path / 'other.txt'}"],
                     verbose=False)


def test_failure_report_groups_by_kind_of_reason():
    meta = {"failures": [data._failure(f"a.csv:{i}", f"video not found: no id{i}_000001_000011.* under /x")
                         for i in range(50)] + [data._failure("b.mp4", "empty file (0 bytes)")]}
    report = data.failure_report(meta)
    assert "50 x video not found" in report and "1 x empty file (N bytes)" in report
    assert "... and 47 more" in report and len(report.splitlines()) < 12


def test_clip_cache_errors(tmp_path, synth):
    with pytest.raises(DataError, match="no such directory"):
        data.ClipCache(tmp_path / "nope")
    with pytest.raises(DataError, match="no meta.json"):
        data.ClipCache(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        data.ClipCache(bad)
    (bad / "meta.json").write_text(json.dumps({**synth.meta, "format_version": 99}))
    with pytest.raises(DataError, match="format 99"):
        data.ClipCache(bad)
    (bad / "meta.json").write_text(json.dumps(synth.meta))
    (bad / "clips.npy").write_bytes((synth.root / "clips.npy").read_bytes()[:1000])
    with pytest.raises(DataError, match="clips.npy"):
        data.ClipCache(bad)


def test_clip_cache_pickles_without_its_frames(synth):
    import pickle

    blob = pickle.dumps(synth)
    assert len(blob) < synth.clips.nbytes
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.clips[3], synth.clips[3])


# -----------------------------------------------------------------------------
# the synthetic benchmark


def test_synthetic_grammar():
    names = data.synth_class_names()
    assert len(names) == len(set(names)) == 128
    split = data._synth_split(names, 0.2, seed=0)
    assert split.count("meta_test") == 26
    train_words = {w for n, s in zip(names, split) if s == "meta_train" for w in n.split()}
    assert all(set(n.split()) <= train_words for n in names)  # meta-test = new combinations


def test_synthetic_is_bitwise_deterministic(tmp_path):
    kw = dict(n_classes=6, clips_per_class=3, frames=8, size=16, seed=5, verbose=False)
    data.build_synthetic(tmp_path / "a", workers=1, **kw)
    data.build_synthetic(tmp_path / "b", workers=2, **kw)
    for f in ("clips.npy", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    data.build_synthetic(tmp_path / "c", workers=1, **{**kw, "seed": 6})
    assert (tmp_path / "a" / "clips.npy").read_bytes() != (tmp_path / "c" / "clips.npy").read_bytes()


def test_synthetic_clips_move(synth):
    clips = np.asarray(synth.clips, dtype=np.float32)  # (N, F, H, W, 3)
    assert clips.shape == (60, 12, 16, 16, 3)
    assert (np.abs(np.diff(clips, axis=1)).max((1, 2, 3, 4)) > 50).all()  # something moves in every clip
    assert synth.meta["kind"] == "synthetic" and synth.fps == 10 and (synth.lengths == 12).all()
    assert len(synth.classes_in("meta_test")) == 2


def test_synthetic_mp4_goes_through_the_decoder(tmp_path):
    meta = data.build_synthetic(tmp_path / "s", n_classes=2, clips_per_class=2, frames=10, size=32, seed=0,
                                write_mp4=True, workers=1, verbose=False)
    assert meta["clips"][0]["path"].endswith(".mp4")
    meta2 = data.prepare([f"folder:{tmp_path / 's' / 'videos'}"], tmp_path / "p", size=32, fps=10, frames=10,
                         verbose=False)
    assert sorted(meta2["classes"]) == sorted(meta["classes"]) and not meta2["failures"]
    orig = data.ClipCache(tmp_path / "s")
    again = data.ClipCache(tmp_path / "p")
    i = [c["path"] for c in again.meta["clips"]].index(meta["clips"][0]["path"])
    assert again.lengths[i] == 10
    err = np.abs(again.clips[i].astype(int) - orig.clips[0].astype(int)).mean()
    assert err < 12  # the same frames, through H.264 and back


def test_ensure_synthetic_builds_once(tmp_path):
    kw = dict(n_classes=4, clips_per_class=2, frames=4, size=16, verbose=False)
    out = tmp_path / "s"
    assert data.ensure_synthetic(out, **kw) == str(out)
    stamp = (out / "clips.npy").stat().st_mtime_ns
    data.ensure_synthetic(out, **kw)
    assert (out / "clips.npy").stat().st_mtime_ns == stamp
    data.ensure_synthetic(out, **{**kw, "frames": 6})
    assert data.ClipCache(out).frames == 6


@pytest.mark.slow
def test_synthetic_one_frame_says_nothing_motion_does(tmp_path):
    """Nearest class mean, 5-way 1-shot on the held-out classes of the default benchmark (16
    clips a class is plenty here): raw pixels of one frame are at chance, a crude motion
    feature is well above it."""
    data.build_synthetic(tmp_path / "s", clips_per_class=16, verbose=False)
    cache = data.ClipCache(tmp_path / "s")
    pool = cache.indices(class_split="meta_test")
    x = torch.from_numpy(np.asarray(cache.clips[pool])).float()  # (n, F, H, W, 3)
    gray = x.mean(-1)
    one_frame = torch.nn.functional.avg_pool2d(x[:, 16].permute(0, 3, 1, 2), 4).flatten(1)
    spec = torch.fft.rfft(gray - gray.mean(1, keepdim=True), dim=1).abs().mean((2, 3))  # temporal spectrum
    sampler = data.EpisodeSampler(cache, pool, cache.classes_in("meta_test"), 5, 1, 5)
    g = torch.Generator().manual_seed(0)
    ep = sampler.sample(400, g)
    pos = {int(c): j for j, c in enumerate(pool)}

    def ncm(feats):
        f = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
        e = f[[[pos[int(c)] for c in row] for row in ep.clips]]  # (B, S, D)
        sup, qry = e[:, :5], e[:, 5:]
        proto = torch.zeros_like(sup).scatter_(1, ep.target[:, :5, None].expand_as(sup), sup)
        pred = torch.cdist(qry, proto).argmin(-1)
        return (pred == ep.target[:, 5:]).float().mean().item()

    assert abs(ncm(one_frame) - 0.2) < 0.04
    assert ncm(spec / spec.sum(1, keepdim=True)) > 0.35


# -----------------------------------------------------------------------------
# loading and augmentation


def test_clip_dataset_shapes_and_normalisation(synth):
    idx = synth.indices()
    train = data.ClipDataset(synth, idx, num_frames=4, sampling_rate=2, size=8, train=True,
                             rand_augment="rand-m7-mstd0.5-inc1", random_erase=0.25)
    video, label = train[0]
    assert video.shape == (3, 4, 8, 8) and video.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == synth.labels[idx[0]]
    ev = data.ClipDataset(synth, idx, num_frames=4, sampling_rate=2, size=16, train=False)
    video, _ = ev[1]  # centred window: frames 2, 4, 6, 8 of 12, no resize at 16 px
    raw = torch.from_numpy(np.asarray(synth.clips[idx[1], [2, 4, 6, 8]])).float().permute(3, 0, 1, 2) / 255
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1, 1), torch.tensor(data.STD).view(3, 1, 1, 1)
    torch.testing.assert_close(video, (raw - mean) / std)
    views = data.ClipDataset(synth, idx, 4, 2, 8, train=False, num_views=3)[0][0]
    assert views.shape == (3, 3, 4, 8, 8)  # (V, C, T, H, W)
    mapped = data.ClipDataset(synth, idx, 4, 2, 8, train=False, label_map={int(synth.labels[idx[0]]): 7})
    assert int(mapped[0][1]) == 7


def test_sampling_past_the_end_repeats_the_last_real_frame():
    np.testing.assert_array_equal(data.frame_indices(2, 5, 3, length=9), [2, 5, 8, 8, 8])
    assert data.view_starts(length=100, span=61, num_views=1) == [19]
    assert data.view_starts(length=100, span=61, num_views=3) == [0, 20, 39]
    assert data.view_starts(length=10, span=61, num_views=2) == [0, 0]


def test_augmentation_is_a_function_of_seed_epoch_index(synth):
    ds = data.ClipDataset(synth, synth.indices(), 4, 2, 12, train=True, rand_augment="rand-m9-n3-mstd0.5-inc1",
                          random_erase=0.5, seed=1)
    a = ds[5][0]
    torch.testing.assert_close(ds[5][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)
    ds.set_epoch(0)
    loader = lambda w: torch.utils.data.DataLoader(ds, batch_size=8, num_workers=w)  # noqa: E731
    torch.testing.assert_close(next(iter(loader(0)))[0], next(iter(loader(2)))[0])


def test_augmentations_treat_every_frame_alike(tmp_path):
    # a cache of static clips (every frame identical): after any augmentation all frames must
    # still be identical, which they are only if crop, flip, every RandAugment op and the
    # erased box are the same in each frame
    frames = np.repeat(noise_clip(1, 0, 24, 24), 6, axis=0)  # (6, 24, 24, 3)
    out = tmp_path / "static"
    out.mkdir()
    np.save(out / "clips.npy", np.stack([frames] * 4))
    meta = {"format_version": data.FORMAT_VERSION, "kind": "prepared", "complete": True, "size": 24, "fps": 10,
            "frames": 6, "seed": 0, "sources": ["test"], "classes": ["a"], "class_split": ["meta_train"],
            "failures": [], "clips": [{"path": str(i), "labels": ["a"], "status": "ok", "length": 6,
                                       "split": "train", "source": "test"} for i in range(4)]}
    (out / "meta.json").write_text(json.dumps(meta))
    cache = data.ClipCache(out)
    ds = data.ClipDataset(cache, [0, 1, 2, 3], num_frames=4, sampling_rate=1, size=16, train=True,
                          rand_augment="rand-m9-n4-mstd0.5-inc1", random_erase=1.0)
    policy_ops = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(4):
            video, _ = ds[i]  # (C, T, H, W)
            assert torch.equal(video, video[:, :1].expand_as(video)), f"frames differ (epoch {epoch}, clip {i})"
    for name in data._RAND_OPS_INCREASING + data._RAND_OPS:  # each op on its own, too
        x = torch.from_numpy(frames[:3]).permute(0, 3, 1, 2).float() / 255
        y = data._op(name, x, 8.0, np.random.default_rng(0), 0.45)
        assert torch.equal(y, y[:1].expand_as(y)), name
        policy_ops.add(name)
    assert len(policy_ops) == 21  # 15 ops + 6 "Increasing" variants


def test_parse_rand_augment():
    p = data.parse_rand_augment("rand-m7-mstd0.5-inc1")
    assert (p.magnitude, p.num_ops, p.mstd, p.prob) == (7, 2, 0.5, 0.5) and "PosterizeIncreasing" in p.ops
    assert data.parse_rand_augment("rand-m9-n3").ops == data._RAND_OPS
    with pytest.raises(DataError, match="unknown part"):
        data.parse_rand_augment("rand-m7-q2")
    with pytest.raises(DataError, match="expected timm's form"):
        data.parse_rand_augment("auto-m7")


@pytest.mark.parametrize("name,pil", [
    ("Invert", lambda im: __import__("PIL.ImageOps").ImageOps.invert(im)),
    ("AutoContrast", lambda im: __import__("PIL.ImageOps").ImageOps.autocontrast(im)),
    ("Equalize", lambda im: __import__("PIL.ImageOps").ImageOps.equalize(im)),
    ("PosterizeIncreasing", lambda im: __import__("PIL.ImageOps").ImageOps.posterize(im, 2)),  # m 7: 4 - 2 bits
    ("SolarizeIncreasing", lambda im: __import__("PIL.ImageOps").ImageOps.solarize(im, 256 - 179)),
])
def test_rand_augment_ops_match_pil(name, pil):
    """The hand-written ops against PIL's own, which timm applies to each frame."""
    from PIL import Image

    img = (np.random.default_rng(0).random((20, 24, 3)) ** 2 * 200 + 20).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # (1, C, H, W)
    ours = (data._op(name, x, 7.0, np.random.default_rng(0), 0.45)[0].permute(1, 2, 0) * 255).round()
    ref = np.asarray(pil(Image.fromarray(img)), dtype=np.float32)
    assert np.abs(ours.numpy() - ref).max() <= 1.0


def test_rand_augment_enhancers_match_pil():
    from PIL import Image, ImageEnhance

    img = (np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for ours_fn, pil_cls in ((lambda t: data._blend(data._gray(t).expand_as(t), t, 1.6), ImageEnhance.Color),
                             (lambda t: data._sharpness(t, 1.6), ImageEnhance.Sharpness),
                             (lambda t: data._blend(torch.zeros_like(t), t, 0.4), ImageEnhance.Brightness)):
        ours = ours_fn(x)[0].permute(1, 2, 0).numpy() * 255
        ref = np.asarray(pil_cls(Image.fromarray(img)).enhance(1.6 if pil_cls is not ImageEnhance.Brightness
                                                                else 0.4), dtype=np.float32)
        assert np.abs(ours - ref).max() <= 2.0, pil_cls.__name__


def test_affine_ops_match_pil_geometry():
    """Rotation and translation move content the way PIL's do (compare where a bright dot lands)."""
    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    img[6:9, 20:23] = 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for ours, ref in ((data._rotate(x, 30, 0.0), Image.fromarray(img).rotate(30, Image.BILINEAR)),
                      (data._affine(x, (1, 0.3, 0, 0, 1, 0), 0.0),
                       Image.fromarray(img).transform((32, 32), Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.BILINEAR)),
                      (data._affine(x, (1, 0, 5, 0, 1, 0), 0.0),
                       Image.fromarray(img).transform((32, 32), Image.AFFINE, (1, 0, 5, 0, 1, 0), Image.BILINEAR))):
        a = ours[0].mean(0).numpy()
        b = np.asarray(ref, dtype=np.float32).mean(-1) / 255
        centre = lambda m: np.array(np.unravel_index(np.argsort(m, axis=None)[-4:], m.shape)).mean(1)  # noqa: E731
        assert np.abs(centre(a) - centre(b)).max() <= 1.0


def test_mixup_cutmix_soft_targets():
    g = torch.Generator().manual_seed(0)
    video = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 2, 8, 8).clone()
    target = torch.tensor([0, 1, 2, 3])
    v, y = data.mixup_cutmix(video, target, 5, 0.0, 0.0, 1.0, 0.1, g)  # smoothing only
    assert torch.equal(v, video) and torch.allclose(y.sum(1), torch.ones(4)) and y[0, 0] == pytest.approx(0.92)
    v, y = data.mixup_cutmix(video, target, 5, 0.8, 0.0, 1.0, 0.0, g)  # mixup with the reversed batch
    lam = y[0, 0].item()
    torch.testing.assert_close(v[0], video[0] * lam + video[3] * (1 - lam))
    v, y = data.mixup_cutmix(video, target, 5, 0.0, 1.0, 1.0, 0.0, g)  # cutmix: lam = kept area
    kept = (v[0] == 0).float().mean().item()
    assert y[0, 0].item() == pytest.approx(kept) and torch.equal(v[:, :, 0], v[:, :, 1])  # same box in every frame
    a = data.mixup_cutmix(video, target, 5, 0.8, 1.0, 1.0, 0.1, torch.Generator().manual_seed(3))
    b = data.mixup_cutmix(video, target, 5, 0.8, 1.0, 1.0, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_labelled_subset(synth):
    idx = synth.indices()
    half = data.labelled_subset(synth, idx, 0.5, seed=0)
    assert len(half) == 30 and set(synth.labels[half]) == set(synth.labels[idx])
    tiny = data.labelled_subset(synth, idx, 0.01, seed=0)
    assert len(tiny) == 10  # at least one per class
    np.testing.assert_array_equal(half, data.labelled_subset(synth, idx, 0.5, seed=0))
    with pytest.raises(DataError):
        data.labelled_subset(synth, idx, 0.0, seed=0)


# -----------------------------------------------------------------------------
# episodes


def test_support_query_episodes(synth):
    pool = synth.indices()
    sampler = data.EpisodeSampler(synth, pool, range(10), n_way=5, k_shot=2, n_query=3)
    ep = sampler.sample(16, torch.Generator().manual_seed(0))
    S = 5 * (2 + 3)
    assert sampler.steps == S
    for t in ep:
        assert t.shape == (16, S)
    assert ep.is_query.dtype == torch.bool and ep.clips.dtype == torch.int64
    assert (ep.label_in[:, :10] == ep.target[:, :10]).all() and (ep.label_in[:, 10:] == -1).all()
    assert (ep.is_query == (torch.arange(S) >= 10)).all()
    for b in range(16):
        assert sorted(ep.target[b, :10].tolist()) == sorted(list(range(5)) * 2)
        assert sorted(ep.target[b, 10:].tolist()) == sorted(list(range(5)) * 3)
        assert len(set(ep.clips[b].tolist())) == S  # no clip twice
        cls = synth.labels[ep.clips[b].numpy()]
        for lab in range(5):  # one cache class per episode label
            assert len(set(cls[ep.target[b].numpy() == lab])) == 1
        assert ep.instance[b, 10:].eq(2).all() and sorted(ep.instance[b, :10].tolist()) == [0] * 5 + [1] * 5
    assert not all(ep.target[b, 10:].tolist() == sorted(ep.target[b, 10:].tolist()) for b in range(16))  # shuffled
    again = sampler.sample(16, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(ep, again))


def test_sequence_episodes(synth):
    sampler = data.EpisodeSampler(synth, synth.indices(), range(10), n_way=3, k_shot=1, n_query=1,
                                  layout="sequence", seq_shots=4)
    ep = sampler.sample(4, torch.Generator().manual_seed(1))
    assert ep.target.shape == (4, 12) and ep.is_query.all()
    assert (ep.label_in[:, 0] == -1).all() and torch.equal(ep.label_in[:, 1:], ep.target[:, :-1])
    for b in range(4):
        seen = {}
        for t, lab in enumerate(ep.target[b].tolist()):
            assert ep.instance[b, t] == seen.get(lab, 0)
            seen[lab] = seen.get(lab, 0) + 1


def test_rotated_classes_and_shifts(synth):
    """Santoro's augmentation: each class also exists turned by 1-3 quarter turns, as a class of
    its own (one turn per episode label, so all its steps agree), and each step is shifted by up
    to max_shift pixels; without them every step is unturned and unshifted."""
    plain = data.EpisodeSampler(synth, synth.indices(), range(10), n_way=5, k_shot=1, n_query=1,
                                layout="sequence", seq_shots=4)
    ep = plain.sample(8, torch.Generator().manual_seed(0))
    assert not ep.rotation.any() and not ep.down.any() and not ep.right.any()
    assert len(plain.variants) == 10
    aug = data.EpisodeSampler(synth, synth.indices(), range(10), n_way=5, k_shot=1, n_query=1,
                              layout="sequence", seq_shots=4, rotations=True, max_shift=2)
    assert len(aug.variants) == 40 and aug.variants[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    ep = aug.sample(64, torch.Generator().manual_seed(0))
    for f in ep:
        assert f.shape == (64, 20)
    assert set(ep.rotation.unique().tolist()) == {0, 1, 2, 3}
    assert set(ep.down.unique().tolist()) == set(range(-2, 3)) and ep.right.abs().max() == 2
    for b in range(64):
        for lab in range(5):
            at = ep.target[b] == lab
            assert len(set(ep.rotation[b, at].tolist())) == 1  # one turn per class of the episode
    with pytest.raises(DataError, match="max_shift"):
        data.EpisodeSampler(synth, synth.indices(), range(10), 5, 1, 1, max_shift=-1)
    # a class and its turned copy are different classes: 2 cache classes give 8 classes
    two = data.EpisodeSampler(synth, synth.indices(), range(2), n_way=5, k_shot=1, n_query=0, rotations=True)
    assert len(two.variants) == 8


def test_augment_clips_turns_and_shifts_every_frame_alike():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 5, 5, generator=g)  # (n, C, T, H, W)
    zero = torch.zeros(6, dtype=torch.long)
    turns = torch.tensor([0, 1, 2, 3, 5, -1])  # taken mod 4
    out = data.augment_clips(x, turns, zero, zero)
    for n in range(6):
        assert torch.equal(out[n], torch.rot90(x[n], int(turns[n]) % 4, dims=(-2, -1)))
    down, right = torch.tensor([1, 0, -2, 0, 0, 1]), torch.tensor([0, -1, 0, 2, 0, 1])
    out = data.augment_clips(x, zero, down, right)
    assert torch.equal(out[0, ..., 1:, :], x[0, ..., :-1, :]) and torch.equal(out[0, ..., 0, :], x[0, ..., 0, :])
    assert torch.equal(out[1, ..., :, :-1], x[1, ..., :, 1:]) and torch.equal(out[1, ..., :, -1], x[1, ..., :, -1])
    assert torch.equal(out[2, ..., :-2, :], x[2, ..., 2:, :]) and torch.equal(out[2, ..., -1, :], x[2, ..., -1, :])
    assert torch.equal(out[4], x[4])
    # a turn, then a shift
    both = data.augment_clips(x, torch.ones(6, dtype=torch.long), down, right)
    assert torch.equal(both, data.augment_clips(data.augment_clips(x, torch.ones(6, dtype=torch.long), zero, zero),
                                                zero, down, right))
    with pytest.raises(DataError, match="square"):
        data.augment_clips(torch.zeros(1, 1, 1, 4, 5), torch.ones(1, dtype=torch.long), zero[:1], zero[:1])


def test_episode_errors(synth):
    with pytest.raises(DataError, match=r"has 6 clips.*5-way 4-shot episode with 3 queries per class needs 7"):
        data.EpisodeSampler(synth, synth.indices(), range(10), 5, 4, 3)
    with pytest.raises(DataError, match="only 2 classes.*needs 5 classes"):
        data.EpisodeSampler(synth, synth.indices(), synth.classes_in("meta_test"), 5, 1, 1)
    s = data.EpisodeSampler([0] * 3 + [1] * 5 + [2] * 5, range(13), [0, 1, 2], 2, 2, 2, drop_small=True)
    assert s.classes == [1, 2] and s.dropped == [0]


def test_shot_mix_draws_every_shot_count_reproducibly():
    labels = [c for c in range(8) for _ in range(7)]
    mix = data.ShotMix([data.EpisodeSampler(labels, range(len(labels)), range(8), 5, k, 1) for k in range(1, 6)])
    assert mix.k_shots == [1, 2, 3, 4, 5] and mix.steps == 5 * 6
    lengths = [mix.sample(3, torch.Generator().manual_seed(s)).clips.shape for s in range(40)]
    assert {n // 5 - 1 for _, n in lengths} == {1, 2, 3, 4, 5} and all(b == 3 for b, _ in lengths)
    a, b = (mix.sample(3, torch.Generator().manual_seed(7)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a pure function of the generator's seed
    ep = a
    k = ep.clips.shape[1] // 5 - 1
    assert int((~ep.is_query[0]).sum()) == 5 * k and int(ep.is_query[0].sum()) == 5  # K shots, 1 query a class
    with pytest.raises(DataError, match="support/query"):
        data.ShotMix([data.EpisodeSampler(labels, range(len(labels)), range(8), 5, 1, 1, layout="sequence",
                                          seq_shots=3)])


def test_kmeans_recovers_separated_clusters_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 10
    truth = torch.arange(6).repeat_interleave(30)
    x = centres[truth] + torch.randn(180, 16, generator=g)
    ids = data.kmeans(x, 6, seed=1)
    assert ids.shape == (180,) and set(ids.tolist()) == set(range(6))
    # one cluster per true group: the partition is the truth's up to renaming
    assert all(len(set(ids[truth == c].tolist())) == 1 for c in range(6))
    assert torch.equal(ids, data.kmeans(x, 6, seed=1))
    with pytest.raises(DataError, match="7 clusters asked of 6 points"):
        data.kmeans(x[:6], 7, seed=0)


def test_cluster_labels_cover_the_pool_only():
    emb = torch.cat([torch.randn(10, 8) + 20 * torch.eye(8)[0], torch.randn(10, 8) - 20 * torch.eye(8)[0],
                     torch.randn(5, 8)])
    pool = np.arange(20)
    ids = data.cluster_labels(emb, pool, 2, seed=0)
    assert (ids[20:] == -1).all() and len(set(ids[:10])) == 1 and len(set(ids[10:20])) == 1 and ids[0] != ids[10]


def test_episode_mix_draws_each_source_by_its_weight():
    labels = [c for c in range(8) for _ in range(7)]
    one = data.EpisodeSampler(labels, range(len(labels)), range(8), 5, 1, 1)
    three = data.EpisodeSampler(labels, range(len(labels)), range(8), 5, 3, 1)
    mix = data.EpisodeMix([one, three], [0.25, 0.75])
    assert mix.steps == three.steps
    lengths = [mix.sample(2, torch.Generator().manual_seed(s)).clips.shape[1] for s in range(400)]
    assert 0.65 < lengths.count(three.steps) / 400 < 0.85
    a, b = (mix.sample(2, torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    only = data.EpisodeMix([one, three], [1.0, 0.0])
    assert {only.sample(1, torch.Generator().manual_seed(s)).clips.shape[1] for s in range(30)} == {one.steps}
    with pytest.raises(DataError, match="one non-negative weight per source"):
        data.EpisodeMix([one, three], [1.0])
    with pytest.raises(DataError, match="one non-negative weight per source"):
        data.EpisodeMix([one, three], [0.0, 0.0])


def test_view_episodes_show_distinct_views_of_distinct_clips():
    """UMTRA-style episodes: each class is one clip of the pool, its support and query steps are
    distinct views of that clip, encoded above every cache index and decoded back exactly."""
    n_clips, pool = 50, np.arange(10, 40)
    eps = data.ViewEpisodes(pool, n_clips, n_views=6, n_way=5, k_shot=3, n_query=2)
    ep = eps.sample(4, torch.Generator().manual_seed(0))
    assert ep.clips.shape == (4, 25) and (ep.clips >= n_clips).all()
    view, clip = data.split_view_index(ep.clips, n_clips)
    assert ((0 <= view) & (view < 6)).all() and np.isin(clip.numpy(), pool).all()
    for b in range(4):
        for lab in range(5):
            steps = ep.target[b] == lab
            assert len(set(clip[b][steps].tolist())) == 1  # one clip per class ...
            assert len(set(view[b][steps].tolist())) == 5  # ... shown in distinct views
        assert len(set(clip[b].tolist())) == 5  # five different clips
    a, b2 = (eps.sample(2, torch.Generator().manual_seed(7)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b2))  # a pure function of the generator
    plain = torch.tensor([0, 49])
    assert data.split_view_index(plain, n_clips)[0].tolist() == [-1, -1]
    assert torch.equal(data.split_view_index(plain, n_clips)[1], plain)
    with pytest.raises(DataError, match="shows 7 distinct views of each clip, and each clip has 6"):
        data.ViewEpisodes(pool, n_clips, n_views=6, n_way=5, k_shot=5, n_query=2)
    with pytest.raises(DataError, match="3 clips in the pool"):
        data.ViewEpisodes([1, 2, 3], n_clips, n_views=6, n_way=5, k_shot=1, n_query=1)


def test_multi_label_clips_never_stand_for_two_classes_of_an_episode():
    rng = np.random.default_rng(0)
    labels = [sorted(set(rng.choice(6, size=rng.integers(1, 3), replace=False).tolist())) for _ in range(120)]
    sampler = data.EpisodeSampler(labels, range(120), range(6), n_way=3, k_shot=2, n_query=2)
    ep = sampler.sample(50, torch.Generator().manual_seed(0))
    for b in range(50):
        chosen = {}
        for clip, lab in zip(ep.clips[b].tolist(), ep.target[b].tolist()):
            chosen.setdefault(lab, set()).add(clip)
        classes = []
        for lab, clips in chosen.items():  # the class behind each episode label
            common = set.intersection(*(set(labels[c]) for c in clips))
            classes.append(common)
        picked = set.union(*classes)
        for clip in ep.clips[b].tolist():
            assert len(set(labels[clip]) & picked) >= 1
        # no clip carries two of the episode's classes
        cls_of = [next(iter(c)) if len(c) == 1 else None for c in classes]
        if None not in cls_of:
            for clip in ep.clips[b].tolist():
                assert len(set(labels[clip]) & set(cls_of)) == 1


# -----------------------------------------------------------------------------
# the CLI and the real sample data


def test_cli(tmp_path, capsys, videos):
    assert data.main(["synth", "--out", str(tmp_path / "s"), "--classes", "3", "--clips-per-class", "2",
                      "--frames", "4", "--size", "16", "--workers", "1"]) == 0
    assert "3 classes" in capsys.readouterr().out
    assert data.main(["info", str(tmp_path / "s")]) == 0
    assert data.main(["prepare", "--source", "bogus:x", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown source kind 'bogus'") and "Traceback" not in err
    assert data.main(["info", str(tmp_path / "none")]) == 2
    assert data.main(["prepare", "--source", f"folder:{videos}", "--out", str(tmp_path / "p"), "--size", "16",
                      "--frames", "8"]) == 0
    assert "failures: 4" in capsys.readouterr().out
    assert data.bench_loader(tmp_path / "s", num_frames=2, sampling_rate=1, size=8, workers=0, batch_size=2,
                             batches=2) > 0
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--help"])
    assert e.value.code == 0 and "KIND:PATH" in capsys.readouterr().out


@pytest.mark.skipif(not (SHARED / "clips").is_dir(), reason="../shared/data/clips not present")
def test_real_clips_decode(tmp_path):
    meta = data.prepare([f"folder:{SHARED / 'clips'}"], tmp_path / "real", verbose=False)
    lengths = {Path(c["path"]).name: c["length"] for c in meta["clips"] if c["status"] == "ok"}
    assert lengths == {"test.avi": 66, "demo.mp4": 100, "part_0.mp4": 11, "test.mp4": 100,
                       "flipping_a_pancake.mkv": 100, "v_CricketShot_g04_c01_rgb.gif": 32, "structuralize.mp4": 100}
    cache = data.ClipCache(tmp_path / "real")
    assert cache.clips.shape == (7, 100, 64, 64, 3) and len(cache.classes) == 6 and not meta["failures"]


@pytest.mark.skipif(not (SHARED / "annotations").is_dir(), reason="../shared/data/annotations not present")
def test_real_annotation_files_parse(tmp_path):
    ann = SHARED / "annotations"
    records, failures = data.read_kinetics_csv(ann / "minikinetics200" / "val_k200.csv", tmp_path)
    assert records == [] and len(failures) == 5000 and "video not found" in failures[0]["reason"]
    records, failures = data.read_tinyvirat(ann / "tinyvirat_v2_sample" / "tiny_val_v2.first44.json", tmp_path)
    assert len(failures) == 44
    records, failures = data.read_split_list(ann / "kinetics100_fewshot_cmn" / "test.list", tmp_path)
    assert len(failures) == 2400
    names = data.read_class_list(ann / "kinetics400" / "label_map_k400.txt")
    assert len(names) == 400 and "air drumming" in names
    (tmp_path / "test.mp4").write_bytes(b"")
    records, failures = data.read_list(ann / "mmaction2_lists" / "tests_video_test_list_multi_label.txt",
                                       tmp_path, names)
    assert [r.labels for r in records] == [["abseiling", "applauding"], ["abseiling", "answering questions",
                                                                          "applying cream"]]


OMNIGLOT = SHARED / "omniglot" / "images_background.zip"


@pytest.mark.skipif(not OMNIGLOT.is_file(), reason="../shared/data/omniglot/images_background.zip not present")
def test_real_omniglot_alphabets_prepare(tmp_path):
    import zipfile

    with zipfile.ZipFile(OMNIGLOT) as z:
        names = [n for n in z.namelist() if n.endswith(".png")]
        per_alphabet = {}
        for n in names:
            per_alphabet.setdefault(n.split("/")[1], []).append(n)
        two = sorted(per_alphabet, key=lambda a: (len(per_alphabet[a]), a))[:2]  # the two smallest
        members = [n for a in two for n in per_alphabet[a]]
        z.extractall(tmp_path, members)
    meta = data.prepare([f"folder:{tmp_path / 'images_background'}"], tmp_path / "c", size=20, workers=1,
                        verbose=False)
    cache = data.ClipCache(tmp_path / "c")
    n_chars = len({n.rsplit("/", 1)[0] for n in members})
    assert cache.clips.shape == (len(members), 1, 20, 20, 3) and not meta["failures"] and not meta["warnings"]
    assert len(cache.classes) == n_chars and len(members) == 20 * n_chars and cache.grey
    assert all(c.split("/")[0] in {data.normalise_class(a) for a in two} for c in cache.classes)
    assert cache.classes[0].split("/")[1] == "character01"
    paper = np.asarray(cache.clips).mean()
    assert 200 < paper < 255  # black strokes on white paper


def test_synth_refuses_to_replace_a_cache_it_did_not_make(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "meta.json").write_text(json.dumps({"kind": "prepared", "classes": []}))
    (prepared / "clips.npy").write_bytes(b"frames of decoded real videos")
    with pytest.raises(DataError, match="did not make"):
        data.build_synthetic(prepared, n_classes=4, clips_per_class=2, frames=4, size=8, verbose=False)
    assert (prepared / "clips.npy").read_bytes() == b"frames of decoded real videos"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        data.build_synthetic(other, n_classes=4, clips_per_class=2, frames=4, size=8, verbose=False)
    ours = tmp_path / "ours"  # its own cache is rebuilt as before
    data.build_synthetic(ours, n_classes=4, clips_per_class=2, frames=4, size=8, verbose=False)
    data.build_synthetic(ours, n_classes=5, clips_per_class=2, frames=4, size=8, verbose=False)
    assert len(data.ClipCache(ours).classes) == 5


def test_direction_named_classes_are_warned_about(tmp_path):
    """A horizontal flip turns 'moving left' into 'moving right': prepare says so."""
    rng = np.random.default_rng(0)
    for name in ("moving_left", "moving_right", "waving"):
        for k in range(2):
            write_image(tmp_path / "src" / name / f"{k}.png", (rng.random((12, 12)) * 255).astype(np.uint8))
    meta = data.prepare([f"folder:{tmp_path / 'src'}"], tmp_path / "cache", size=8, verbose=False)
    said = [w for w in meta["warnings"] if "direction" in w]
    assert said and "2 of 3 classes" in said[0] and "--data.hflip=false" in said[0], meta["warnings"]
    assert data.direction_classes(["turning clockwise", "bright light", "spin ccw"]) == ["spin ccw",
                                                                                         "turning clockwise"]


# -----------------------------------------------------------------------------
# The glyph benchmark: appearance and motion


def test_glyph_clips_are_pure_and_classes_differ():
    a = data.render_glyph_clip("glyph03 orbit", seed=0, clip_index=1, frames=6, size=24)
    assert a.shape == (6, 24, 24, 3) and a.dtype == np.uint8
    assert np.array_equal(a, data.render_glyph_clip("glyph03 orbit", 0, 1, 6, 24))
    assert not np.array_equal(a[0], a[-1])  # it moves
    # one glyph drawn by two hands is alike; two glyphs are not (the strokes come from the glyph)
    rng = np.random.default_rng
    g3, g3b, g4 = (data._stroke_glyph(0, g, rng(k)) for g, k in ((3, 1), (3, 2), (4, 1)))
    assert g3.shape == (data._GLYPH_RES,) * 2 and 0 <= g3.min() and g3.max() <= 1 and g3.max() > 0.9
    def iou(x, y):
        return ((x > 0.5) & (y > 0.5)).sum() / ((x > 0.5) | (y > 0.5)).sum()
    assert iou(g3, g3b) > iou(g3, g4)


def test_glyph_benchmark_cache_says_flips_change_the_class(tmp_path):
    meta = data.build_synthetic(tmp_path / "g", benchmark="glyphs", n_classes=10, clips_per_class=3, frames=4,
                                size=16, verbose=False, workers=1)
    cache = data.ClipCache(tmp_path / "g")
    assert cache.classes == ["glyph00 drift", "glyph00 orbit", "glyph00 spin", "glyph00 pulse", "glyph00 hop",
                             "glyph01 drift", "glyph01 orbit", "glyph01 spin", "glyph01 pulse", "glyph01 hop"]
    assert cache.flip_changes_class and meta["synthetic"]["benchmark"] == "glyphs"
    assert "glyphs benchmark" in cache.summary() and "change the class" in data.info(tmp_path / "g")
    assert not data.ClipCache(data.build_synthetic(tmp_path / "a", n_classes=4, clips_per_class=2, frames=4, size=8,
                                                   verbose=False) and tmp_path / "a").flip_changes_class
    assert data.ensure_synthetic(tmp_path / "g", benchmark="glyphs", n_classes=10, clips_per_class=3, frames=4,
                                 size=16) == str(tmp_path / "g")  # same params: reused, not rebuilt
    paper = data.render_glyph_clip("glyph00 spin", 0, 0, 2, 16)
    textured = data.render_glyph_clip("glyph00 spin", 0, 0, 2, 16, background="textured")
    corner = paper[0, 0, 0]  # a plain light page (no distractor in this clip's corner)
    assert corner.min() >= 190 and (corner == corner[0]).all() and not np.array_equal(paper, textured)
    assert meta["synthetic"]["grammar"]["background"] == "paper"
    for bad, match in ((dict(n_classes=12), "multiple of 5"), (dict(benchmark="nope"), "unknown benchmark"),
                       (dict(benchmark="actions", glyph_images=tmp_path), "glyphs benchmark"),
                       (dict(glyph_background="marble"), "unknown glyph background")):
        with pytest.raises(DataError, match=match):
            data.build_synthetic(tmp_path / "bad", **{"benchmark": "glyphs", "n_classes": 10, **bad},
                                 clips_per_class=2, frames=4, size=8, verbose=False)


def test_glyph_benchmark_draws_real_characters_from_images(tmp_path, capsys):
    """glyph_images: each clip a random drawing of its character (dark ink on light paper here)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        for k in range(2):
            page = np.full((30, 30), 255, np.uint8)
            page[5 + 3 * c: 25, 8 + k: 11 + k] = 0  # a bar, different for each character
            write_image(tmp_path / "chars" / "alphabet" / f"character{c:02d}" / f"{k}.png", page)
    write_image(tmp_path / "chars" / "alphabet" / "character02" / "blank.png", np.full((30, 30), 255, np.uint8))
    (tmp_path / "chars" / "alphabet" / "character01" / "broken.png").write_bytes(b"\x89PNG not really")
    meta = data.build_synthetic(tmp_path / "g", benchmark="glyphs", glyph_images=tmp_path / "chars", n_classes=10,
                                clips_per_class=2, frames=3, size=16, verbose=False, workers=1, seed=1)
    chars = {n.rsplit(" ", 1)[0] for n in meta["classes"]}
    assert len(chars) == 2 and all(c.startswith("alphabet/character") for c in chars)
    assert meta["synthetic"]["grammar"]["glyphs"] == "drawings"
    clips = data.ClipCache(tmp_path / "g").clips
    assert clips.shape == (20, 3, 16, 16, 3) and clips.std() > 0
    with pytest.raises(DataError, match="blank.png: no ink"):
        data._image_glyph(str(tmp_path / "chars" / "alphabet" / "character02" / "blank.png"))
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        data._image_glyph(str(tmp_path / "chars" / "alphabet" / "character01" / "broken.png"))
    drawings = data.read_glyph_images(tmp_path / "chars", 3, seed=0)  # the bad files skipped, and said
    assert sorted(len(v) for v in drawings.values()) == [2, 2, 2] and "skipped 2 unusable" in capsys.readouterr().out
    write_image(tmp_path / "only_blank" / "a" / "0.png", np.full((30, 30), 255, np.uint8))
    with pytest.raises(DataError, match="'a' has no usable drawing"):
        data.read_glyph_images(tmp_path / "only_blank", 1, seed=0)
    with pytest.raises(DataError, match="3 classes of images.*asked for 4"):
        data.build_synthetic(tmp_path / "g2", benchmark="glyphs", glyph_images=tmp_path / "chars", n_classes=20,
                             clips_per_class=2, frames=3, size=16, verbose=False)
