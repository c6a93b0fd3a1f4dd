"""The stop rule ("trained until UA >= 95") inside a real ``lightning.Trainer``: it stops at the first check
that reaches the threshold, checks only every ``every`` steps, and never extends ``max_steps``."""

from __future__ import annotations

import pytest

from cuig_lightning.stage import StopWhenForgotten
from tests.helpers import FakeUnlearning, fit, make_stage

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated")]


class _ScriptedEvaluation:
    """Answers the UA checks with the given values in order; records the training step of every check."""

    def __init__(self, module: FakeUnlearning, values: list[float]):
        self.module, self.values, self.asked = module, list(values), []

    def unlearn_accuracy(self, model, erased, domain):
        assert erased == ["Target"] and domain == "style"
        self.asked.append(self.module.trainer.global_step)
        return self.values.pop(0)


def _fit(tmp_path, values: list[float], every: int, max_steps: int):
    module = FakeUnlearning(make_stage(tmp_path))
    module.diffusion = None  # what the callback hands to the evaluation; the scripted one never samples
    evaluation = _ScriptedEvaluation(module, values)
    trainer = fit(module, [StopWhenForgotten(evaluation, ["Target"], "style", min_ua=95.0, every=every)], max_steps)
    return trainer, evaluation


def test_stops_at_the_first_check_that_reaches_the_threshold(tmp_path):
    trainer, evaluation = _fit(tmp_path, [40.0, 94.9, 96.0, 100.0], every=2, max_steps=20)
    assert evaluation.asked == [2, 4, 6]
    assert trainer.global_step == 6


def test_never_reached_trains_max_steps_and_skips_the_last_check(tmp_path):
    trainer, evaluation = _fit(tmp_path, [10.0] * 10, every=3, max_steps=8)
    assert evaluation.asked == [3, 6]  # step 8 is the job's own evaluation, not a check
    assert trainer.global_step == 8
