"""Shared pieces of the training and checkpoint tests: a fast config and run helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPILE_CACHE = Path(os.environ.get("MAXJAX_TEST_COMPILE_CACHE", "/tmp/maxjax-test-compile-cache"))

# tiny.yaml's structure (4 layers, 32 heads, 16 experts, top-2, the 12 + 4 device split) with
# narrower widths, shorter sequences and a short schedule, so a step takes a fraction of a second.
FAST = [
    "model.hidden_dim=64",
    "model.head_dim=2",
    "moe.expert_hidden_dim=256",
    "sequence.length=16",
    "sequence.batch_size=4",
    "sequence.total_tokens_per_batch=64",
    "schedule.warmup_steps=2",
    "schedule.total_steps=40",
    "training.validation_interval=4",
    "training.validation_batches=2",
    "checkpoint.interval_steps=4",
    "checkpoint.max_to_keep=3",
]
STEPS = 12


def train_argv(
    directory: Path, steps: int = STEPS, *extra: str, strategy: str = "single"
) -> list[str]:
    argv = ["--strategy", strategy, "--steps", str(steps), "--checkpoint-dir", str(directory)]
    for item in [*FAST, *extra]:
        argv += ["--set", item]
    return [*argv, "--no-progress"]


def records(directory: Path) -> list[dict]:
    return [
        json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()
    ]


def train_losses(directory: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(directory) if "loss" in r]


def subprocess_env() -> dict[str, str]:
    """The test process's devices, matmul precision and compilation cache (see conftest.py)."""
    return {
        **os.environ,
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "PYTHONUNBUFFERED": "1",
    }


def start_training(directory: Path, steps: int = STEPS, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "maxjax.train", *train_argv(directory, steps, *extra)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def one_error_line(stderr: str, prefix: str) -> str:
    """The single stderr line of a refused run (no traceback), checked and returned."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]
