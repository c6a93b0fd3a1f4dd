"""``cuig speed``'s targets and report: the device's bf16 peak (for MFU), the issue's targets judged per row
(:func:`add_targets`; only at SD-1.5 size on a GPU), and the markdown tables of ``speed.md`` beside ``speed.json``."""

from __future__ import annotations

import contextlib
import math
import platform
from pathlib import Path
from typing import Callable

import torch

from cuig_lightning.checkpoints import atomic_write, write_json
from cuig_lightning.speed_setup import VARIANTS, SpeedSettings

#: Dense bf16 peak FLOP/s by device name (first match wins: the more specific names come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312e12),
)

#: The issue's targets, stated for SD-1.5 size on an H100 / H200.
TARGET_MFU = 0.45  # ConAbl step at batch 32, bf16
TARGET_BATCH = 32
TARGET_PEER_RATIO = 5.0  # cuig's batched evaluation vs the one-image pipeline
TARGET_OVERHEAD = 2.0  # percent, a regularizer callback on top of the plain step


def peak_bf16_flops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (None: CPU or a device not in :data:`PEAK_BF16_FLOPS`)."""
    if device.type != "cuda":
        return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def judge(value: float | None, ok: Callable[[float], bool], applies: bool, measurable: bool) -> str:
    """``-`` where the target is about other rows; ``n/a`` where it cannot be judged here; else met / missed."""
    if not applies:
        return "-"
    if not measurable or value is None or not math.isfinite(value):
        return "n/a"
    return "met" if ok(value) else "missed"


def add_targets(result: dict, settings: SpeedSettings) -> None:
    """The issue's targets, judged per row (only at SD-1.5 size on a GPU; the MFU one needs a known peak)."""
    gpu_sd15 = settings.size == "sd15" and settings.torch_device.type == "cuda"
    top_batch = max(settings.batch_sizes)
    for row in result["train"]:
        applies = VARIANTS[row["variant"]].bf16 and row["batch"] == top_batch
        measurable = gpu_sd15 and result["meta"]["peak_bf16_flops"] is not None and row["batch"] >= TARGET_BATCH
        row["target"] = judge(row["mfu"], lambda v: v >= TARGET_MFU, applies, measurable)
    for row in result["regularizers"]:
        row["target"] = judge(row["overhead_pct"], lambda v: v <= TARGET_OVERHEAD, True, gpu_sd15)
    peer = result["peer"]
    top_sample = max(settings.sample_batch_sizes)
    for row in result["sampling"]:
        row["vs_peer"] = row["images_per_s"] / peer["images_per_s"] if peer and row["images_per_s"] else None
        applies = row["variant"] == settings.reference.name and row["batch"] == top_sample
        row["target"] = judge(row["vs_peer"], lambda v: v >= TARGET_PEER_RATIO, applies, gpu_sd15 and peer is not None)


def si(value: float | None, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' (three significant digits)."""
    if value is None:
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def render(result: dict) -> str:
    """The report as markdown: a header line and one table per measurement."""
    meta, s = result["meta"], result["meta"]["settings"]
    v = meta["versions"]
    out = [f"# cuig speed: {s['size']} on {meta['device_name']}",
           "",
           f"device: {meta['device_name']} ({s['device']}) · dtype: {VARIANTS[meta['reference']].precision} "
           f"(reference; each row names its variant) · torch {v['torch']} · diffusers {v['diffusers']} · "
           f"lightning {v['lightning']} · {meta['date']}",
           "",
           *(["**Partial: the run stopped (or is still running) before every row below was measured.**", ""]
             if meta.get("partial") else []),
           f"## ConAbl training step (Trainer fit, median of {s['steps']} steps after {s['warmup']})",
           "",
           markdown_table(
               ["variant", "group", "batch", "step ms", "images/s", "FLOP/step", "MFU", "peak mem",
                f"target MFU>={TARGET_MFU:.0%} (bf16, batch {TARGET_BATCH})"],
               [[r["variant"], r["group"], str(r["batch"]), r.get("error") or num(r["step_ms"]), num(r["images_per_s"]),
                 si(r["flops_per_step"]), "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}", gib(r["peak_memory_gib"]),
                 r["target"]] for r in result["train"]])]
    if result["regularizers"]:
        out += ["", f"## Regularizer overhead ({meta['reference']})", "",
                markdown_table(["group", "batch", "regularizer", "plain ms", "with ms", "overhead",
                                f"target <={TARGET_OVERHEAD:g}%"],
                               [[r["group"], str(r["batch"]), r["regularizer"], num(r["plain_ms"]),
                                 r.get("error") or num(r["with_ms"]),
                                 "n/a" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%", r["target"]]
                                for r in result["regularizers"]])]
    rows = [[r["sampler"], r["variant"], str(r["batch"]), r.get("error") or num(r["call_s"]), num(r["images_per_s"]),
             "n/a" if r["vs_peer"] is None else f"{r['vs_peer']:.2f}x", gib(r["peak_memory_gib"]), r["target"]]
            for r in result["sampling"]]
    if result["peer"]:
        p = result["peer"]
        rows.append([p["sampler"] + " (1 image/call)", p["variant"], "1", num(p["call_s"]), num(p["images_per_s"]),
                     "1.00x", gib(p["peak_memory_gib"]), "-"])
    out += ["", f"## CFG sampling ({s['sampler']} {s['sample_steps']} steps, guidance {s['guidance']:g}, VAE decode included; "
                f"median of {s['repeats']} calls)", "",
            markdown_table(["sampler", "variant", "batch", "s/call", "images/s", "vs peer",
                            "peak mem", f"target >={TARGET_PEER_RATIO:g}x peer"], rows)]
    if meta["peak_rss_gib"] is not None:
        out += ["", f"Process peak RSS {meta['peak_rss_gib']:.2f} GiB (CPU run: no per-row memory)."]
    return "\n".join(out) + "\n"


def write_report(result: dict, output: Path) -> str:
    """``speed.md`` and ``speed.json`` in ``output`` (each written to a temporary file, then renamed)."""
    text = render(result)
    atomic_write(output / "speed.md", lambda tmp: Path(tmp).write_text(text))
    write_json(result, output / "speed.json")
    return text
