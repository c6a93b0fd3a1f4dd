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


def test_out_of_memory_rows_and_a_partial_report_render():
    """A row that ran out of GPU memory reads "out of memory" (its numbers n/a, no ratio, no verdict); a report written
    before every row was measured says it is partial."""
    from cuig_lightning.speed import render

    settings = SpeedSettings(size="sd15", device="cpu", groups=["full"], batch_sizes=[8, 32], sample_batch_sizes=[32],
                             variants=["bf16"], warmup=1, steps=1, repeats=1, sampler="ddim", sample_steps=2,
                             guidance=7.5, regularizers=True, peer=True, seed=0, model_path=None)
    oom = dict.fromkeys(["step_ms", "loop_ms", "images_per_s", "flops_per_step", "mfu", "peak_memory_gib"])
    result = {"meta": {"device_name": "GPU", "peak_bf16_flops": None, "reference": "bf16", "date": "today",
                       "versions": {"torch": "t", "diffusers": "d", "lightning": "l"}, "settings": vars(settings),
                       "peak_rss_gib": None, "partial": True},
              "train": [{"variant": "bf16", "group": "full", "batch": 8, "step_ms": 100.0, "loop_ms": 101.0,
                         "images_per_s": 80.0, "flops_per_step": 1e12, "mfu": None, "peak_memory_gib": 30.0},
                        {"variant": "bf16", "group": "full", "batch": 32, **oom, "error": "out of memory"}],
              "regularizers": [{"variant": "bf16", "group": "full", "batch": 8, "regularizer": "L2", "plain_ms": 100.0,
                                "with_ms": None, "overhead_pct": None, "error": "out of memory"}],
              "sampling": [{"sampler": "cuig", "variant": "bf16", "batch": 32, "call_s": None, "images_per_s": None,
                            "peak_memory_gib": None, "error": "out of memory"}],
              "peer": {"sampler": "diffusers StableDiffusionPipeline", "variant": "bf16", "batch": 1, "call_s": 1.0,
                       "images_per_s": 1.0, "peak_memory_gib": 3.0}}
    add_targets(result, settings)
    text = render(result)
    assert text.count("out of memory") == 3 and "**Partial:" in text
    assert result["sampling"][0]["vs_peer"] is None and result["sampling"][0]["target"] == "n/a"
    assert "| bf16    | full  | 32    | out of memory | n/a" in text


def test_a_measurement_that_runs_out_of_memory_is_a_row_and_the_run_goes_on(monkeypatch):
    from types import SimpleNamespace

    import torch

    from cuig_lightning import speed_measure
    from cuig_lightning.speed_setup import VARIANTS

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(speed_measure, "fit", out_of_memory)
    module = SimpleNamespace(trainable={"w": torch.nn.Parameter(torch.ones(2))})
    row = speed_measure.measure_step(module, None, None, None, VARIANTS["bf16"], "full", 32, 10, None)
    assert row == {"variant": "bf16", "group": "full", "batch": 32, "step_ms": None, "loop_ms": None,
                   "images_per_s": None, "flops_per_step": None, "mfu": None, "peak_memory_gib": None,
                   "error": "out of memory"}
    settings = SimpleNamespace(reference=VARIANTS["bf16"])
    rows = speed_measure.measure_regularizers(module, None, None, settings, "full", 8, 100.0)
    assert [(r["regularizer"], r["error"], r["overhead_pct"]) for r in rows] == [
        ("GradientProjection", "out of memory", None), ("L2", "out of memory", None)]
