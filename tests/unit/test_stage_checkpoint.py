"""The mid-request checkpoint writer: atomic (a failed write keeps the previous one), recorded in last.json,
and never written at a request's last step (so the end-of-stage work is replayed on resume)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cuig_lightning.stage import StageCheckpoint


class _Trainer:
    is_global_zero = True
    strategy = SimpleNamespace(barrier=lambda *args: None)

    def __init__(self, step: int, max_steps: int = 10, fail: bool = False):
        self.global_step, self.max_steps, self.fail = step, max_steps, fail

    def save_checkpoint(self, path, weights_only=False):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint" if self.fail else f"step {self.global_step}".encode())
        if self.fail:
            raise OSError(28, "No space left on device", str(path))


def test_atomic_recorded_and_not_at_the_last_step(tmp_path):
    owner = {"request": 1}
    cb = StageCheckpoint(tmp_path, 2, owner)
    last = tmp_path / "partial" / "last.ckpt"
    last.parent.mkdir()
    cb._save_checkpoint(_Trainer(2), str(last))
    first = json.loads((last.parent / "last.json").read_text())
    assert last.read_bytes() == b"step 2" and first["step"] == 2 and first["owner"] == owner
    with pytest.raises(OSError):
        cb._save_checkpoint(_Trainer(4, fail=True), str(last))
    assert last.read_bytes() == b"step 2"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.json"]  # no leftover
    cb._save_checkpoint(_Trainer(4), str(last))
    info = json.loads((last.parent / "last.json").read_text())
    assert info["previous"] == first["sha256"] and last.read_bytes() == b"step 4"
    cb._save_checkpoint(_Trainer(10), str(last))  # the last step: not written
    assert last.read_bytes() == b"step 4"


def test_a_full_disk_in_torch_save_is_an_oserror_naming_the_checkpoint(tmp_path):
    """torch.save's writer says "PytorchStreamWriter failed writing file ..." as a RuntimeError on a full disk."""

    class _FullDisk(_Trainer):
        def save_checkpoint(self, path, weights_only=False):
            open(path, "wb").write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")

    last = tmp_path / "partial" / "last.ckpt"
    last.parent.mkdir()
    with pytest.raises(OSError, match=rf"cannot write mid-request checkpoint {last}: .*failed writing file data/3"):
        StageCheckpoint(tmp_path, 2, {"request": 1})._save_checkpoint(_FullDisk(2), str(last))
    assert list(last.parent.iterdir()) == []
    with pytest.raises(RuntimeError, match="something else"):  # other errors are left as they are
        class _Other(_Trainer):
            def save_checkpoint(self, path, weights_only=False):
                raise RuntimeError("something else")

        StageCheckpoint(tmp_path, 2, {"request": 1})._save_checkpoint(_Other(2), str(last))
