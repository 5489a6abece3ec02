"""train.py and eval.py end to end on tiny settings: every stage, resume, refusals, NaN
handling, two-process data parallelism, and every eval subcommand's tables and pictures."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as evaluate
import models
import stmeta
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """30 synthetic classes (24 meta-train / 6 meta-test), 6 clips each, 8 frames of 16x16."""
    out = str(tmp_path_factory.mktemp("synth") / "cache")
    data.build_synthetic(out, n_classes=30, clips_per_class=6, frames=8, size=16, seed=0, workers=1)
    return out


def run(tmp, tiny_data, *extra, stage=2, name="run"):
    out = os.path.join(tmp, name)
    argv = ["--stage", str(stage), "--preset", "tiny", "--device", "cpu", "--data", tiny_data, "--out", out,
            "--log-every", "1", *extra]
    return train.main(argv), out


def weights(path):
    return stmeta.load_checkpoint(path)["model"]


def assert_same_weights(path_a, path_b):
    a, b = weights(path_a), weights(path_b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_stage1_from_scratch_then_init_from_it(tmp_path, tiny_data):
    res, out = run(str(tmp_path), tiny_data, stage=1)
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["kind"] == "mae" and ck["step"] == ck["total"] == 4
    assert "start_val_loss" in ck["metrics"] and "val_loss" in ck["metrics"]
    for f in ("config.json", "log.jsonl", "curves.png", "best.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    res2, out2 = run(str(tmp_path), tiny_data, "--init", os.path.join(out, "last.pt"), stage=1, name="again")
    # starting from the trained model: its starting loss is the first run's final loss (same val clips)
    assert res2["start_val_loss"] == pytest.approx(res["val_loss"], rel=1e-4)
    # a stage-3 arm on that MAE is named by what its encoder is, and the next run does not inherit it
    _, arm = run(str(tmp_path), tiny_data, "--pretrained", os.path.join(out, "last.pt"), "--meta.steps=2", stage=3,
                 name="arm")
    ck = stmeta.load_checkpoint(os.path.join(arm, "last.pt"))
    assert ck["init_kind"] == "mae" and evaluate.encoder_name(ck, stmeta.Config()) == "MAE encoder, no labels (run/last.pt)"
    _, plain = run(str(tmp_path), tiny_data, "--meta.steps=2", stage=3, name="plain")
    assert stmeta.load_checkpoint(os.path.join(plain, "last.pt"))["init_kind"] is None
    # the classification arm on that MAE: --pretrained skips the MAE pretraining, not the classification phase
    _, tuned = run(str(tmp_path), tiny_data, "--pretrained", os.path.join(out, "last.pt"), "--meta.classify=true",
                   "--meta.steps=2", stage=3, name="tuned")
    assert not os.path.exists(os.path.join(tuned, "pretrain"))
    assert stmeta.load_checkpoint(os.path.join(tuned, "classify", "last.pt"))["kind"] == "classifier"
    ck = stmeta.load_checkpoint(os.path.join(tuned, "last.pt"))
    cfg = stmeta.config_from_dict(stmeta.Config, ck["config"])
    assert evaluate.encoder_name(ck, cfg) == "MAE encoder (run/last.pt), then tuned on meta-train labels"
    before = weights(os.path.join(arm, "last.pt"))
    after = weights(os.path.join(tuned, "last.pt"))
    enc = [k for k in after if k.startswith("backbone.") and k in before and after[k].is_floating_point()]
    assert enc and any(not torch.equal(before[k], after[k]) for k in enc)  # the tuned encoder is not the MAE's


def test_stage2_pretrains_then_classifies(tmp_path, tiny_data):
    res, out = run(str(tmp_path), tiny_data, "--labeled-fraction", "0.5", stage=2)
    assert os.path.exists(os.path.join(out, "pretrain", "last.pt"))
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["kind"] == "classifier" and len(ck["classes"]) == 24
    assert 0.0 <= res["val_acc"] <= 1.0 and res["val_top5"] >= res["val_acc"]


def test_stage3_default_flow_and_report(tmp_path, tiny_data):
    res, out = run(str(tmp_path), tiny_data, stage=3)
    assert os.path.exists(os.path.join(out, "pretrain", "last.pt"))  # pretraining phase ran first
    assert os.path.exists(os.path.join(out, "embeddings.pt"))  # frozen backbone: embedded once
    report = open(os.path.join(out, "report.md")).read()
    assert "Few-shot on held-out classes" in report and "nearest class mean" in report
    assert set(res["fewshot"]) == {"mann", "ncm", "logreg"}
    one = res["fewshot"]["mann"][1]
    assert one["episodes"] == 16 and 0 <= one["mean"] <= 1 and one["ci95"] >= 0


@pytest.mark.parametrize("backbone", ["scratch", "pixels"])
def test_stage3_other_backbones(tmp_path, tiny_data, backbone):
    res, out = run(str(tmp_path), tiny_data, "--backbone", backbone, "--meta.steps=2", stage=3)
    assert not os.path.exists(os.path.join(out, "pretrain"))  # no MAE phase for these
    assert 0 <= res["fewshot"]["mann"][1]["mean"] <= 1


def test_stage3_pooled_tokens_and_mixed_shots(tmp_path, tiny_data):
    """--meta.pool keeps the token grid in the MANN's input; --meta.k_shot_max meta-trains on K = 1..max
    (as many as the classes' clips allow); the report names both, and eval.py probe re-pools the encoder."""
    res, out = run(str(tmp_path), tiny_data, "--meta.pool=space", "--meta.k_shot_max=9", "--meta.steps=4", stage=3)
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    vit = stmeta.config_from_dict(stmeta.Config, ck["config"]).model.encoder
    grid = (vit.img_size // vit.patch_size) ** 2
    assert ck["model"]["norm.weight"].shape == (grid * vit.width,)  # the MANN reads every position's features
    report = open(os.path.join(out, "report.md")).read()
    assert "meta-trained 1- to 5-shot" in report and "tokens pooled `space`" in report  # 6 clips a class: K <= 5
    assert 0 <= res["fewshot"]["mann"][5]["mean"] <= 1
    probe = evaluate.main(["probe", "--run", out, "--episodes", "8", "--pool", "time", "--device", "cpu"])
    assert any(f"({(vit.num_frames // vit.tubelet_size) * vit.width} features, time pool)" in k for k in probe)


def test_frozen_inputs_are_centred_on_the_pretraining_pool(tmp_path, tiny_data):
    """meta.center_inputs (the default): the model's input_mean is the mean embedding of the MAE's
    pretraining pool (labels unused), saved with the weights and named in the report; false, or a
    backbone trained end to end, leaves it zero."""
    _, out = run(str(tmp_path), tiny_data, "--meta.steps=2", stage=3, name="centred")
    emb = stmeta.load_checkpoint(os.path.join(out, "embeddings.pt"))["embeddings"]
    pool = data.ClipCache(tiny_data).pretrain_pool("meta_train")
    mean = weights(os.path.join(out, "last.pt"))["input_mean"]
    assert mean.abs().sum() > 0 and torch.allclose(mean, emb[torch.as_tensor(pool)].mean(0))
    assert "inputs centred on the pretraining pool's mean" in open(os.path.join(out, "report.md")).read()
    _, off = run(str(tmp_path), tiny_data, "--meta.steps=2", "--meta.center_inputs=false", stage=3, name="off")
    _, e2e = run(str(tmp_path), tiny_data, "--backbone", "scratch", "--meta.steps=2", stage=3, name="e2e")
    for folder in (off, e2e):
        assert not weights(os.path.join(folder, "last.pt"))["input_mean"].any()
    # a config saved before the field existed was trained uncentred
    assert stmeta.config_from_dict(stmeta.MetaConfig, {"n_way": 5}).center_inputs is False


def test_fixed_input_norm_stays_at_its_start(tmp_path, tiny_data):
    """--meta.learn_input_norm=false with a frozen backbone: the norm's gain and bias are the
    initial input_norm / sqrt(D) and 0 after training; learned (the default), they move."""
    _, learned = run(str(tmp_path), tiny_data, "--meta.steps=3", stage=3, name="learned")
    _, fixed = run(str(tmp_path), tiny_data, "--meta.learn_input_norm=false", "--meta.steps=3", stage=3, name="fixed")
    a, b = weights(os.path.join(learned, "last.pt")), weights(os.path.join(fixed, "last.pt"))
    start = torch.full_like(b["norm.weight"], 4.0 / b["norm.weight"].numel() ** 0.5)
    assert torch.allclose(b["norm.weight"], start) and not b["norm.bias"].any()
    assert not torch.allclose(a["norm.weight"], start) and a["norm.bias"].any()
    assert not torch.equal(a["mann.out.weight"], b["mann.out.weight"])


def test_cluster_episodes_mix_into_meta_training(tmp_path, tiny_data, capsys):
    """--meta.clusters: the frozen embeddings of the meta-train clips are clustered (labels
    unused), a share of the batches are episodes of clusters, and the report names the arm;
    with the backbone trained end to end it is refused before any work."""
    res, out = run(str(tmp_path), tiny_data, "--meta.clusters=8", "--meta.cluster_share=0.5", "--meta.steps=3",
                   "--meta.input_dropout=0.2", stage=3)
    printed = capsys.readouterr().out
    assert "cluster episodes: 8 k-means clusters of 144 clips (labels unused)" in printed
    assert "purity by the meta-train labels" in printed and "50% of the batches" in printed
    report = open(os.path.join(out, "report.md")).read()
    assert "input dropout 0.2 + cluster episodes (8 k-means clusters, 50% of batches)" in report
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["config"]["meta"]["clusters"] == 8 and ck["step"] == 3
    with pytest.raises(SystemExit, match="--meta.clusters=8: cluster episodes need a frozen backbone"):
        run(str(tmp_path), tiny_data, "--meta.clusters=8", "--finetune", stage=3, name="tuned")
    with pytest.raises(SystemExit, match=r"--meta.clusters=3: 0 \(off\) or at least meta.n_way"):
        run(str(tmp_path), tiny_data, "--meta.clusters=3", stage=3, name="few")
    with pytest.raises(SystemExit, match=r"--meta.cluster_share=1.5: must be in \[0, 1\]"):
        run(str(tmp_path), tiny_data, "--meta.clusters=8", "--meta.cluster_share=1.5", stage=3, name="share")


def test_train_views_give_each_training_clip_augmented_embeddings(tmp_path, tiny_data, capsys):
    """--meta.train_views=V: every meta-train clip is embedded V times (the centred view and V - 1
    augmented ones, each a pure function of the seed, so differing from the centred one), training
    episodes read a random view, the report names the arm; refused where no embedding is cached."""
    cache = data.ClipCache(tiny_data)
    cfg = stmeta.preset_tiny()
    backbone = models.build_backbone("mae", cfg.model.encoder, pool="space").eval()
    pool = cache.indices(class_split="meta_train")
    centred = train.embed_all(backbone, cache, cfg, torch.device("cpu"), "fp32", quiet=True)
    aug = [train.embed_all(backbone, cache, cfg, torch.device("cpu"), "fp32", indices=pool, quiet=True, view=v)
           for v in (1, 1, 2)]
    torch.testing.assert_close(aug[0], aug[1])  # a view is reproducible
    held_out = torch.as_tensor(cache.indices(class_split="meta_test"))
    assert (aug[0][held_out] == 0).all()  # held-out clips are never augmented
    assert not torch.allclose(aug[0][pool], centred[pool]) and not torch.allclose(aug[0][pool], aug[2][pool])
    res, out = run(str(tmp_path), tiny_data, "--meta.train_views=3", "--meta.steps=3", stage=3)
    assert "training episodes read one of 3 views of each meta-train clip" in capsys.readouterr().out
    assert ", 3 views a clip" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(SystemExit, match="--meta.train_views=2: views are cached embeddings of a frozen backbone"):
        run(str(tmp_path), tiny_data, "--meta.train_views=2", "--finetune", stage=3, name="tuned")
    with pytest.raises(SystemExit, match=r"--meta.train_views=0: at least 1"):
        run(str(tmp_path), tiny_data, "--meta.train_views=0", stage=3, name="zero")


def test_view_episodes_mix_into_meta_training(tmp_path, tiny_data, capsys):
    """--meta.view_episodes: a share of the batches are episodes of single clips shown in distinct
    views (labels unused), the report names the arm; too few views for an episode is refused."""
    res, out = run(str(tmp_path), tiny_data, "--meta.train_views=4", "--meta.view_episodes=0.5", "--meta.steps=3",
                   "--meta.k_shot_max=3", "--labeled-fraction", "0.5", stage=3)
    printed = capsys.readouterr().out
    assert "meta-train episodes: K = 1..2, not ..3" in printed  # 3 labelled clips a class ...
    assert ("view episodes: 50% of the batches, each class one of 144 clips (labels unused), its instances 4 views, "
            "K = 1..3") in printed  # ... and the views allow the K asked for
    assert "+ view episodes (50% of batches)" in open(os.path.join(out, "report.md")).read()
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["config"]["meta"]["view_episodes"] == 0.5 and ck["step"] == 3 and ck["metrics"]["view_k_shot_max"] == 3
    assert evaluate.view_shot_range(ck, stmeta.config_from_dict(stmeta.Config, ck["config"]).meta) == "1- to 3-shot"
    # one labelled clip a class makes no labelled episode: refused when labelled episodes are asked
    # for, unless no batch needs labels
    with pytest.raises(SystemExit, match="meta-train episodes: class .* has 1 clip in this pool.*--meta.view_episodes=1"):
        run(str(tmp_path), tiny_data, "--labeled-fraction", "0.1", "--meta.view_episodes=0", stage=3, name="onelabel")
    with pytest.raises(SystemExit, match="view episodes .* need a frozen backbone: drop --finetune"):
        run(str(tmp_path), tiny_data, "--labeled-fraction", "0.1", "--finetune", stage=3, name="onelabel_e2e")
    _, free = run(str(tmp_path), tiny_data, "--meta.train_views=2", "--meta.view_episodes=1", "--meta.steps=2",
                  "--labeled-fraction", "0.1", stage=3, name="labelfree")
    assert stmeta.load_checkpoint(os.path.join(free, "last.pt"))["step"] == 2
    with pytest.raises(SystemExit, match=r"--meta.view_episodes=0.5: needs meta.train_views >= k_shot \+ n_query"):
        run(str(tmp_path), tiny_data, "--meta.view_episodes=0.5", stage=3, name="noviews")
    with pytest.raises(SystemExit, match=r"--meta.view_episodes=2.0: must be in \[0, 1\]"):
        run(str(tmp_path), tiny_data, "--meta.train_views=4", "--meta.view_episodes=2", stage=3, name="share")


def test_few_labels_take_the_semi_supervised_recipe(tmp_path, tiny_data, capsys):
    """--labeled-fraction below 1 on a frozen backbone fills in stmeta.SEMI_SUPERVISED for each field
    the command line leaves unset; too few labels for a labelled episode: view episodes alone;
    a backbone trained end to end (no cached views) and every label keep the config as it is."""
    def meta_of(out):
        return stmeta.load_checkpoint(os.path.join(out, "last.pt"))["config"]["meta"]

    _, half = run(str(tmp_path), tiny_data, "--labeled-fraction", "0.5", "--meta.steps=1", stage=3, name="half")
    assert "the semi-supervised recipe sets --meta.input_dropout=0.5 --meta.train_views=8 --meta.view_episodes=0.5" \
        in capsys.readouterr().out
    mc = meta_of(half)
    assert (mc["input_dropout"], mc["train_views"], mc["view_episodes"]) == (0.5, 8, 0.5)
    report = open(os.path.join(half, "report.md")).read()
    assert "+ view episodes (50% of batches)" in report and "Labels: 50% of each meta-train class's clips." in report
    # the user's own values win; the recipe fills in the rest
    _, own = run(str(tmp_path), tiny_data, "--labeled-fraction", "0.5", "--meta.input_dropout=0.2",
                 "--meta.train_views=2", "--meta.steps=1", stage=3, name="own")
    mc = meta_of(own)
    assert (mc["input_dropout"], mc["train_views"], mc["view_episodes"]) == (0.2, 2, 0.5)
    # one labelled clip a class: no labelled episode, so every batch is view episodes (no label read)
    _, one = run(str(tmp_path), tiny_data, "--labeled-fraction", "0.1", "--meta.steps=1", stage=3, name="one")
    printed = capsys.readouterr().out
    assert "semi-supervised recipe: meta-train episodes: class" in printed and "--meta.view_episodes=1" in printed
    assert "Labels: none read" in open(os.path.join(one, "report.md")).read()
    assert meta_of(one)["view_episodes"] == 1.0 and stmeta.label_free(stmeta.config_from_dict(
        stmeta.Config, stmeta.load_checkpoint(os.path.join(one, "last.pt"))["config"]).meta)
    # views need a frozen backbone's cached embeddings: end to end the recipe does not apply
    cfg = stmeta.get_preset("tiny")
    cfg.data.labeled_fraction, cfg.meta.freeze_backbone = 0.5, False
    assert train.semi_supervised_recipe(cfg, [], stage=3) == [] and cfg.meta.train_views == 1
    cfg = stmeta.get_preset("tiny")
    assert train.semi_supervised_recipe(cfg, [], stage=3) == [] and cfg.meta.view_episodes == 0  # every label
    cfg.data.labeled_fraction = 0.5  # the user's own semi-supervised episodes: no view episodes on top
    assert train.semi_supervised_recipe(cfg, ["--meta.clusters=8"], stage=3) == ["meta.input_dropout",
                                                                                "meta.train_views"]
    cfg = stmeta.get_preset("tiny")
    cfg.data.labeled_fraction = 0.5  # one view cannot make a view episode: they stay off
    assert train.semi_supervised_recipe(cfg, ["--train_views=1"], stage=3) == ["meta.input_dropout"]
    assert cfg.meta.view_episodes == 0


def test_warm_start_then_fine_tune_end_to_end(tmp_path, tiny_data):
    """--warm-start loads the whole MetaLearner of a frozen run (linear probing, then --finetune);
    a MANN of another shape, or a checkpoint that is not a stage-3 run, is refused up front."""
    _, frozen = run(str(tmp_path), tiny_data, "--meta.steps=3", stage=3, name="frozen")
    warm = os.path.join(frozen, "last.pt")
    res, out = run(str(tmp_path), tiny_data, "--warm-start", warm, "--finetune", "--meta.steps=1",
                   "--meta.lr=1e-12", "--meta.backbone_lr=1e-12", "--meta.warmup_steps=0", stage=3, name="tuned")
    assert not os.path.exists(os.path.join(out, "pretrain"))  # the encoder came with the warm run
    a, b = weights(warm), weights(os.path.join(out, "last.pt"))
    assert a.keys() == b.keys()
    for k in a:  # one step at lr 1e-12 from the warm weights: the same weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["warm_start"] == os.path.abspath(warm) and ck["init_kind"] is None  # the warm run trained its own MAE
    report = open(os.path.join(out, "report.md")).read()
    assert "fine-tuned end to end with the MANN" in report and "(warm start: frozen)" in report
    assert "1 steps x 4 = 4 episodes" in evaluate.run_budget(ck, stmeta.config_from_dict(stmeta.Config, ck["config"]))
    assert "(+ its warm start: 3 steps x 4 = 12 episodes" in evaluate.run_budget(
        ck, stmeta.config_from_dict(stmeta.Config, ck["config"]))
    with pytest.raises(SystemExit, match=r"--meta.pool=space, this run asks for --meta.pool=mean"):
        run(str(tmp_path), tiny_data, "--warm-start", warm, "--meta.pool=mean", stage=3, name="bad1")
    mae = os.path.join(frozen, "pretrain", "last.pt")
    with pytest.raises(SystemExit, match="a 'mae' checkpoint; it needs a stage-3"):
        run(str(tmp_path), tiny_data, "--warm-start", mae, stage=3, name="bad2")
    with pytest.raises(SystemExit, match="drop --pretrained"):
        run(str(tmp_path), tiny_data, "--warm-start", warm, "--pretrained", mae, stage=3, name="bad3")
    with pytest.raises(SystemExit, match="drop --meta.classify=true"):
        run(str(tmp_path), tiny_data, "--warm-start", warm, "--meta.classify=true", stage=3, name="bad5")
    with pytest.raises(SystemExit, match="--mann.controller_size=32, this run asks for --mann.controller_size=16"):
        run(str(tmp_path), tiny_data, "--warm-start", warm, "--mann.controller_size=16", stage=3, name="bad4")


def test_stage3_sequence_layout_reports_per_instance(tmp_path, tiny_data):
    res, out = run(str(tmp_path), tiny_data, "--backbone", "pixels", "--meta.layout=sequence", "--meta.seq_shots=3",
                   "--meta.steps=2", stage=3)
    seq = res["fewshot"]["mann"]["sequence"]
    assert len(seq["per_instance"]) == 3
    assert "accuracy by presentation" in open(os.path.join(out, "report.md")).read()


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    """An Omniglot-shaped image folder (alphabet/character/drawing.png, black ink on white, 1-bit
    PNGs like Omniglot's) made with Pillow, prepared as a 20 x 20 grey cache: 2 alphabets x 6
    characters x 10 drawings, each drawing its character's strokes, jittered."""
    from PIL import Image, ImageDraw
    root = tmp_path_factory.mktemp("glyphs")
    rng = torch.Generator().manual_seed(0)
    for a in range(2):
        for c in range(6):
            strokes = torch.randint(8, 56, (3, 4), generator=rng).tolist()
            folder = root / "images" / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(10):
                im = Image.new("1", (64, 64), 1)
                draw = ImageDraw.Draw(im)
                for x0, y0, x1, y1 in strokes:
                    j = torch.randint(-3, 4, (4,), generator=rng).tolist()
                    draw.line([x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3]], fill=0, width=5)
                im.save(folder / f"{d:02d}.png")
    out = root / "cache"
    data.prepare([f"folder:{root / 'images'}"], out, size=20, workers=1, meta_test_fraction=0.5, verbose=False)
    return str(out)


def test_omniglot_preset_sequence_run_and_ablation(tmp_path, glyphs):
    """Santoro's setting end to end on images: one-frame grey clips, rotated and shifted episodes,
    accuracy by presentation beside the label-count predictor, the learning curve, and the
    memory-free LSTM as an ablation arm on the same episodes."""
    cache = data.ClipCache(glyphs)
    assert cache.grey and cache.frames == 1 and len(cache.classes_in("meta_test")) == 6
    tiny = ["--mann.controller_size=16", "--mann.n_slots=8", "--mann.slot_dim=8", "--meta.steps=3",
            "--meta.eval_every=2", "--meta.batch_size=4", "--meta.val_episodes=8", "--meta.test_episodes=12"]
    argv = ["--stage", "3", "--preset", "omniglot", "--device", "cpu", "--data", glyphs, "--log-every", "1", *tiny]
    res = train.main(argv + ["--out", str(tmp_path / "mann")])
    seq = res["fewshot"]["mann"]["sequence"]
    assert len(seq["per_instance"]) == len(seq["per_instance_ci95"]) == 10
    blind = res["fewshot"]["label_count"]["sequence"]["per_instance"]
    assert blind[0] == pytest.approx(0.457, abs=0.01)  # 1/5 + 4/5 * 1/4 + ...: the count rule, computed
    assert {"ncm", "logreg"} <= set(res["fewshot"])
    ck = stmeta.load_checkpoint(str(tmp_path / "mann" / "last.pt"))
    assert ck["config"]["meta"]["pixels_channels"] == 1 and ck["model"]["norm.weight"].shape == (400,)
    assert os.path.exists(tmp_path / "mann" / "learning_curve.png")
    rows = stmeta.read_log(str(tmp_path / "mann" / "log.jsonl"))
    assert [r["episodes"] for r in rows if "val_per_instance" in r] == [8, 12]
    train.main(argv + ["--out", str(tmp_path / "lstm"), "--mann.read_heads=0"])
    arms = evaluate.main(["ablation", "--both", str(tmp_path / "mann"), "--extra", str(tmp_path / "lstm"),
                          "--device", "cpu"])
    names = list(arms)
    assert any(n.startswith("LSTM, no memory") for n in names) and any(n.startswith("label counting") for n in names)
    report = open(tmp_path / "mann" / "report.md").read()
    assert "12 steps x 4 = 12 episodes" not in report and "3 steps x 4 = 12 episodes" in report
    assert "MANN (LRUA), Santoro et al. 2016" in report


def test_resume_equals_uninterrupted_run(tmp_path, tiny_data):
    extra = ["--pretrain.max_steps=6", "--finetune.max_steps=6", "--pretrain.ckpt_every=2",
             "--finetune.ckpt_every=2"]
    full, full_out = run(str(tmp_path), tiny_data, *extra, stage=2, name="full")
    with pytest.raises(SystemExit) as stop:  # interrupted in the pretraining phase
        run(str(tmp_path), tiny_data, *extra, "--stop-after", "3", stage=2, name="cut")
    assert stop.value.code == 0
    with pytest.raises(SystemExit):  # and again in the fine-tuning phase
        run(str(tmp_path), tiny_data, *extra, "--resume", "--stop-after", "3", stage=2, name="cut")
    resumed, cut_out = run(str(tmp_path), tiny_data, *extra, "--resume", stage=2, name="cut")
    assert resumed["val_acc"] == full["val_acc"] and resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    assert_same_weights(os.path.join(full_out, "last.pt"), os.path.join(cut_out, "last.pt"))


def test_resume_equals_uninterrupted_stage3(tmp_path, tiny_data):
    extra = ["--backbone", "pixels", "--meta.steps=6", "--meta.ckpt_every=2"]
    full, full_out = run(str(tmp_path), tiny_data, *extra, stage=3, name="full")
    with pytest.raises(SystemExit):
        run(str(tmp_path), tiny_data, *extra, "--stop-after", "3", stage=3, name="cut")
    resumed, cut_out = run(str(tmp_path), tiny_data, *extra, "--resume", stage=3, name="cut")
    assert_same_weights(os.path.join(full_out, "last.pt"), os.path.join(cut_out, "last.pt"))
    assert resumed["fewshot"]["mann"][1]["mean"] == full["fewshot"]["mann"][1]["mean"]


def test_existing_run_and_incompatible_resume_are_refused(tmp_path, tiny_data):
    run(str(tmp_path), tiny_data, stage=1)
    with pytest.raises(SystemExit, match="already holds a run.*--resume"):
        run(str(tmp_path), tiny_data, stage=1)
    with pytest.raises(SystemExit, match=r"config differs[\s\S]*model.encoder.depth: saved 2, now 3"):
        run(str(tmp_path), tiny_data, "--resume", "--encoder.depth=3", stage=1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    with pytest.raises(SystemExit, match="not finite.*last good checkpoint.*step 1"):
        run(str(tmp_path), tiny_data, "--pretrain.lr=1e30", "--pretrain.ckpt_every=1", stage=1)
    ck = stmeta.load_checkpoint(os.path.join(tmp_path, "run", "last.pt"))
    assert ck["step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_bad_arguments_get_clear_messages(tmp_path, tiny_data):
    with pytest.raises(SystemExit, match="unknown config key 'dpth'"):
        run(str(tmp_path), tiny_data, "--dpth=3", stage=1)
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--stage", "1", "--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "x")])
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(SystemExit, match="broken.pt"):
        run(str(tmp_path), tiny_data, "--pretrained", str(bad), stage=2)
    with pytest.raises(SystemExit, match="labeled-fraction"):
        run(str(tmp_path), tiny_data, "--labeled-fraction", "0", stage=2)


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    for flag in ("--stage", "--device", "--data", "--preset", "--out", "--resume", "--seed", "--init",
                 "--pretrained", "--backbone", "--labeled-fraction", "--compile", "--precision"):
        assert flag in out, flag
    for key in stmeta.flatten_config(stmeta.get_preset("paper")):
        assert f"--{key}=" in out, key


