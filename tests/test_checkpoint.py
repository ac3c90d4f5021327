"""Checkpoints and bad input: each refusal is one line on stderr, exit code 1, nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from _train_helpers import (
    REPO,
    one_error_line,
    subprocess_env,
    train_argv,
    train_losses,
    use_compile_cache,
)

from maxjax import evaluate, train
from maxjax.checkpoint import CheckpointStore
from maxjax.parallel import STRATEGIES

compile_cache = pytest.fixture(scope="module", autouse=True)(use_compile_cache)


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """An 8-step run with checkpoints at steps 4 and 8."""
    directory = tmp_path_factory.mktemp("run8")
    assert train.main(train_argv(directory, 8)) == 0
    return directory


def _snapshot(directory):
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size)
        for p in directory.rglob("*")
        if p.is_file()
    )


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_evaluate_refuses_a_missing_or_empty_directory(tmp_path, capsys, kind):
    directory = tmp_path / "ckpt"
    if kind == "empty":
        directory.mkdir()
    assert evaluate.main(["--checkpoint-dir", str(directory)]) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.evaluate: error:")
    assert ("does not exist" if kind == "missing" else "holds no checkpoint") in line
    assert directory.exists() == (kind == "empty")


def test_checkpoint_of_another_model_shape_is_refused(run8, capsys):
    before = _snapshot(run8)
    argv = train_argv(run8, 10, "model.hidden_dim=128", "model.head_dim=4")
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert "different model" in line and "(50265, 64) in the checkpoint" in line
    assert _snapshot(run8) == before


def _damage(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(run8, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(run8, directory)
    _damage(directory / "8")
    result = evaluate.evaluate(directory)
    assert result["step"] == 4
    assert "step 8 is damaged" in capsys.readouterr().err

    assert train.main(train_argv(directory, 8)) == 0
    err = capsys.readouterr().err
    assert "step 8 is damaged" in err and "moved damaged checkpoint of step 8" in err
    assert (directory / "damaged" / "8").is_dir()
    assert train_losses(directory) == train_losses(run8)
    assert CheckpointStore(directory, create=False).steps() == [4, 8]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    argv = train_argv(tmp_path, 8, "optimizer.learning_rate=1e30", "checkpoint.interval_steps=2")
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert "loss became nan at step" in line and "newest good checkpoint is step 2" in line
    assert CheckpointStore(tmp_path, create=False).steps() == [2]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "model.hidden_size=3"], "config key 'model.hidden_size': unknown key"),
        (
            ["--set", "training.source=files", "--set", "training.data_files=[/no/such.txt]"],
            "data file '/no/such.txt' does not exist",
        ),
        (["--strategy", "nonesuch"], "'nonesuch' is not available"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, expected):
    assert train.main([*train_argv(tmp_path / "run", 4), *extra]) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert expected in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.skipif("ma" not in STRATEGIES, reason="the MA separation runner is not registered")
def test_too_few_devices_is_one_line(tmp_path):
    env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-m", "maxjax.train", *train_argv(tmp_path, 4, strategy="ma")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    line = one_error_line(result.stderr, "maxjax.train: error:")
    assert "needs 16 devices" in line and "JAX sees 4" in line
