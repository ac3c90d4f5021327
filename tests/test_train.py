"""python -m maxjax.train: learning, metrics, exact resume, and resume after SIGKILL."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _train_helpers import (
    REPO,
    STEPS,
    one_error_line,
    records,
    start_training,
    subprocess_env,
    train_argv,
    train_losses,
)

from maxjax import evaluate, train
from maxjax.checkpoint import saved_steps
from maxjax.parallel import STRATEGIES


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run that never stopped: STEPS steps in one call."""
    directory = tmp_path_factory.mktemp("reference")
    assert train.main(train_argv(directory)) == 0
    return directory


def test_short_run_lowers_validation_loss_and_logs_every_step(reference):
    rows = records(reference)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in (
        "loss",
        "lm_loss",
        "load_balancing_loss",
        "z_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "expert_fraction",
        "dropped_fraction",
    ):
        assert key in steps[-1], key
    assert len(steps[-1]["expert_fraction"]) == 16
    assert math.isclose(sum(steps[-1]["expert_fraction"]), 1.0, rel_tol=1e-5)
    # Each layer's shares every log_interval (10) steps: 4 rows of 16, their mean the above.
    assert [r["step"] for r in steps if "expert_fraction_by_layer" in r] == [10]
    (logged,) = [r for r in steps if r["step"] == 10]
    by_layer = np.asarray(logged["expert_fraction_by_layer"])
    assert by_layer.shape == (4, 16)
    np.testing.assert_allclose(by_layer.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(by_layer.mean(axis=0), logged["expert_fraction"], rtol=1e-5)
    # ... and the shares each expert kept within capacity: what is not dropped, none above its
    # routed share.
    assert [r["step"] for r in steps if "expert_kept_fraction_by_layer" in r] == [10]
    kept = np.asarray(logged["expert_kept_fraction_by_layer"])
    assert kept.shape == (4, 16) and np.all(kept <= by_layer + 1e-7)
    np.testing.assert_allclose(kept.sum(axis=1).mean(), 1 - logged["dropped_fraction"], rtol=1e-5)
    assert steps[0]["learning_rate"] == 0.0 and steps[2]["learning_rate"] > 0  # warmup of 2
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert val[-1]["val_loss"] < val[0]["val_loss"] < math.log(50265)
    assert math.isclose(val[-1]["val_perplexity"], math.exp(val[-1]["val_loss"]))
    assert sorted(p.name for p in reference.iterdir() if p.name.isdigit()) == ["12", "4", "8"]


def test_resume_equals_uninterrupted(reference, tmp_path, capsys):
    assert train.main(train_argv(tmp_path, 6)) == 0
    assert train.main(train_argv(tmp_path, STEPS)) == 0
    assert "resumed from the checkpoint of step 6" in capsys.readouterr().out
    assert train_losses(tmp_path) == train_losses(reference)


def _kill_when(process, ready, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the condition to kill at never came"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _logged_steps(directory) -> int:
    path = directory / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def test_sigkill_during_training_then_resume(reference, tmp_path):
    process = start_training(tmp_path)
    _kill_when(process, lambda: _logged_steps(tmp_path) >= 6)
    assert train.main(train_argv(tmp_path)) == 0
    assert train_losses(tmp_path) == train_losses(reference)


def test_sigkill_during_save_then_resume(reference, tmp_path):
    def saving_after_step_4() -> bool:
        return (
            any(
                "tmp" in p.name and not p.name.startswith("4.")
                for p in tmp_path.iterdir()
                if p.is_dir()
            )
            if _logged_steps(tmp_path) >= 8
            else False
        )

    process = start_training(tmp_path)
    _kill_when(process, saving_after_step_4)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any("tmp" in name for name in left), left  # killed while orbax was writing
    assert train.main(train_argv(tmp_path)) == 0
    assert train_losses(tmp_path) == train_losses(reference)


def test_ctrl_c_is_one_line_naming_the_checkpoint_to_resume_from(reference, tmp_path):
    """SIGINT during training: exit code 130, one line naming the newest intact checkpoint (a
    save in flight completes first), and the same command resumes from it exactly."""
    # `python -m maxjax.train` with Python's own SIGINT handler, as started from a terminal: a
    # shell that runs the tests in the background may pass SIGINT on ignored, and Python then
    # raises no KeyboardInterrupt (a preexec_fn would fork the multithreaded JAX process).
    start = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('maxjax.train', run_name='__main__', alter_sys=True)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", start, *train_argv(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while _logged_steps(tmp_path) < 6:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "training never reached step 6"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    line = one_error_line(stderr, "maxjax.train: interrupted")
    newest = saved_steps(tmp_path)[-1]
    assert newest >= 4
    assert f"the newest intact checkpoint is step {newest} in {tmp_path}" in line
    assert "run the same command again to resume" in line
    assert train.main(train_argv(tmp_path)) == 0
    assert train_losses(tmp_path) == train_losses(reference)


def test_evaluate_cli_reports_the_checkpoint(reference, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint-dir", str(reference), "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    logged = [r for r in records(reference) if "val_loss" in r][-1]
    assert result["step"] == STEPS
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    earlier = evaluate.evaluate(reference, step=8)
    assert earlier["step"] == 8 and earlier["val_loss"] > result["val_loss"]


@pytest.mark.skipif("ma" not in STRATEGIES, reason="the MA separation runner is not registered")
def test_restore_under_another_strategy_gives_the_same_validation_loss(reference):
    single = evaluate.evaluate(reference, strategy="single")
    ma = evaluate.evaluate(reference, strategy="ma")
    assert ma["strategy"] == "ma" and ma["step"] == single["step"]
    assert ma["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


@pytest.mark.skipif("ma" not in STRATEGIES, reason="the MA separation runner is not registered")
def test_training_continues_under_ma_from_a_single_device_checkpoint(reference, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    assert train.main(train_argv(resumed, STEPS + 1, strategy="ma")) == 0
    assert [step for step, _ in train_losses(resumed)] == list(range(1, STEPS + 2))


@pytest.mark.skipif("tp_pp" not in STRATEGIES, reason="the TP+PP runner is not registered")
def test_pipeline_checkpoints_hold_their_empty_placeholders_and_resume(reference, tmp_path):
    """TP=8+PP=2 stores its layers stacked per stage with zero-size placeholders, which orbax
    will not write: the checkpoint records them instead, a tp_pp run resumes from its own
    checkpoint, and another strategy reads it with the same validation loss."""
    resumed = tmp_path / "tp_pp"
    shutil.copytree(reference, resumed)
    assert train.main(train_argv(resumed, STEPS + 1, strategy="tp_pp")) == 0
    assert train.main(train_argv(resumed, STEPS + 2, strategy="tp_pp")) == 0
    assert [step for step, _ in train_losses(resumed)] == list(range(1, STEPS + 3))
    pipeline = evaluate.evaluate(resumed)
    single = evaluate.evaluate(resumed, strategy="single")
    assert pipeline["strategy"] == "tp_pp" and pipeline["step"] == single["step"] == STEPS + 2
    assert pipeline["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