def test_eval_subcommands_write_tables_and_pictures(tmp_path, tiny_data):
    _, s1 = run(str(tmp_path), tiny_data, stage=1, name="s1")
    evaluate.main(["recon", "--run", s1, "--device", "cpu", "--clips", "4"])
    report = open(os.path.join(s1, "report.md")).read()
    assert "| this model |" in report and "start (random init)" in report
    for f in ("recon_grid.png", "recon.gif", "recon_per_frame.png"):
        assert os.path.getsize(os.path.join(s1, f)) > 0

    _, s2 = run(str(tmp_path), tiny_data, stage=2, name="s2")
    res = evaluate.main(["classify", "--run", s2, "--device", "cpu"])
    assert 0 <= res["top1"] <= res["top5"] <= 1
    assert os.path.exists(os.path.join(s2, "confusion.png"))
    assert "Classification" in open(os.path.join(s2, "report.md")).read()

    _, s3 = run(str(tmp_path), tiny_data, stage=3, name="s3")
    _, sc = run(str(tmp_path), tiny_data, "--backbone", "scratch", "--meta.steps=2", stage=3, name="s3scratch")
    arms = evaluate.main(["ablation", "--both", s3, "--meta-only", sc, "--device", "cpu", "--episodes", "10"])
    assert len(arms) == 4 + 2 * len(evaluate.FLOORS)  # meta-only, NCM, logreg, both, and the floors
    report = open(os.path.join(s3, "report.md")).read()
    assert "Ablation" in report and "Few-shot" in report  # sections side by side
    assert os.path.exists(os.path.join(s3, "ablation_1shot.png"))

    plain = ("--meta.view_episodes=0", "--meta.train_views=1", "--meta.input_dropout=0")  # not the recipe: one arm
    _, half = run(str(tmp_path), tiny_data, "--labeled-fraction", "0.5", *plain, "--meta.steps=2", stage=3,
                  name="s3half")
    swept = evaluate.main(["labels", "--runs", s3, half, sc, "--out", os.path.join(s3, "labels.png")])
    assert sorted(len(v) for v in swept.values()) == [1, 2]  # the MAE arm at 100% and 50%, the scratch arm
    assert {f for v in swept.values() for f, *_ in v} == {1.0, 0.5} and os.path.exists(os.path.join(s3, "labels.png"))
    # fewer labels clamp a mixed-shot run's K (6 clips a class: 1..5; half of them: 1..2); still one arm
    _, mix = run(str(tmp_path), tiny_data, "--meta.k_shot_max=5", "--meta.steps=2", stage=3, name="mix")
    _, mix_half = run(str(tmp_path), tiny_data, "--meta.k_shot_max=5", "--labeled-fraction", "0.5", *plain,
                      "--meta.steps=2", stage=3, name="mixhalf")
    swept = evaluate.main(["labels", "--runs", mix, mix_half, "--out", os.path.join(mix, "labels.png")])
    assert [[(f, shots) for f, _, shots in v] for v in swept.values()] == [[(0.5, "1- to 2-shot"), (1.0, "1- to 5-shot")]]
    # a MANN meta-trained on view episodes alone used no labels: drawn at 0%
    _, views = run(str(tmp_path), tiny_data, "--meta.train_views=2", "--meta.view_episodes=1", "--meta.steps=2",
                   stage=3, name="viewsonly")
    swept = evaluate.main(["labels", "--runs", s3, views, "--out", os.path.join(s3, "labels.png")])
    assert sorted(f for v in swept.values() for f, *_ in v) == [0.0, 1.0]
    # --by model: one line for the model and encoder, each row naming its recipe
    swept = evaluate.main(["labels", "--runs", s3, half, views, "--by", "model", "--out", os.path.join(s3, "labels.png")])
    assert len(swept) == 1 and [f for f, *_ in next(iter(swept.values()))] == [0.0, 0.5, 1.0]
    assert next(iter(swept.values()))[0][2].startswith("2 views a clip + view episodes (100% of batches); views")
    # the classification arm read its labels in the classification phase, even where its MANN read none, and
    # nearest class mean on its tuned encoder moves with them: an arm of the sweep, not a fixed reference
    _, cls = run(str(tmp_path), tiny_data, "--meta.classify=true", "--labeled-fraction", "0.5", "--meta.train_views=2",
                 "--meta.view_episodes=1", "--meta.steps=2", stage=3, name="clshalf")
    swept = evaluate.main(["labels", "--runs", s3, cls, "--out", os.path.join(s3, "labels.png")])
    tuned = {k: v for k, v in swept.items() if "tuned on meta-train labels" in k}
    assert len(tuned) == 2 and all([f for f, *_ in v] == [0.5] for v in tuned.values())
    assert any(k.startswith("representation only: nearest class mean") for k in tuned)
    assert "Labels: 50% of each meta-train class's clips (the classification phase; the MANN read none)" in open(
        os.path.join(cls, "report.md")).read()

    # a stage-2 run, the MAE tuned on the labels: representation only given the same labels (its probe first)
    with pytest.raises(SystemExit, match="no probe.json.*eval.py probe --run"):
        evaluate.main(["labels", "--runs", s3, s2, "--out", os.path.join(s3, "labels.png")])
    evaluate.main(["probe", "--run", s2, "--device", "cpu", "--episodes", "8"])
    swept = evaluate.main(["labels", "--runs", s3, s2, "--out", os.path.join(s3, "labels.png")])
    tuned = {k: v for k, v in swept.items() if "tuned on the labels" in k}
    assert sorted(k.split(" on the ")[0] for k in tuned) == ["representation only: logistic regression",
                                                             "representation only: nearest class mean"]
    assert all([(f, r[1]["mean"] >= 0) for f, r, _ in v] == [(1.0, True)] for v in tuned.values())
    # ... and in the ablation, scored on the same episodes as every arm
    arms = evaluate.main(["ablation", "--both", s3, "--extra", s2, "--device", "cpu", "--episodes", "10"])
    tuned = [k for k in arms if k.startswith("representation only: MAE encoder, tuned on 100% of the labels")]
    assert len(arms) == 5 + 2 * len(evaluate.FLOORS) and len(tuned) == 2

    meta = evaluate.main(["export", "--run", s3, "--device", "cpu"])
    import numpy as np
    z = np.load(os.path.join(s3, "latents.npy"))
    assert z.shape[0] == len(meta["labels"]) == 180

    probe = evaluate.main(["probe", "--run", s1, "--device", "cpu", "--episodes", "8", "--shots", "1"])
    assert len(probe) == 1 + len(evaluate.FLOORS) and all(0 <= r[m][1]["mean"] <= 1 for r in probe.values() for m in ("ncm", "logreg"))
    report = open(os.path.join(s1, "report.md")).read()
    assert "Does the representation carry the class?" in report and "floor: mean frame" in report


