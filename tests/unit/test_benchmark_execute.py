"""The loop every launcher shares (:func:`cuig_lightning.benchmark.execute.execute`), with a fake launcher whose
"jobs" write their run's metrics: finished runs are skipped, a run starts only after the runs it needs finished, at
most ``at_once`` run at a time, a run whose need failed fails unstarted, and runs still going when the loop is
interrupted are stopped."""

from __future__ import annotations

import json

import pytest
import yaml

from cuig_lightning.benchmark.execute import execute
from cuig_lightning.benchmark.plan import Run


class FakeLauncher:
    """Each job runs for two looks, then finishes its run (writes metrics.json) unless its key is in ``fail``."""

    poll_s = 0.0

    def __init__(self, at_once: int | None, fail: tuple = (), interrupt: str | None = None):
        self.at_once, self.fail, self.interrupt = at_once, fail, interrupt
        self.started: list[str] = []
        self.ended: list[str] = []
        self.stopped: list[str] = []
        self.most_at_once = 0
        self.looks: dict[str, int] = {}

    def start(self, run: Run) -> str:
        assert all(n.finished for n in run.needs), f"{run.key} started before its needs finished"
        name = run.key[0]
        self.started.append(name)
        self.most_at_once = max(self.most_at_once, len(self.started) - len(self.ended))
        return name

    def outcome(self, run: Run, name: str) -> str | None:
        if name == self.interrupt:
            raise KeyboardInterrupt
        self.looks[name] = self.looks.get(name, 0) + 1
        if self.looks[name] < 2:
            return None
        self.ended.append(name)
        if name in self.fail:
            return "exit 1"
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "metrics.json").write_text(json.dumps([{"targets": "A", "UA": 100.0}]))
        return ""

    def stop(self, name: str) -> None:
        self.stopped.append(name)


@pytest.fixture
def make_run(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"requests": [{"target": "A"}]}}))

    def make(name: str, *needs: Run) -> Run:
        return Run((name,), tmp_path / name, [str(config)], 0, needs=list(needs))

    return make


def test_needs_first_at_most_at_once_and_failures_reach_dependents(make_run):
    done = make_run("done")
    done.run_dir.mkdir()
    (done.run_dir / "metrics.json").write_text(json.dumps([{"targets": "A", "UA": 100.0}]))
    tune = make_run("tune")
    broken = make_run("broken")
    runs = [make_run("report", tune, done), tune, make_run("other"), broken, make_run("after_broken", broken),
            make_run("last"), done]
    launcher = FakeLauncher(at_once=2, fail=("broken",))
    failed = execute(runs, launcher)
    assert [r.key[0] for r in failed] == ["broken", "after_broken"]
    assert "done" not in launcher.started and "after_broken" not in launcher.started  # finished; its need failed
    assert launcher.started.index("report") > launcher.ended.index("tune")
    assert launcher.most_at_once == 2
    assert all(r.finished for r in runs if r.key[0] not in ("broken", "after_broken"))
    assert launcher.stopped == []

    unlimited = FakeLauncher(at_once=None)  # e.g. SLURM jobs: every run that can start, at once
    execute([make_run(f"free{i}") for i in range(5)], unlimited)
    assert unlimited.most_at_once == 5


def test_runs_still_going_are_stopped_when_the_loop_is_interrupted(make_run):
    launcher = FakeLauncher(at_once=3, interrupt="b")
    with pytest.raises(KeyboardInterrupt):
        execute([make_run("a"), make_run("b"), make_run("c")], launcher)
    assert sorted(launcher.stopped) == ["a", "b", "c"]  # none had finished: each would race a relaunch
