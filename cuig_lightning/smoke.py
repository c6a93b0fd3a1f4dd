"""``cuig smoke``: the Stable Diffusion 1.5 path end to end at full size, through cuig's own commands.

Random-weight parts are built from their configs and written as a diffusers folder
(:func:`~cuig_lightning.speed_setup.write_model`: SD-1.5's UNet, CLIP ViT-L/14 text encoder and VAE; SD's real BPE
tokenizer when OpenAI's merges file is found, :func:`~cuig_lightning.models.tiny_sd.find_bpe_file`), beside two random
ViT-L/16 classifiers in UnlearnCanvas' layout (``model_state_dict``, 51 styles / 20 objects). Then, with
``configs/unlearncanvas/seq12_style.yaml`` / ``seq12_object.yaml`` plus a Canvas-mini overlay's regularizer
(``configs/canvas_mini/*.yaml``) and a third config that overrides only paths and sizes (:func:`overrides`):

* ``cuig fit`` of 2 requests x ``steps`` steps for each row of :data:`ROWS` (sequential, evaluated after each
  request; + L1, L2, SelFT, TIES merge, GradProj on the object sequence: C from the object requests' caption set,
  merge + GradProj);
* ``cuig evaluate --run_dir <sequential> --request 1``: the erased style and one retained style x one object x one
  seed, at the model's full resolution (512 px for sd15);
* ``cuig export`` of the sequential run, then ``StableDiffusionPipeline.from_pretrained(out, local_files_only=True)``
  generating one image.

Every command runs in this process as the ``cuig`` executable runs it (:func:`cuig_lightning.cli.main`). Per
command: wall time and the process's peak RSS while it ran (Linux ``VmHWM``, reset before each command), and on a
GPU the peak allocated GPU memory. Written to ``{size}_{device}.md`` / ``.json`` in ``output`` (the image:
``{size}_{device}.png``, 128 px). ``--size tiny`` is the test model: a CPU dry run of the same commands in seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

import torch
import yaml

from cuig_lightning.checkpoints import write_json
from cuig_lightning.evaluation.unlearncanvas import OBJECTS, STYLES, VIT_L16, write_timm_vit
from cuig_lightning.models.tiny_sd import find_bpe_file
from cuig_lightning.speed_report import markdown_table, peak_bf16_flops
from cuig_lightning.speed_setup import Size, write_model
from cuig_lightning.versions import library_versions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RowName = Literal["sequential", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj"]
#: Row -> (the UnlearnCanvas job, the Canvas-mini overlay whose schedule and regularizers it adds).
ROWS: dict[str, tuple[str, str]] = {row: ("seq12_object" if row == "gradproj" else "seq12_style", row) for row in
                                    ("sequential", "l1", "l2", "selft", "merge", "gradproj", "merge_gradproj")}
#: The classifiers' shape per size: UnlearnCanvas' ViT-L/16 (timm's init scale), or a tiny ViT reading 32 px.
CLASSIFIERS = {"sd15": {**VIT_L16, "scale": 0.02}, "tiny": {"width": 64, "depth": 1, "patch": 8, "image_size": 32}}
PROMPT = "A Dogs image in Van_Gogh style."


def overrides(row: str, folder: Path, model: Path, classifiers: dict[str, str], steps: int, sample_steps: int,
              device: str, precision: str | None) -> dict:
    """The third config of a row's fit: paths (run folder, model, classifiers, anchor cache) and sizes (2 requests x
    ``steps`` steps, batch 1, one anchor prompt and image, ``sample_steps`` sampler steps, one seed, one retained
    style and object, SelFT's saliency from 2 timesteps), nothing else. Only the sequential row evaluates during
    its fit (``cuig evaluate`` reads its section)."""
    job, overlay = (yaml.safe_load((CONFIGS / part).read_text()) for part in
                    (f"unlearncanvas/{ROWS[row][0]}.yaml", f"canvas_mini/{ROWS[row][1]}.yaml"))
    trainer, data, given = job["trainer"], job["data"], job["trainer"]["evaluation"]
    evaluation = None if row != "sequential" else {
        **given, "style_classifier": classifiers["style"], "object_classifier": classifiers["object"],
        "seeds": [188], "steps": sample_steps, **{k: given[k][:1] for k in ("retain_styles", "retain_objects")}}
    out = {
        "trainer": {"run_dir": str(folder / "runs" / row), "requests": trainer["requests"][:2], "max_steps": steps,
                    "accelerator": "gpu" if device.startswith("cuda") else "cpu", "devices": 1,
                    "enable_progress_bar": False, "evaluation": evaluation,
                    **({} if precision is None else {"precision": precision})},
        "model": {"model_path": str(model)},
        "data": {"prompts": data["prompts"][:1], "images_per_prompt": 1, "batch_size": 1, "sample_steps": sample_steps,
                 "cache_dir": str(folder / "cache")},
    }
    callbacks = overlay["trainer"].get("callbacks") or []
    selft = [c["class_path"].endswith("SelectiveFineTuning") for c in callbacks]
    if any(selft):
        out["trainer"]["callbacks"] = [{**c, "init_args": {**c["init_args"], "num_timesteps": 2}} if is_selft else c
                                       for c, is_selft in zip(callbacks, selft)]
    return out


# ----------------------------------------------------------------------------- measuring
def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: ``clear_refs`` 5); False where it cannot be (then peaks accumulate)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_gib(field: str) -> float:
    """The process's resident set now (``VmRSS``) or its peak (``VmHWM``; elsewhere than Linux: ru_maxrss)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name: str, command: str, fn: Callable[[], int], device: str) -> dict:
    """Run ``fn`` (exit status 0 = ok; its stdout goes to stderr); its wall time, peak RSS while it ran and, on a
    GPU, peak GPU memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap memory resident until trimmed
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_gib("VmRSS")
    reset = _reset_peak_rss()
    print(f"[smoke] {command}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the report owns stdout
            status, error = fn(), None
    except Exception as err:  # noqa: BLE001 (recorded: the smoke goes on with the commands that do not need it)
        traceback.print_exc()
        status, error = 1, f"{type(err).__name__}: {err}".splitlines()[0][:300]
    row = {"step": name, "command": command, "wall_s": time.perf_counter() - start, "rss_before_gib": before,
           "peak_rss_gib": _rss_gib("VmHWM"), "peak_rss_reset": reset,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "ok": status == 0, "error": error if error or status == 0 else f"exit status {status}"}
    print(f"[smoke] {'ok' if row['ok'] else 'FAILED'} in {row['wall_s']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB"
          + (f": {row['error']}" if row["error"] else ""), file=sys.stderr, flush=True)
    return row


def cuig(*args: str) -> Callable[[], int]:
    """``cuig ARGS`` in this process, as the executable runs it (with ``CUIG_DEBUG``: an error raises, so that the
    report can say what it was); returns its exit status."""
    from cuig_lightning.cli import main

    def run() -> int:
        argv, sys.argv = sys.argv, ["cuig", *args]  # as the executable sees it (LightningCLI reads sys.argv too)
        debug = os.environ.get("CUIG_DEBUG")
        os.environ["CUIG_DEBUG"] = "1"
        try:
            main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            sys.argv = argv
            if debug is None:
                del os.environ["CUIG_DEBUG"]
            else:
                os.environ["CUIG_DEBUG"] = debug
        return 0

    return run


def generate_image(export: Path, png: Path, steps: int, device: str) -> Callable[[], int]:
    """Load the export with plain diffusers and generate one image (saved as a 128 px PNG)."""

    def run() -> int:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0)).images[0]
        print(f"[smoke] generated a {image.size[0]}x{image.size[1]} image", file=sys.stderr)
        image.resize((128, 128)).save(png)
        return 0

    return run


def build_parts(size: str, folder: Path, seed: int, bpe_file: Path | None) -> Callable[[], int]:
    """Write the random model folder and the two classifier files."""

    def run() -> int:
        write_model(size, folder / "model", seed, bpe_file if size == "sd15" else None)
        for domain, classes in (("style", STYLES), ("object", OBJECTS)):
            write_timm_vit(folder / "classifiers" / f"{domain}.pth", len(classes), seed=seed, **CLASSIFIERS[size])
        return 0

    return run


# ----------------------------------------------------------------------------- the run
def run_smoke(size: str, folder: Path, device: str, precision: str | None, rows: list[str], steps: int,
              sample_steps: int, seed: int, bpe_file: Path | None) -> dict:
    """Every command of the smoke in ``folder``; the result as written to the JSON file."""
    model, classifiers = folder / "model", {d: str(folder / "classifiers" / f"{d}.pth") for d in ("style", "object")}
    tokenizer = f"CLIP BPE ({bpe_file.name})" if size == "sd15" and bpe_file else "character-level CLIP (build_tiny_sd)"
    configured = yaml.safe_load((CONFIGS / "unlearncanvas" / "seq12_style.yaml").read_text())["trainer"]["precision"]
    result = {"meta": {"size": size, "device": device, "device_name": peak_bf16_flops(torch.device(device))[0],
                       "precision": precision or configured, "tokenizer": tokenizer, "steps": steps,
                       "sample_steps": sample_steps, "rows": rows, "torch_threads": torch.get_num_threads(),
                       "load_average": _load(), "versions": library_versions(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
              "commands": []}
    commands = result["commands"]

    def command(step: str, *args: str) -> bool:
        commands.append(measure(step, "cuig " + " ".join(_short(a, folder) for a in args), cuig(*args), device))
        return commands[-1]["ok"]

    commands.append(measure("build", f"write_model({size}) + 2 random ViT classifiers",
                            build_parts(size, folder, seed, bpe_file), device))
    if not commands[-1]["ok"]:
        return result
    result["meta"]["parameters"] = _parameters(model, classifiers)
    fitted = []
    for row in rows:
        base, overlay = ROWS[row]
        config = folder / "configs" / f"{row}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(overrides(row, folder, model, classifiers, steps, sample_steps, device,
                                                   precision), sort_keys=False))
        if command(f"fit {row}", "fit", "--config", str(CONFIGS / "unlearncanvas" / f"{base}.yaml"),
                   "--config", str(CONFIGS / "canvas_mini" / f"{overlay}.yaml"), "--config", str(config)):
            fitted.append(row)
    run_dir, export = folder / "runs" / "sequential", folder / "export"
    if "sequential" in fitted:
        command("evaluate", "evaluate", "--run_dir", str(run_dir), "--request", "1")
        if command("export", "export", "--run_dir", str(run_dir), "--output", str(export)):
            commands.append(measure("generate", f"StableDiffusionPipeline.from_pretrained(export), {sample_steps} "
                                                f"steps", generate_image(export, folder / "image.png", sample_steps,
                                                                         device), device))
    return result


def _short(arg: str, folder: Path) -> str:
    """A command-line argument as the report shows it: the scratch folder as ``$SMOKE``, configs repo-relative."""
    return arg.replace(str(folder), "$SMOKE").replace(str(CONFIGS), "configs")


def _load() -> str | None:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


def _parameters(model: Path, classifiers: dict[str, str]) -> dict[str, int]:
    """Parameter counts of the written parts (read from their files' headers where possible)."""
    from safetensors import safe_open

    counts = {}
    for part in ("unet", "text_encoder", "vae"):
        total = 0
        for file in sorted((model / part).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        counts[part] = total
    for domain, path in classifiers.items():
        state = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
        counts[f"{domain}_classifier"] = sum(v.numel() for v in state.values())
    return counts


def render(result: dict) -> str:
    """The report: a header, the parts' sizes, one row per command."""
    meta = result["meta"]
    v = meta["versions"]
    params = {k: f"{n / 1e6:.3g}M" for k, n in (meta.get("parameters") or {}).items()}
    lines = [f"# cuig smoke: {meta['size']} on {meta['device_name']}", "",
             f"device {meta['device']} ({meta['torch_threads']} torch threads, load average before the run "
             f"{meta['load_average']}) · precision {meta['precision']} · torch {v['torch']} · diffusers "
             f"{v['diffusers']} · lightning {v['lightning']} · {meta['date']}", "",
             f"Random weights: UNet {params.get('unet')}, text encoder {params.get('text_encoder')} (tokenizer: "
             f"{meta['tokenizer']}), VAE {params.get('vae')}, style / object ViT classifiers "
             f"{params.get('style_classifier')} / {params.get('object_classifier')}. "
             f"Fits: 2 requests x {meta['steps']} steps, batch 1; sampler steps {meta['sample_steps']}.", "",
             markdown_table(["step", "wall s", "peak RSS GiB", "RSS before GiB", "peak GPU GiB", "result", "command"],
                            [[r["step"], f"{r['wall_s']:.1f}",
                              f"{r['peak_rss_gib']:.2f}" + ("" if r["peak_rss_reset"] else "*"),
                              f"{r['rss_before_gib']:.2f}",
                              "n/a" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}",
                              "ok" if r["ok"] else f"FAILED: {r['error']}", f"`{r['command']}`"]
                             for r in result["commands"]]), "",
             "Peak RSS: the process's resident-set peak while the command ran (VmHWM reset before it; * = not reset, "
             "the peak since the process started); RSS before: what the process held when it started (every command "
             "runs in one process, as `cuig` runs it, after the garbage of the ones before was collected and glibc's "
             "heap trimmed). `$SMOKE` is the scratch folder."]
    return "\n".join(lines) + "\n"


def smoke(
    size: Size = "tiny",
    output: str = "results/speed",
    device: str = "cpu",
    precision: str | None = None,
    rows: list[RowName] | None = None,
    steps: int = 2,
    sample_steps: int = 2,
    seed: int = 0,
    bpe_vocab: str | None = None,
    workdir: str | None = None,
) -> None:
    """Full-size smoke: SD-1.5-sized random parts through cuig fit / evaluate / export and a diffusers load.

    Writes ``{size}_{device}.md`` / ``.json`` (wall time and peak memory per command) and ``{size}_{device}.png``
    into ``output``. Exits with status 1 when a command failed (the report says which).

    Args:
        size: ``sd15`` (SD-1.5's UNet, CLIP ViT-L/14 text encoder and VAE, UnlearnCanvas' ViT-L/16 classifiers,
            all random) or ``tiny`` (the test model and tiny ViTs: a dry run in seconds).
        output: folder of the report.
        device: ``cpu`` or ``cuda`` (fits, evaluation and the pipeline run there).
        precision: the fits' Trainer precision (default: the configs', ``bf16-mixed``).
        rows: the fits to run (default all: sequential, l1, l2, selft, merge, gradproj, merge_gradproj);
            evaluate / export / generate need ``sequential``.
        steps: training steps per request (2 requests per fit).
        sample_steps: anchor, evaluation and pipeline sampler steps.
        seed: seed of the random weights.
        bpe_vocab: OpenAI's CLIP merges (``bpe_simple_vocab_16e6.txt.gz``, a wheel holding it such as
            clip-anytorch's, or a folder with either) for SD's real tokenizer at ``sd15``; default: an installed
            ``clip`` / ``open_clip`` package's, else the character-level tokenizer (the report says which).
        workdir: where the model, runs and export go, a new or empty folder (default: a temporary folder, removed
            afterwards).
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"smoke runs on cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if steps < 1 or sample_steps < 1:
        raise ValueError("smoke needs steps and sample_steps >= 1")
    rows = list(dict.fromkeys(rows or ROWS))
    bpe_file = find_bpe_file(bpe_vocab)
    if workdir and Path(workdir).is_dir() and any(Path(workdir).iterdir()):
        raise ValueError(f"smoke workdir {workdir} is not empty (its finished runs would not train again)")
    out = Path(output)
    with (contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory(prefix="cuig-smoke-")) as scratch:
        folder = Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = run_smoke(size, folder, device, precision, rows, steps, sample_steps, seed, bpe_file)
        name = f"{size}_{device.split(':')[0]}"
        out.mkdir(parents=True, exist_ok=True)
        if (folder / "image.png").is_file():
            shutil.copyfile(folder / "image.png", out / f"{name}.png")
    result["meta"]["platform"] = platform.platform()
    write_json(result, out / f"{name}.json")
    (out / f"{name}.md").write_text(render(result))
    print(render(result), end="")
    failed = [r["step"] for r in result["commands"] if not r["ok"]]
    if failed:
        print(f"cuig: error: smoke failed at: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
