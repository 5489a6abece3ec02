"""stmeta.py: config overrides, checkpoints, logging and pictures."""

import json
import os

import numpy as np
import pytest
import torch

import stmeta


def test_presets_build_and_roundtrip_through_dict():
    for name in stmeta.PRESETS:
        cfg = stmeta.get_preset(name)
        d = stmeta.config_to_dict(cfg)
        json.dumps(d)  # checkpoints and config.json store this dict
        assert stmeta.config_from_dict(stmeta.Config, d) == cfg


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'nope'.*paper"):
        stmeta.get_preset("nope")


def test_overrides_convert_types_and_accept_unique_suffixes():
    cfg = stmeta.get_preset("cpu")
    rest = stmeta.apply_overrides(cfg, ["--encoder.depth=6", "--mask_ratio=0.5", "--meta.k_shot=5",
                                        "--lsa=false", "--mann.write=ntm", "positional"])
    assert rest == ["positional"]
    assert cfg.model.encoder.depth == 6 and cfg.model.mask_ratio == 0.5
    assert cfg.meta.k_shot == 5 and cfg.model.encoder.lsa is False and cfg.mann.write == "ntm"


def test_bad_overrides_name_the_key_or_value():
    cfg = stmeta.get_preset("cpu")
    with pytest.raises(ValueError, match="unknown config key 'dpth'"):
        stmeta.apply_overrides(cfg, ["--dpth=3"])
    with pytest.raises(ValueError, match="ambiguous.*epochs"):
        stmeta.apply_overrides(cfg, ["--epochs=3"])  # pretrain.epochs and finetune.epochs
    with pytest.raises(ValueError, match="--encoder.depth=six: expected int"):
        stmeta.apply_overrides(cfg, ["--encoder.depth=six"])
    with pytest.raises(ValueError, match="expected true or false"):
        stmeta.apply_overrides(cfg, ["--lsa=maybe"])


def test_unknown_field_in_saved_config_is_refused():
    d = stmeta.config_to_dict(stmeta.get_preset("tiny"))
    d["model"]["encoder"]["wdith"] = 3
    with pytest.raises(ValueError, match="wdith"):
        stmeta.config_from_dict(stmeta.Config, d)


def test_config_saved_before_a_field_existed_keeps_its_old_behaviour():
    """Runs saved before meta.pool / meta.k_shot_max read the mean of the tokens, 1-shot episodes."""
    d = stmeta.config_to_dict(stmeta.get_preset("cpu"))
    assert (d["meta"]["pool"], d["meta"]["k_shot_max"]) == ("space", 5)
    del d["meta"]["pool"], d["meta"]["k_shot_max"]
    old = stmeta.config_from_dict(stmeta.Config, d)
    assert (old.meta.pool, old.meta.k_shot_max) == ("mean", 0)
    assert "SAVED_BEFORE" not in stmeta.config_to_dict(old)["meta"]


def test_diff_configs_names_fields():
    a = stmeta.config_to_dict(stmeta.get_preset("tiny"))
    b = stmeta.config_to_dict(stmeta.get_preset("tiny"))
    b["model"]["encoder"]["depth"] = 7
    assert stmeta.diff_configs(a, b) == [("model.encoder.depth", 2, 7)]


def test_checkpoint_roundtrip_with_rng_state(tmp_path):
    path = str(tmp_path / "ck.pt")
    stmeta.seed_everything(3)
    obj = {"model": {"w": torch.randn(3)}, "config": stmeta.config_to_dict(stmeta.get_preset("tiny")),
           "step": 5, "rng": stmeta.rng_state()}
    expected = (torch.rand(2), np.random.rand(), __import__("random").random())
    stmeta.save_checkpoint(path, obj)
    loaded = stmeta.load_checkpoint(path)  # weights_only=True inside
    assert torch.equal(loaded["model"]["w"], obj["model"]["w"]) and loaded["step"] == 5
    stmeta.set_rng_state(loaded["rng"])
    again = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert [f for f in os.listdir(tmp_path)] == ["ck.pt"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    stmeta.save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        stmeta.save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert stmeta.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(stmeta.CheckpointError, match="no such checkpoint"):
        stmeta.load_checkpoint(str(tmp_path / "missing.pt"))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(stmeta.CheckpointError, match="empty.pt: the file is empty"):
        stmeta.load_checkpoint(str(empty))
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.randn(100)}}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(stmeta.CheckpointError, match="trunc.pt: not a readable"):
        stmeta.load_checkpoint(str(trunc))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(stmeta.CheckpointError, match="notes.pt"):
        stmeta.load_checkpoint(str(text))


def test_checkpoint_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"x": Payload()}, path)
    with pytest.raises(stmeta.CheckpointError, match="evil.pt") as e:
        stmeta.load_checkpoint(str(path))
    # torch's one line naming the blocked global, not its advice that weights_only=False "will likely succeed"
    assert "unsupported GLOBAL" in str(e.value) and "getcwd" in str(e.value), str(e.value)
    assert "likely succeed" not in str(e.value)


def test_precision_and_device():
    cpu = torch.device("cpu")
    assert stmeta.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp8"):
        stmeta.resolve_precision("fp8", cpu)
    assert stmeta.pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="tpu"):
        stmeta.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            stmeta.pick_device("cuda")


def test_runlog_writes_jsonl(tmp_path, capsys):
    log = stmeta.RunLog(str(tmp_path / "run" / "log.jsonl"))
    log({"step": 10, "total": 100, "loss": 0.5, "lr": 1e-3})
    assert "step 10/100 | loss 0.5 | lr 0.001" in capsys.readouterr().out
    rows = stmeta.read_log(str(tmp_path / "run" / "log.jsonl"))
    assert rows[0]["loss"] == 0.5 and "time" in rows[0]


def test_pictures_are_written(tmp_path):
    from PIL import Image
    stmeta.line_chart(str(tmp_path / "l.png"), {"a": ([0, 1, 2], [1.0, 0.5, 0.25])}, title="t", xlabel="x", ylabel="y")
    stmeta.bar_chart(str(tmp_path / "b.png"), ["x", "y"], [0.3, 0.5], [0.01, 0.02], hline=0.2, hline_label="chance")
    stmeta.heatmap(str(tmp_path / "h.png"), np.eye(3), ["a", "b", "c"], ["a", "b", "c"])
    frames = [np.zeros((8, 8, 3), np.uint8) + i * 20 for i in range(4)]
    stmeta.frame_grid(str(tmp_path / "g.png"), [frames, frames], ["r1", "r2"], ["0", "1", "2", "3"])
    stmeta.save_gif(str(tmp_path / "a.gif"), frames)
    for name in ("l.png", "b.png", "h.png", "g.png", "a.gif"):
        im = Image.open(tmp_path / name)
        assert im.width > 0 and im.height > 0
    assert Image.open(tmp_path / "a.gif").n_frames == 4


def test_imports_run_one_way():
    """stmeta <- data, models <- eval <- train: no module imports one below it in that order,
    and none imports inside a function (a hidden cycle)."""
    import ast

    order = ["stmeta", "data", "models", "eval", "train"]
    allowed = {"stmeta": set(), "data": {"stmeta"}, "models": {"stmeta"}, "eval": {"stmeta", "data", "models"},
               "train": {"stmeta", "data", "models", "eval"}}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in order:
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            ours = [n for n in names if n in order]
            assert set(ours) <= allowed[name], f"{name}.py imports {ours}"
            if ours:
                assert node.col_offset == 0, f"{name}.py line {node.lineno}: an import of {ours} inside a function"
