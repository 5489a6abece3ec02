"""Tests for `python eval.py speed`: it runs end to end on the tiny preset and writes its
tables and JSON (no test asserts a time); the analytical FLOP counts equal torch's own
FLOP counter on the written-out model; the timm-style reference computes the same function as
our plain encoder, so the comparison is like for like. CUDA-only checks (marker `cuda`,
skipped without a GPU): the fast attention equals the written-out one in bf16 and uses a fused
kernel, every training stage runs a step on the GPU, and the benchmark runs there.
`python -m pytest tests/test_speed.py -q`; on a GPU machine `python -m pytest -m cuda -q`."""

import dataclasses
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import eval as evaluate
import models
import stmeta
import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine spinning
    intra-op threads make tiny steps 100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_speed_runs_on_tiny_and_writes_tables_and_json(tmp_path):
    out_json, out_md = str(tmp_path / "speed.json"), str(tmp_path / "speed.md")
    res = evaluate.main(["speed", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                         "--json", out_json, "--md", out_md])
    saved = json.load(open(out_json))
    assert saved["header"]["preset"] == "tiny" and saved["header"]["precision"] == "fp32"
    names = [r["workload"] for r in saved["training"]]
    for want in ("MAE pretraining, mask 0", "MAE pretraining, mask 0.75", "MAE pretraining, mask 0.9",
                 "classifier fine-tuning", "encoder, timm-style reference", "MANN meta-training, cached embeddings",
                 "MANN meta-training, end to end (backbone trained)"):
        assert want in names, want
    for r in saved["training"]:
        assert r["per_s"] > 0 and r["gflop_per_step"] > 0 and 0 < r["peak_fraction"] and r["peak_memory"] > 0
        assert r["time"]["min"] <= r["time"]["median"] <= r["time"]["max"] and len(r["time"]["times"]) == 2
    mae = {r["workload"]: r for r in saved["training"]}
    assert mae["MAE pretraining, mask 0.9"]["gflop_per_step"] < mae["MAE pretraining, mask 0"]["gflop_per_step"]
    assert [a["variant"] for a in saved["attention"]] == [
        "written out", "written out, LSA mask", "scaled_dot_product_attention",
        "scaled_dot_product_attention, LSA mask"]
    assert len(saved["loading"]) == 4 and all(d["clips_per_s"] > 0 for d in saved["loading"])
    assert any("timm-style" in c["workload"] for c in saved["comparison"]) and saved["targets"]
    md = open(out_md).read()
    assert md.startswith("## Speed") and "python eval.py speed --device cpu --preset tiny" in md
    for table in ("| training step |", "| encoder training step |",
                  "| attention, forward + backward |", "| data loading |"):
        assert table in md
    assert res["header"]["steps"] == 2


@pytest.mark.parametrize("kw", [dict(), dict(spt=False, lsa=False), dict(attention="divided"),
                                dict(cls_token=True, pos_embed="joint")])
def test_vit_flops_equal_torch_flop_counter(kw):
    """torch's counter sees the written-out attention's einsums (it has no formula for the CPU
    flash kernel), so both count the same matrix products."""
    cfg = dataclasses.replace(stmeta.mae_tiny().encoder, **kw)
    vit = models.VideoViT(cfg)
    models.set_fast_attention(vit, False)
    with FlopCounterMode(display=False) as counter:
        vit(torch.randn(2, 3, 4, 16, 16))
    assert counter.get_total_flops() == evaluate.speed_vit_flops(cfg, 2, 32)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_mae_flops_equal_torch_flop_counter(ratio):
    cfg = dataclasses.replace(stmeta.mae_tiny(), pred_t_dim=2)
    mae = models.VideoMAE(cfg)
    models.set_fast_attention(mae, False)
    with FlopCounterMode(display=False) as counter:
        mae(torch.randn(2, 3, 4, 16, 16), mask_ratio=ratio)
    kept = 32 if ratio == 0 else int(32 * (1 - ratio))
    assert counter.get_total_flops() == evaluate.speed_mae_flops(cfg, 2, kept)


def test_mann_flops_equal_torch_flop_counter():
    """LRUA: the LSTM gates, head and output layers, and the three einsums over the memory
    (cosine addressing, read, write) are the matrix products torch's counter sees."""
    cfg = stmeta.MANNConfig(controller_size=8, n_slots=4, slot_dim=3, read_heads=2)
    mann = models.MANN(cfg, input_dim=5, n_way=2)
    with FlopCounterMode(display=False) as counter:
        mann(torch.randn(3, 4, 5), torch.randint(-1, 2, (3, 4)))
    assert counter.get_total_flops() == evaluate.speed_mann_flops(cfg, 5, 2, episodes=3, S=4)


