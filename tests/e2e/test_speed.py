"""``cuig speed``: the tiny CPU table through the real CLI, module and Trainer; how targets are judged; bad
arguments."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from cuig_lightning.speed import SpeedSettings, add_targets
from tests.helpers import CONFIGS, run_cli

TINY = ["speed", "--size", "tiny", "--groups", "[xattn_kv,full]", "--batch_sizes", "[2]",
        "--sample_batch_sizes", "[1,2]", "--variants", "[fp32,bf16]", "--warmup", "1", "--steps", "2",
        "--repeats", "1", "--sample_steps", "2"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_cpu_table(tmp_path, capsys):
    out = tmp_path / "speed"
    assert run_cli(*TINY, "--output", str(out), "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert (out / "speed.md").read_text() == printed  # the printed table is the file
    result = json.loads((out / "speed.json").read_text())

    # header names device, dtype, versions and date
    header = printed.splitlines()[2]
    for word in ("device: CPU", "dtype: bf16-mixed", "torch ", "diffusers ", "lightning ", "UTC"):
        assert word in header, header
    for heading in ("## ConAbl training step", "## Regularizer overhead", "## CFG sampling"):
        assert heading in printed
    for column in ("| variant", "| step ms", "| images/s", "| FLOP/step", "| MFU", "| peak mem", "| target MFU>=45%",
                   "| overhead", "| target <=2%", "| vs peer", "| target >=5x peer"):
        assert column in printed, column

    # every (variant, group, batch) once, with positive finite numbers and FLOPs counted
    train = result["train"]
    assert sorted((r["variant"], r["group"], r["batch"]) for r in train) == sorted(
        (v, g, 2) for v in ("fp32", "bf16") for g in ("xattn_kv", "full"))
    for r in train:
        assert positive(r["step_ms"]) and positive(r["images_per_s"]) and positive(r["flops_per_step"]), r
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no peak FLOP/s, no per-row memory
        assert f"| {r['variant']} " in printed
    flops = {r["group"]: r["flops_per_step"] for r in train if r["variant"] == "fp32"}
    assert flops["full"] > flops["xattn_kv"]  # every weight's gradient vs attn2 k/v only

    # targets cannot be judged on a CPU: n/a where they apply, never met / missed
    assert {r["target"] for r in train if r["variant"] == "bf16"} == {"n/a"}
    assert {r["target"] for r in train if r["variant"] == "fp32"} == {"-"}
    assert "| met " not in printed and "| missed " not in printed

    regs = result["regularizers"]
    assert sorted((r["group"], r["regularizer"]) for r in regs) == sorted(
        (g, n) for g in ("xattn_kv", "full") for n in ("GradientProjection", "L2"))
    for r in regs:
        assert positive(r["plain_ms"]) and positive(r["with_ms"]) and math.isfinite(r["overhead_pct"])
        assert r["target"] == "n/a"

    sampling = result["sampling"]
    assert sorted((r["variant"], r["batch"]) for r in sampling) == sorted(
        (v, b) for v in ("fp32", "bf16") for b in (1, 2))
    peer = result["peer"]
    assert positive(peer["images_per_s"]) and peer["batch"] == 1
    for r in sampling:
        assert positive(r["images_per_s"]) and positive(r["call_s"])
        assert r["vs_peer"] == pytest.approx(r["images_per_s"] / peer["images_per_s"])
    assert "| diffusers StableDiffusionPipeline (1 image/call) |" in printed
    assert result["meta"]["settings"]["sample_steps"] == 2 and result["meta"]["versions"]["torch"]


def test_targets_judged_only_where_they_can_be():
    """On a GPU at SD-1.5 size the targets read met / missed from the numbers; elsewhere n/a."""

    def result(device_peak):
        return {
            "meta": {"peak_bf16_flops": device_peak},
            "train": [{"variant": "bf16", "batch": 32, "mfu": 0.50},
                      {"variant": "bf16-compile", "batch": 32, "mfu": 0.30},
                      {"variant": "fp32", "batch": 32, "mfu": 0.60},
                      {"variant": "bf16", "batch": 8, "mfu": 0.60}],
            "regularizers": [{"overhead_pct": 1.5}, {"overhead_pct": 2.5}],
            "sampling": [{"variant": "bf16", "batch": 32, "images_per_s": 12.0},
                         {"variant": "bf16", "batch": 8, "images_per_s": 9.0}],
            "peer": {"images_per_s": 2.0},
        }

    def settings(size, device):
        return SpeedSettings(size=size, device=device, groups=["xattn_kv"], batch_sizes=[8, 32],
                             sample_batch_sizes=[8, 32], variants=["fp32", "bf16", "bf16-compile"], warmup=1, steps=1,
                             repeats=1, sampler="ddim", sample_steps=2, guidance=7.5, regularizers=True, peer=True, seed=0,
                             model_path=None)

    gpu = result(989.4e12)
    add_targets(gpu, settings("sd15", "cuda"))
    assert [r["target"] for r in gpu["train"]] == ["met", "missed", "-", "-"]
    assert [r["target"] for r in gpu["regularizers"]] == ["met", "missed"]
    assert [r["target"] for r in gpu["sampling"]] == ["met", "-"]  # 6x the peer at the largest batch

    unknown = result(None)  # a GPU without a known peak: MFU cannot be judged, the rest can
    add_targets(unknown, settings("sd15", "cuda"))
    assert [r["target"] for r in unknown["train"]] == ["n/a", "n/a", "-", "-"]
    assert [r["target"] for r in unknown["sampling"]] == ["met", "-"]

    cpu = result(None)
    add_targets(cpu, settings("tiny", "cpu"))
    assert {r["target"] for r in cpu["regularizers"] + cpu["sampling"][:1] + cpu["train"][:2]} == {"n/a"}


@pytest.mark.parametrize("args, needle", [
    (["--size", "huge"], "size"),
    (["--size", "tiny", "--batch_sizes", "[0]"], "batch_sizes"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_arguments_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "speed"
    assert run_cli("speed", *args, "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cuig: error:") and needle in err[0], err
    assert not out.exists()


def test_quick_sd15_config_parses(capsys):
    assert run_cli("speed", "--config", str(CONFIGS / "speed" / "sd15_quick.yaml"), "--print_config") == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["size"] == "sd15" and config["variants"] == ["fp32", "bf16"] and 32 in config["batch_sizes"]