def test_two_process_data_parallel_keeps_ranks_in_sync(tmp_path, tiny_data):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--stage", "2", "--preset", "tiny", "--device", "cpu", "--data", tiny_data,
                           "--out", out], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ranks in sync: True") == 2  # pretraining phase and fine-tuning phase
    assert os.path.exists(os.path.join(out, "last.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [[], ["--finetune"]], ids=["frozen", "finetune"])
def test_stage3_on_cuda(tmp_path, tiny_data, extra):
    """The whole stage 3 (MAE, classification with mixup, MANN, evaluation) on the GPU, bf16 where
    supported: generators, pinned copies and autocast on the device path, which CPU runs never touch."""
    out = os.path.join(str(tmp_path), "cuda")
    res = train.main(["--stage", "3", "--preset", "tiny", "--device", "cuda", "--data", tiny_data, "--out", out,
                      "--log-every", "1", "--meta.classify=true", *extra])
    assert 0 <= res["fewshot"]["mann"][1]["mean"] <= 1
    assert stmeta.load_checkpoint(os.path.join(out, "classify", "last.pt"))["kind"] == "classifier"


def test_logreg_in_the_support_span_is_the_same_fit():
    """With D > n support steps logreg_predict fits the n coordinates in their span (W = Q C):
    the same penalised objective, so the same weights and predictions as the fit over all D."""
    g = torch.Generator().manual_seed(0)
    labels = [c for c in range(6) for _ in range(8)]
    ep = data.EpisodeSampler(labels, range(48), range(6), 5, 3, 2).sample(20, g)
    centres = torch.randn(6, 300, generator=g)
    emb = centres[torch.tensor(labels)][ep.clips] + 1.5 * torch.randn(20, ep.clips.shape[1], 300, generator=g)
    z = torch.nn.functional.normalize(emb, dim=-1)
    W, b = evaluate.logreg_fit(z, ep.target, ~ep.is_query, 5, steps=500)
    full = (evaluate.LOGREG_SCALE * torch.bmm(z, W) + b).argmax(-1)
    span = evaluate.logreg_predict(emb, ep, 5, steps=500)
    assert (full[ep.is_query] == span[ep.is_query]).float().mean() >= 0.97  # (40 queries: one may tie-break otherwise)
    assert (span[ep.is_query] == ep.target[ep.is_query]).float().mean() > 0.4  # it learned something


def test_episode_loss_is_the_mean_over_scored_steps():
    """The masked form (no host sync on a GPU) equals cross-entropy over the scored steps only."""
    import models
    mann = models.MANN(stmeta.MANNConfig(controller_size=8, n_slots=6, slot_dim=4, read_heads=2), 5, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=g)
    target = torch.tensor([[0, 1, 2, 1], [2, 0, 1, 0]])
    is_query = torch.tensor([[False, False, True, True], [False, False, False, True]])
    zeros = torch.zeros(2, 4, dtype=torch.long)  # clips, and instance, rotation, down, right
    ep = data.Episode(zeros, target, torch.where(is_query, -1, target), is_query, zeros, zeros, zeros, zeros)
    loss, ok = models.episode_loss(mann, x, ep)
    logits, _ = mann(x, ep.label_in)
    expected = torch.nn.functional.cross_entropy(logits[is_query], target[is_query])
    torch.testing.assert_close(loss, expected)
    assert torch.equal(ok, logits.argmax(-1) == target)


# -- issue 12: exact resume at phase boundaries, inputs, the lock, refusals before any work


@pytest.mark.parametrize("kept", [("pretrain",), ("pretrain", "classify")])
def test_resume_at_a_phase_boundary_equals_uninterrupted(tmp_path, tiny_data, kept):
    """A stage-3 run killed after a phase finished and before the next phase's first checkpoint
    (for ("pretrain", "classify"): during the embedding pass) resumes to the same weights and
    accuracy: the skipped phase puts back the RNG state it ended with."""
    import shutil

    extra = ["--meta.steps=4", "--meta.ckpt_every=2", "--meta.classify=true"]
    full, full_out = run(str(tmp_path), tiny_data, *extra, stage=3, name="full")
    cut_out = os.path.join(tmp_path, "cut")
    for phase in kept:  # what a kill at that boundary leaves on disk
        shutil.copytree(os.path.join(full_out, phase), os.path.join(cut_out, phase))
    resumed, _ = run(str(tmp_path), tiny_data, *extra, "--resume", stage=3, name="cut")
    assert_same_weights(os.path.join(full_out, "last.pt"), os.path.join(cut_out, "last.pt"))
    assert resumed["fewshot"]["mann"][1]["mean"] == full["fewshot"]["mann"][1]["mean"]


def test_resume_truncates_the_log_and_removes_temporaries(tmp_path, tiny_data):
    with pytest.raises(SystemExit):
        run(str(tmp_path), tiny_data, "--pretrain.ckpt_every=2", "--stop-after", "3", stage=1)
    out = os.path.join(tmp_path, "run")
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # what a killed process logged past last.pt
        f.write(json.dumps({"step": 4, "total": 4, "loss": 99.0}) + "\n")
    open(os.path.join(out, "last.pt.abc.tmp"), "wb").close()
    run(str(tmp_path), tiny_data, "--pretrain.ckpt_every=2", "--resume", stage=1)
    steps = [r["step"] for r in stmeta.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps  # each step once
    assert 99.0 not in [r["loss"] for r in stmeta.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_resume_with_other_inputs_is_refused(tmp_path, tiny_data):
    import shutil

    with pytest.raises(SystemExit):
        run(str(tmp_path), tiny_data, "--stop-after", "2", stage=1)
    other = os.path.join(tmp_path, "other-cache")
    shutil.copytree(tiny_data, other)
    meta = json.load(open(os.path.join(other, "meta.json")))
    meta["seed"] = meta.get("seed", 0)
    meta["note"] = "another dataset"
    json.dump(meta, open(os.path.join(other, "meta.json"), "w"))
    with pytest.raises(SystemExit, match=r"inputs differ[\s\S]*--data[\s\S]*data fingerprint"):
        train.main(["--stage", "1", "--preset", "tiny", "--device", "cpu", "--data", other, "--resume",
                    "--out", os.path.join(tmp_path, "run")])


def test_one_process_per_run_folder(tmp_path, tiny_data):
    out = os.path.join(tmp_path, "run")
    os.makedirs(out)
    lock = stmeta.RunLock(out).acquire()  # held by this (live) process
    with pytest.raises(SystemExit, match="in use by another run"):
        run(str(tmp_path), tiny_data, stage=1)
    lock.release()
    with open(os.path.join(out, "run.lock"), "w") as f:  # left by a process that is gone
        f.write(f"{os.uname().nodename} 999999999")
    run(str(tmp_path), tiny_data, stage=1)
    assert not os.path.exists(os.path.join(out, "run.lock"))


@pytest.mark.parametrize("bad, says", [
    ("--meta.n_way=0", "--meta.n_way=0"), ("--meta.k_shot=0", "--meta.k_shot=0"),
    ("--meta.layout=bogus", "not one of support_query, sequence"), ("--mask_ratio=1.5", "mask_ratio=1.5"),
    ("--mask_ratio=1.0", "mask_ratio=1.0"), ("--mask_ratio=nan", "finite"), ("--seed=-1", "seed"),
    ("--encoder.attention=foo", "not one of joint, divided"), ("--meta.n_way=7", "needs 7 classes"),
    ("--meta.seq_shots=50", "needs 50 per class"), ("--meta.pool=cls", "not one of mean, space, time, tokens"),
    ("--meta.k_shot=2", "k_shot_max=1: 0 .* or at least meta.k_shot")])
def test_bad_values_are_refused_before_any_work(tmp_path, tiny_data, bad, says):
    extra = ["--meta.layout=sequence"] if "seq_shots" in bad else ["--meta.k_shot_max=1"] if "k_shot=2" in bad else []
    with pytest.raises(SystemExit, match=says) as e:
        run(str(tmp_path), tiny_data, bad, *extra, stage=3)
    assert e.value.code == 2
    assert not os.path.exists(os.path.join(tmp_path, "run", "pretrain")), "work started before the refusal"


def test_bad_paths_and_misfit_checkpoints_get_one_line(tmp_path, tiny_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="not a clip cache"):
        run(str(tmp_path), str(empty), stage=1)
    truncated = tmp_path / "truncated"
    import shutil

    shutil.copytree(tiny_data, truncated)
    with open(truncated / "clips.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match="clips.npy"):
        run(str(tmp_path), str(truncated), stage=1)
    ok, ok_out = run(str(tmp_path), tiny_data, stage=1, name="ok")
    ck = stmeta.load_checkpoint(os.path.join(ok_out, "last.pt"))
    ck["config"]["model"]["encoder"]["width"] = 64  # tensors no longer fit the config
    torch.save(ck, tmp_path / "misfit.pt")
    with pytest.raises(SystemExit, match="misfit.pt"):
        run(str(tmp_path), tiny_data, "--pretrained", str(tmp_path / "misfit.pt"), stage=2, name="m")


def test_command_line_errors_are_one_line_with_code_2(tmp_path, tiny_data):
    for cmd in (["train.py", "--stage", "3", "--preset", "tiny", "--device", "cpu", "--data", tiny_data,
                 "--out", str(tmp_path / "r"), "--meta.layout=bogus"],
                ["eval.py", "fewshot", "--run", str(tmp_path / "nope")],
                ["data.py", "info", str(tmp_path / "nope")]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stdout[-500:], proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: "), \
            proc.stderr[-1500:]


def test_pretraining_pool_keeps_unlabelled_clips_and_all_adds_held_out(tiny_data):
    cache = data.ClipCache(tiny_data)
    mt, allc = cache.pretrain_pool("meta_train"), cache.pretrain_pool("all")
    assert set(mt) == set(cache.indices(class_split="meta_train"))  # this cache has no unlabelled clips
    assert set(allc) == set(cache.indices(labelled_only=False)) and len(allc) > len(mt)
    cache.labels = cache.labels.copy()
    cache.labels[allc[0]] = -1  # an unlabelled clip: in the default pool
    assert allc[0] in cache.pretrain_pool("meta_train")


def test_pixel_floors_have_their_stated_shapes(tiny_data):
    cache = data.ClipCache(tiny_data)
    cfg = stmeta.get_preset("tiny")
    pool = cache.indices(class_split="meta_test")
    frame = evaluate.pixel_features(cache, cfg, pool, "frame")
    motion = evaluate.pixel_features(cache, cfg, pool, "motion")
    edges = evaluate.pixel_features(cache, cfg, pool, "edges")
    C = cfg.model.encoder.in_chans
    assert frame.shape == (len(cache.labels), C * 64) and motion.shape == (len(cache.labels), 2 * C * 64)
    assert edges.shape == (len(cache.labels), 64) and (edges[pool] >= 0).all() and edges[pool].sum() > 0
    others = np.setdiff1d(np.arange(len(cache.labels)), pool)
    assert frame[others].abs().sum() == 0 and motion[pool].abs().sum() > 0  # rows outside the pool stay zero


def test_flips_follow_the_benchmark(tmp_path, capsys):
    """A glyph cache says a flip changes the class: flips are off unless asked for, and asking warns."""
    cache = str(tmp_path / "glyphs")
    data.build_synthetic(cache, benchmark="glyphs", n_classes=30, clips_per_class=4, frames=8, size=16, workers=1,
                         verbose=False)
    run(str(tmp_path), cache, stage=1, name="off")
    assert stmeta.load_checkpoint(os.path.join(tmp_path, "off", "last.pt"))["config"]["data"]["hflip"] is False
    assert "horizontal flips off" in capsys.readouterr().out
    run(str(tmp_path), cache, "--data.hflip=true", stage=1, name="on")
    assert stmeta.load_checkpoint(os.path.join(tmp_path, "on", "last.pt"))["config"]["data"]["hflip"] is True
    assert "warning: --data.hflip=true on a benchmark whose classes change" in capsys.readouterr().out
    with pytest.raises(stmeta.Refused, match="give one of them"):  # a built-in benchmark or a cache, not both
        train.main(["--stage", "1", "--preset", "tiny", "--data", cache, "--benchmark", "glyphs",
                    "--out", str(tmp_path / "both")])


def test_run_eta_counts_each_phase_as_its_loop_does(tmp_path, tiny_data, capsys):
    """phase_work's steps are the loops' own totals; every progress line of a run of several
    phases carries the whole run's ETA, and a one-phase run's lines do not."""
    _, out = run(str(tmp_path), tiny_data, "--meta.classify=true", stage=3)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("plan: 4 phase(s)") and "their steps alone about" in line for line in lines)
    progress = [line for line in lines if line.startswith("phase ") and "ms/step" in line]
    assert progress and all("| run eta " in line for line in progress)
    cfg = stmeta.get_preset("tiny")
    plan = ["MAE pretraining", "classification", "MANN meta-training", "evaluation"]
    work = train.phase_work(plan, argparse.Namespace(stage=3, classes="meta_train"), cfg, data.ClipCache(tiny_data), 1)
    for name, folder in (("MAE pretraining", "pretrain"), ("classification", "classify"), ("MANN meta-training", "")):
        assert work[name] == stmeta.load_checkpoint(os.path.join(out, folder, "last.pt"))["total"], name
    assert work["embedding"] == 180 and work["evaluation"] == cfg.meta.test_episodes
    assert work["evaluation embedding"] == 36  # the 6 held-out classes' clips

    eta = train.RunETA(plan, {"MAE pretraining": 100, "classification": 10, "MANN meta-training": 50,
                              "embedding": 1000, "evaluation": 10, "evaluation embedding": 100},
                       {"MAE pretraining": 0.1, "classification": 1.0, "MANN meta-training": 0.2, "embedding": 0.01,
                        "evaluation": 0.5, "evaluation embedding": 0.01})
    assert eta.total() == pytest.approx(10 + 10 + 10 + 10 + 5 + 1)
    # steps measured at twice their calibration: so are the later phases that load clips as this one does
    # (classification, the embedding pass), not the MANN on cached embeddings
    eta.current = "MAE pretraining"
    assert eta.remaining(3.0, 0.2) == pytest.approx(3 + 2 * (10 + 10) + 10 + 6)
    eta.current = "MANN meta-training"  # the embedding pass is behind it; the evaluation is not rescaled
    assert eta.remaining(1.0, 0.1) == pytest.approx(1 + 6)

    before = torch.random.get_rng_state()  # the calibration leaves the run's random stream where it was
    seconds = train.calibrate(plan, cfg, torch.device("cpu"), "fp32", n_classes=24)
    assert torch.equal(torch.random.get_rng_state(), before) and all(v > 0 for v in seconds.values())
    assert set(seconds) == set(work)

    _, one = run(str(tmp_path), tiny_data, stage=1, name="one")
    assert not any("run eta" in line for line in capsys.readouterr().out.splitlines())


def test_ablation_chart_labels_are_short():
    assert evaluate.chart_label("floor: mean frame + mean abs frame difference, 8 x 8 each + nearest class mean") == \
        "floor: motion stats + NCM"
    assert evaluate.chart_label("both: MANN (LRUA) on MAE encoder, no labels (glyph-mae/last.pt)") == \
        "both: MANN on MAE encoder, no labels"
    assert evaluate.chart_label("LSTM, no memory on encoder of mae/last.pt") == "LSTM, no memory on encoder"