def test_timm_style_reference_is_our_plain_encoder():
    """With joint positions and no SPT/LSA our encoder is the same function as the reference,
    parameter for parameter: the benchmark compares implementations, not architectures."""
    cfg = dataclasses.replace(stmeta.mae_tiny().encoder, spt=False, lsa=False, pos_embed="joint")
    ours, ref = models.VideoViT(cfg), evaluate.TimmStyleEncoder(cfg)
    rename = {"patch_embed.proj.": "patch_embed.", "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2."}
    state = {}
    for k, v in ours.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = v
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 4, 16, 16)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_written_out_spt_lsa_reference_is_our_encoder():
    """The second reference (SPT and LSA as their published code writes them) is our SPT/LSA
    encoder with joint positions, parameter for parameter."""
    cfg = dataclasses.replace(stmeta.mae_tiny().encoder, pos_embed="joint")
    ours, ref = models.VideoViT(cfg), evaluate.WrittenOutSPTEncoder(cfg)
    rename = {"patch_embed.proj.": "patch_embed.", "patch_embed.norm.": "patch_norm.", "mlp.fc1.": "mlp.0.",
              "mlp.fc2.": "mlp.2."}
    state = {}
    for k, v in ours.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = v
    ref.load_state_dict(state)
    with torch.no_grad():
        for blk in ours.blocks:
            blk.attn.temperature.uniform_(0.1, 1.0)
        ref.load_state_dict({**state, **{k: v for k, v in ours.state_dict().items() if "temperature" in k}})
        ours.patch_embed.norm.weight.uniform_(0.5, 1.5)
        ref.patch_norm.weight.copy_(ours.patch_embed.norm.weight)
    x = torch.randn(2, 3, 4, 16, 16)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


# -----------------------------------------------------------------------------
# CUDA only (run on a GPU machine: python -m pytest -m cuda)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("lsa", [False, True])
def test_cuda_bf16_fast_attention_equals_written_out(lsa):
    torch.manual_seed(0)
    attn = models.Attention(192, 12, 16, qkv_bias=True, lsa=lsa).cuda()
    if lsa:
        attn.temperature.data.uniform_(0.1, 0.5)
    x = torch.randn(4, 512, 192, device="cuda")
    outs, grads = {}, {}
    for fast in (True, False):
        attn.fast = fast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = attn(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        outs[fast] = y.float()
        grads[fast] = {n: p.grad.clone() for n, p in attn.named_parameters()}
        attn.zero_grad()
    scale = outs[False].abs().max()
    assert (outs[True] - outs[False]).abs().max() <= 2e-2 * scale
    for name, g in grads[True].items():
        ref = grads[False][name]
        assert (g - ref).norm() <= 5e-2 * ref.norm(), name


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("lsa", [False, True])
def test_cuda_attention_uses_a_fused_kernel(lsa):
    """With the math fallback switched off the fast path still runs (forward and backward):
    flash, memory-efficient or cuDNN attention serves it, LSA's diagonal mask included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = models.Attention(192, 12, 16, lsa=lsa).cuda()
    x = torch.randn(4, 512, 192, device="cuda", requires_grad=True)
    fused = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         getattr(SDPBackend, "CUDNN_ATTENTION", None)) if b is not None]
    with sdpa_kernel(fused), torch.autocast("cuda", dtype=torch.bfloat16):
        attn(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "cache")
    data.build_synthetic(out, n_classes=30, clips_per_class=6, frames=8, size=16, seed=0, workers=1)
    return out


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("stage, extra", [(1, []), (2, []), (3, []), (3, ["--finetune"])])
def test_cuda_training_step_of_each_stage(tmp_path, tiny_data, stage, extra):
    out = str(tmp_path / "run")
    res = train.main(["--stage", str(stage), "--preset", "tiny", "--device", "cuda", "--data", tiny_data,
                      "--out", out, "--log-every", "1", *extra])
    ck = stmeta.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["step"] == ck["total"] > 0
    assert ck["config"]["precision"] == "auto"
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert res


@cuda
@pytest.mark.cuda
def test_cuda_speed_benchmark_runs(tmp_path):
    res = evaluate.main(["speed", "--preset", "tiny", "--device", "cuda", "--steps", "2", "--warmup", "1",
                         "--json", str(tmp_path / "s.json")])
    assert res["header"]["precision"] in ("bf16", "fp32")
    assert all(r["peak_memory"] > 0 for r in res["training"])
    assert "flash" in res["attention"][2]["kernel"] or "efficient" in res["attention"][2]["kernel"] \
        or "cudnn" in res["attention"][2]["kernel"]
