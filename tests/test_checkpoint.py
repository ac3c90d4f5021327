"""Checkpoints and bad input: each refusal is one line on stderr, exit code 1, nothing lost."""

from __future__ import annotations

import builtins
import concurrent.futures
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_helpers import (
    FAST,
    REPO,
    one_error_line,
    subprocess_env,
    train_argv,
    train_losses,
)

import maxjax
from maxjax import checkpoint, evaluate, model, train
from maxjax.checkpoint import CheckpointStore, all_finite
from maxjax.config import load_config, with_overrides
from maxjax.optim import make_optimizer
from maxjax.parallel import STRATEGIES, make_runner


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """An 8-step run with checkpoints at steps 4 and 8."""
    directory = tmp_path_factory.mktemp("run8")
    assert train.main(train_argv(directory, 8)) == 0
    return directory


def _snapshot(directory, times=False):
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns if times else 0)
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


def _restored_is_finite(directory, step):
    store = CheckpointStore(directory, create=False)
    try:
        cfg = load_config("tiny", FAST)
        restored_step, exported, _, _ = store.restore(model.abstract_params(cfg), step)
    finally:
        store.close()
    leaves = [exported[k] for k in ("params", "mu", "nu")]
    return restored_step == step and all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(leaves)
    )


def test_non_finite_step_stops_and_resume_uses_a_finite_checkpoint(tmp_path, capsys):
    """lr 1e30: warmup gives step 1 a learning rate of 0 and step 2 one of 5e29, so the
    parameters after step 2 are about 5e29 (finite in float32) and the forward and backward of
    step 3 overflow. Step 3 must not be saved, and the checkpoint of step 2 holds the parameters
    that produced the overflow: it is moved aside, and step 1 is the newest good checkpoint."""
    argv = train_argv(tmp_path, 8, "optimizer.learning_rate=1e30", "checkpoint.interval_steps=1")
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert "at step 3 (computed from the parameters of step 2)" in line
    assert "stopped without saving step 3" in line and "newest good checkpoint is step 1" in line
    assert CheckpointStore(tmp_path, create=False).steps() == [1]
    assert (tmp_path / "damaged" / "2").is_dir()
    assert _restored_is_finite(tmp_path, 1)

    # A sane learning rate changes what the run computes: refused, then accepted when asked.
    sane = train_argv(tmp_path, 4, "checkpoint.interval_steps=1")
    assert train.main(sane) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert "optimizer.learning_rate 1e+30 -> 0.003" in line and "--allow-config-change" in line
    assert train.main([*sane, "--allow-config-change"]) == 0
    out = capsys.readouterr()
    assert "resumed from the checkpoint of step 1" in out.out
    assert "resuming with config changes in optimizer.learning_rate" in out.err
    assert [s for s, _ in train_losses(tmp_path)] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in train_losses(tmp_path))


def test_a_checkpoint_with_non_finite_values_is_skipped_on_restore(run8, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(run8, directory)
    cfg = load_config("tiny", FAST)
    store = CheckpointStore(directory)
    _, exported, meta, saved_cfg = store.restore(model.abstract_params(cfg), 8)
    kernel = np.array(exported["params"]["lm_head"]["kernel"])
    kernel[0, 0] = np.nan
    exported["params"]["lm_head"]["kernel"] = kernel
    store.save(12, exported, {k: v for k, v in meta.items() if k != "step"}, saved_cfg)
    store.wait()
    store.close()

    assert evaluate.evaluate(directory)["step"] == 8
    assert "step 12 is damaged (its params hold non-finite values)" in capsys.readouterr().err
    assert train.main(train_argv(directory, 8)) == 0
    assert "moved damaged checkpoint of step 12" in capsys.readouterr().err
    assert CheckpointStore(directory, create=False).steps() == [4, 8]


def test_resume_with_allow_config_change_accepts_a_changed_seed(run8, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(run8, directory)
    argv = train_argv(directory, 9, "training.seed=1")
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
    assert "training.seed 0 -> 1" in line and "--allow-config-change" in line
    assert train.main([*argv, "--allow-config-change"]) == 0
    assert "resuming with config changes in training.seed" in capsys.readouterr().err
    assert [s for s, _ in train_losses(directory)][-1] == 9


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


@pytest.mark.parametrize(
    "override, refused",
    [
        # Run-defining: the resumed steps would not be those of the run that never stopped.
        ("optimizer.learning_rate=1e-3", True),
        ("optimizer.betas=[0.8, 0.9]", True),
        ("optimizer.weight_decay=0.0", True),
        ("optimizer.gradient_clipping=0.5", True),
        ("schedule.warmup_steps=3", True),
        ("schedule.total_steps=80", True),
        ("training.dtype=bfloat16", True),
        ("training.validation_split=0.2", True),
        ("training.seed=1", True),
        ("moe.capacity_factor=2.0", True),
        ("moe.expert_dropout=0.0", True),
        ("ma_separation.synchronization.communication_compression=none", True),
        # Where arrays live or in which order the same sums are taken: named in a warning.
        ("ma_separation.microbatches=1", False),
        ("ma_separation.transport=collective", False),
        ("ma_separation.expert_compute=filled_slots", False),
        ("ma_separation.synchronization.sync_interval=5", False),
        ("training.gradient_checkpointing=true", False),
        ("baselines.microbatches=2", False),
        # Reporting and saving only: not even named.
        ("training.validation_interval=2", None),
        ("training.validation_batches=1", None),
        ("training.log_interval=3", None),
        ("checkpoint.interval_steps=2", None),
    ],
)
def test_resume_refuses_exactly_the_keys_that_change_what_is_computed(override, refused):
    cfg = load_config("tiny", FAST)
    changed = with_overrides(cfg, [override])
    key = override.split("=")[0]
    if refused:
        with pytest.raises(train.ResumeError) as error:
            train._check_resume(cfg.to_dict(), changed, 8, Path("run"))
        assert f"({key} " in str(error.value) and "--allow-config-change" in str(error.value)
    else:
        named = train._check_resume(cfg.to_dict(), changed, 8, Path("run"))
        assert named == ([key] if refused is False else [])


def _bad_inputs(tmp_path):
    """(name, arguments, expected words in the one line) of every refused input."""
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a directory")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            f'{{"text": "document {i} says the number {i * 7} twice: {i * 7}."}}\n'
            for i in range(200)
        )
    )
    files = ["--set", "training.source=files", "--set"]
    return [
        (
            "batch vs micro-batches",
            ["--set", "sequence.batch_size=3", "--set", "sequence.total_tokens_per_batch=48"],
            "ma_separation.microbatches': must divide sequence.batch_size = 3",
        ),
        (
            "batch vs data parallelism",
            ["--strategy", "pp"],
            "strategy 'pp' splits the batch over data parallelism 8",
        ),
        ("config path is a directory", ["--config", str(tmp_path)], "is a directory"),
        (
            "unknown gpu_mapping key",
            ["--set", "nodes.gpu_mapping.gpu_3=[12]"],
            "'nodes.gpu_mapping.gpu_3': unknown node name",
        ),
        (
            "pipeline degree vs layers",
            ["--strategy", "pp", "--set", "model.layers=3"],
            "pipeline_parallel = 2 must divide model.layers = 3",
        ),
        (
            "missing data file",
            [*files, "training.data_files=[/no/such.txt]"],
            "data file '/no/such.txt' does not exist",
        ),
        ("unreadable data file", [*files, f"training.data_files=[{binary}]"], "not UTF-8 text"),
        (
            "data path is a directory",
            [*files, f"training.data_files=[{tmp_path}]"],
            "is not a regular file",
        ),
        ("empty corpus", [*files, f"training.data_files=[{empty}]"], "holds no non-empty document"),
        (
            "vocabulary smaller than the token ids",
            ["--set", "training.vocab_size=50000"],
            "must be at least 50257",
        ),
        (
            "checkpoint of another model",
            ["--set", "model.hidden_dim=128", "--set", "model.head_dim=4"],
            "was written for a different model",
        ),
        (
            "resume with another batch",
            ["--set", "sequence.batch_size=8", "--set", "sequence.total_tokens_per_batch=128"],
            "sequence.batch_size 4 -> 8",
        ),
        (
            "resume with another sequence length",
            ["--set", "sequence.length=8", "--set", "sequence.total_tokens_per_batch=32"],
            "sequence.length 16 -> 8",
        ),
        (
            "unsupported data file",
            [*files, f"training.data_files=[{REPO / 'README.md'}]"],
            "has an unsupported type",
        ),
        (
            "resume with another data source",
            [*files, f"training.data_files=[{corpus}]"],
            "training.data_files [] -> [",
        ),
        (
            "--set of an unknown key",
            ["--set", "model.hidden_size=3"],
            "'model.hidden_size': unknown key",
        ),
        ("unknown strategy", ["--strategy", "nonesuch"], "'nonesuch' is not available"),
        (
            "more MA micro-batches than the CPU backend runs",
            [
                *("--strategy", "ma", "--set", "sequence.batch_size=8"),
                *("--set", "sequence.total_tokens_per_batch=128"),
                *("--set", "ma_separation.microbatches=4"),
            ],
            "ma_separation.microbatches = 4: on the CPU backend MA training with more than 2",
        ),
        (
            "resume with another optimizer, schedule and dtype",
            [
                *("--set", "optimizer.learning_rate=1e-3", "--set", "schedule.total_steps=80"),
                *("--set", "training.dtype=bfloat16"),
            ],
            "(optimizer.learning_rate 0.003 -> 0.001, schedule.total_steps 40 -> 80, "
            "training.dtype 'float32' -> 'bfloat16'); resuming would not continue that run. "
            "Pass --allow-config-change",
        ),
        (
            "resume with another validation split (it changes the training documents)",
            ["--set", "training.validation_split=0.2"],
            "training.validation_split 0.1 -> 0.2",
        ),
        (
            "--no-checkpoint on a directory that holds a run",
            ["--no-checkpoint"],
            "already holds a training run (checkpoints of steps [4, 8] and metrics.jsonl)",
        ),
        ("zero steps", ["--steps", "0"], "'--steps': must be 1 or more, got 0"),
        ("negative steps", ["--steps", "-2"], "'--steps': must be 1 or more, got -2"),
        (
            "seed out of range",
            ["--set", "training.seed=99999999999999999999"],
            "'training.seed': must be in 0..4294967295",
        ),
        (
            "a device failing twice",
            ["--strategy", "ma", "--fail-device", "13@2", "--fail-device", "13@3"],
            "device 13 is listed twice ('13@2' and '13@3')",
        ),
        (
            "checkpoint directory is a file",
            ["--checkpoint-dir", str(regular_file)],
            f"checkpoint directory {str(regular_file)!r} is not a directory",
        ),
        (
            "checkpoint directory below a file",
            ["--checkpoint-dir", str(regular_file / "run")],
            f"cannot be created: {str(regular_file)!r} is not a directory",
        ),
    ]


def _run_cli(module, argv, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_bad_input_is_one_line_and_leaves_the_checkpoints_intact(run8, tmp_path):
    """Each refused command line: exit code 1, one stderr line naming the problem, and the
    run's existing checkpoints untouched (file names, sizes and modification times). The
    commands run two at a time: most of each one's time is importing JAX."""
    before = _snapshot(run8, times=True)
    cases = _bad_inputs(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(
            pool.map(
                lambda case: _run_cli("maxjax.train", [*train_argv(run8, 10), *case[1]]), cases
            )
        )
    for (name, _, expected), result in zip(cases, results, strict=True):
        assert result.returncode == 1, (name, result.stderr)
        line = one_error_line(result.stderr, "maxjax.train: error:")
        assert expected in line, (name, line)
    assert _snapshot(run8, times=True) == before
    assert (tmp_path / "a_file").read_text() == "not a directory"
    json_out = tmp_path / "no" / "such" / "result.json"
    evaluations = [
        (["--checkpoint-dir", str(tmp_path / "nothing")], "does not exist"),
        (["--checkpoint-dir", str(tmp_path / "a_file")], "is not a directory"),
        (["--checkpoint-dir", str(run8), "--strategy", "pp"], "splits the batch"),
        (["--checkpoint-dir", str(run8), "--batches", "0"], "'--batches': must be 1 or more"),
        (["--checkpoint-dir", str(run8), "--batches", "-1"], "'--batches': must be 1 or more"),
        (
            ["--checkpoint-dir", str(run8), "--json", str(json_out)],
            f"the folder {str(json_out.parent)!r} of {str(json_out)!r} does not exist",
        ),
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run_cli("maxjax.evaluate", case[0]), evaluations))
    for (argv, expected), result in zip(evaluations, results, strict=True):
        assert result.returncode == 1, (argv, result.stderr)
        assert expected in one_error_line(result.stderr, "maxjax.evaluate: error:"), argv
    assert not (tmp_path / "no").exists()
    assert _snapshot(run8, times=True) == before


def test_a_read_only_checkpoint_directory_is_one_line(run8, tmp_path, capsys, monkeypatch):
    """Refused before training starts, the run's files untouched. Root may write in a folder
    without write permission, so there the check's view of the permissions is narrowed."""
    directory = tmp_path / "run"
    shutil.copytree(run8, directory)
    before = _snapshot(directory, times=True)
    if os.geteuid() == 0:
        real_access = os.access
        read_only = {directory, tmp_path / "new"}

        def access(path, mode, *args, **kwargs):
            denied = Path(path).absolute() in read_only and mode & os.W_OK
            return False if denied else real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(checkpoint.os, "access", access)
        (tmp_path / "new").mkdir()
    else:
        (tmp_path / "new").mkdir()
        for path in (directory, tmp_path / "new"):
            path.chmod(0o555)
    try:
        assert train.main(train_argv(directory, 10)) == 1
        line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
        assert f"checkpoint directory {str(directory)!r} is not writable" in line
        assert train.main(train_argv(tmp_path / "new" / "run", 10)) == 1
        line = one_error_line(capsys.readouterr().err, "maxjax.train: error:")
        assert f"cannot be created: {str(tmp_path / 'new')!r} is not writable" in line
    finally:
        for path in (directory, tmp_path / "new"):
            path.chmod(0o755)
    assert _snapshot(directory, times=True) == before


def _bench_bad_inputs():
    """(arguments of python -m maxjax.bench, expected words in the one line)."""
    return [
        (["memory", "--config", "nonesuch.yaml"], "config file 'nonesuch.yaml' does not exist"),
        (["memory", "--set", "model.layers=abc"], "'model.layers': must be an integer"),
        (["memory", "--strategy", "nonesuch"], "not 'nonesuch'"),
        (["project", "--hardware", "nonesuch"], "no hardware spec 'nonesuch'"),
        (["table1", "--strategies", "nonesuch"], "none of ['nonesuch'] is available"),
    ]


def test_bench_bad_inputs_are_one_line():
    cases = _bench_bad_inputs()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run_cli("maxjax.bench", case[0]), cases))
    for (argv, expected), result in zip(cases, results, strict=True):
        assert result.returncode == 1, (argv, result.stderr)
        line = one_error_line(result.stderr, f"maxjax.bench {argv[0]}: error:")
        assert expected in line, (argv, line)


def test_maxjax_debug_shows_the_traceback(tmp_path):
    argv = ["--config", str(tmp_path), "--checkpoint-dir", str(tmp_path / "run")]
    result = _run_cli("maxjax.train", argv, {"MAXJAX_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "is a directory" in result.stderr
    result = _run_cli("maxjax.bench", ["memory", "--config", str(tmp_path)], {"MAXJAX_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "is a directory" in result.stderr


_MAXJAX_DIR = str(Path(maxjax.__file__).resolve().parent)
_PLUMBING = (
    "pathlib",
    "os.py",
    "genericpath.py",
    "posixpath.py",
    "shutil.py",
    "test_checkpoint.py",
)


class _StepDirectoryReads:
    """Records every file-system access inside a checkpoint's step directories, split by
    whether maxjax's own code made it (which must go through orbax) or a library did."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.by_maxjax: list[str] = []
        self.by_libraries: list[str] = []

    def see(self, path) -> None:
        if isinstance(path, int):
            return
        try:
            parts = Path(os.fspath(path)).resolve().relative_to(self.root).parts
        except (TypeError, ValueError):
            return
        if len(parts) < 2 or not parts[0].isdigit():
            return
        frame = sys._getframe(2)
        while frame and frame.f_code.co_filename.endswith(_PLUMBING):
            frame = frame.f_back
        caller = frame.f_code.co_filename if frame else ""
        (self.by_maxjax if caller.startswith(_MAXJAX_DIR) else self.by_libraries).append(
            f"{'/'.join(parts)} from {caller}"
        )

    def install(self, monkeypatch) -> None:
        def watch(owner, name, first_is_self=False):
            original = getattr(owner, name)

            def watched(*args, **kwargs):
                self.see(args[0] if args else kwargs.get("file", kwargs.get("path")))
                return original(*args, **kwargs)

            monkeypatch.setattr(owner, name, watched)

        for name in ("open", "read_text", "read_bytes", "iterdir", "exists", "is_dir", "is_file"):
            watch(Path, name)
        watch(builtins, "open")
        watch(os, "listdir")
        watch(os, "scandir")


def test_checkpoint_metadata_is_read_through_orbax_only(run8, monkeypatch):
    reads = _StepDirectoryReads(run8)
    reads.install(monkeypatch)
    # The guard sees a read by path from maxjax's code (a file compiled under its name).
    exec(
        compile(
            f"Path({str(run8)!r}, '8', 'config', 'metadata').exists()",
            _MAXJAX_DIR + "/x.py",
            "exec",
        ),
        {"Path": Path},
    )
    assert len(reads.by_maxjax) == 1
    reads.by_maxjax.clear()

    assert checkpoint.read_config(run8)[0] == 8
    assert evaluate.default_strategy(run8) == "single"
    cfg, _, state, meta = evaluate.restore(run8, step=4)
    assert state.step == 4 and meta["strategy"] == "single"
    assert reads.by_maxjax == []
    assert reads.by_libraries, "orbax's own reads should pass through the watched calls"


@pytest.mark.skipif("ma" not in STRATEGIES, reason="the MA separation runner is not registered")
def test_all_finite_sees_a_nan_in_either_pool_of_the_ma_state():
    cfg = load_config("tiny", FAST)
    runner = make_runner(cfg, "ma")
    state = runner.init_train_state(runner.init(0), make_optimizer(cfg))
    assert all_finite((state.params, state.opt_state))
    pools = runner.split_pools(state.params)
    assert len(pools) == 2
    for name, pool in pools.items():
        leaves, treedef = jax.tree.flatten(pool)
        devices = leaves[-1].sharding.device_set
        leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(np.nan)
        assert leaves[-1].sharding.device_set == devices
        poisoned = {**pools, name: jax.tree.unflatten(treedef, leaves)}
        assert not all_finite((poisoned, state.opt_state)), name


def _replicated_by_design(path: str) -> bool:
    return path.endswith(".scale") or ".router." in path


def _arrays(tree) -> dict:
    """'layers.0.moe.router.kernel' -> array."""
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(leaf, "shape")
    }


@pytest.mark.skipif("ma" not in STRATEGIES, reason="the MA separation runner is not registered")
@pytest.mark.parametrize("item", ["state", "shards"])
def test_ma_checkpoint_goes_shard_by_shard_and_restores_exactly(tmp_path, monkeypatch, item):
    """Every array handed to orbax and every array it returns is a device array split like
    the runner's own (an expert or attention leaf is never whole on a device); restoring gives
    back the state bit for bit on the same shardings; without a target (another strategy) the
    checkpoint reads back in the single-device layout. Both for orbax's own item and for the
    per-process shard files used across processes (chosen here in one process)."""
    cfg = load_config("tiny", FAST)
    runner, tx = make_runner(cfg, "ma"), make_optimizer(cfg)
    state = runner.init_train_state(runner.init(0), tx)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 17), 0, 50257))
    _, grads = runner.value_and_grad(state.params, tokens)
    state, _ = runner.apply_gradients(state, grads, tx)

    handed, returned = [], []
    real_restore = ocp.CheckpointManager.restore
    saver = "ShardFilesSave" if item == "shards" else "StandardSave"
    owner = checkpoint if item == "shards" else checkpoint.ocp.args
    real_save = getattr(owner, saver)

    def save(tree, *args, **kwargs):
        handed.append(tree)
        return real_save(tree, *args, **kwargs)

    def restore(self, *args, **kwargs):
        out = real_restore(self, *args, **kwargs)
        if item in out:
            returned.append(out[item])
        return out

    monkeypatch.setattr(owner, saver, save)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    monkeypatch.setattr(checkpoint, "state_item", lambda: item)
    store = CheckpointStore(tmp_path)
    meta = {"strategy": "ma", "layout": runner.storage_layout()}
    store.save(state.step, runner.export_train_state(state), meta, cfg.to_dict())
    store.wait()
    step, exported, meta, _ = store.restore(
        model.abstract_params(cfg), target=checkpoint.restore_target(runner)
    )
    restored = runner.import_train_state(exported, step, tx, meta["layout"])

    assert len(handed) == 1 and len(returned) == 1
    expected = runner.abstract_params()
    for tree in (*handed, *returned):
        for part in ("params", "mu", "nu"):
            arrays = _arrays(tree[part])
            assert len(arrays) == len(jax.tree.leaves(expected))
            for path, leaf in arrays.items():
                assert isinstance(leaf, jax.Array), (part, path)
                want = _arrays(expected)[path].sharding
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (part, path)
                whole = leaf.sharding.shard_shape(leaf.shape) == leaf.shape
                assert whole == _replicated_by_design(path), (part, path)

    assert restored.step == state.step
    before, after = runner.export_train_state(state), runner.export_train_state(restored)
    np.testing.assert_array_equal(after["count"], before["count"])
    for part in ("params", "mu", "nu"):
        for (path, a), (_, b) in zip(
            _arrays(after[part]).items(), _arrays(before[part]).items(), strict=True
        ):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (part, path)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)

    # Another strategy reads the same checkpoint in the single-device layout.
    _, portable, meta, _ = store.restore(model.abstract_params(cfg))
    store.close()
    assert meta["layout"] == {"kind": "canonical"}
    for (path, a), (_, b) in zip(
        _arrays(portable["params"]).items(),
        _arrays(runner.gather(state.params)).items(),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=path)


def test_shard_files_restore_onto_any_sharding_and_refuse_a_missing_shard(tmp_path):
    """The per-process shard files give back every array bit for bit, whatever sharding the
    reader asks for (another mesh, other axes, replicated, one host array), for float32,
    bfloat16, scalars and host numpy leaves; a block no file covers is an error."""
    import json

    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from maxjax.sharded_state import ShardFilesHandler, ShardFilesRestore, ShardFilesSave

    devices = jax.devices()
    square = Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))
    line = Mesh(np.array(devices[12:]), ("e",))
    weights = jax.device_put(
        jax.random.normal(jax.random.key(0), (8, 6)), NamedSharding(square, P("a", "b"))
    )
    experts = jax.device_put(
        jnp.arange(24, dtype=jnp.bfloat16).reshape(4, 6), NamedSharding(line, P("e"))
    )
    tree = {
        "params": {0: weights, "experts": experts},
        "scale": jax.device_put(jnp.float32(2.5), NamedSharding(square, P())),
        "count": np.array(3, np.int32),
    }
    manager = ocp.CheckpointManager(tmp_path, item_handlers={"shards": ShardFilesHandler()})
    manager.save(1, args=ocp.args.Composite(shards=ShardFilesSave(tree)))
    manager.wait_until_finished()

    def spec(x, sharding=None):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    target = {
        "params": {
            0: spec(weights, NamedSharding(line, P(None, None))),
            "experts": spec(experts, NamedSharding(square, P(None, "b"))),
        },
        "scale": spec(tree["scale"]),
        "count": spec(tree["count"]),
    }
    got = manager.restore(1, args=ocp.args.Composite(shards=ShardFilesRestore(target)))["shards"]
    assert got["params"][0].sharding == target["params"][0].sharding
    assert got["params"]["experts"].sharding == target["params"]["experts"].sharding
    assert got["params"]["experts"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["params"][0]), np.asarray(weights))
    np.testing.assert_array_equal(np.asarray(got["params"]["experts"]), np.asarray(experts))
    assert float(got["scale"]) == 2.5 and int(got["count"]) == 3
    shapes = manager.item_metadata(1)["shards"]
    assert shapes["params"]["experts"].shape == (4, 6)
    manager.close()

    index_path = next((tmp_path / "1" / "shards").glob("process_*/index.json"))
    index = json.loads(index_path.read_text())
    index["params/experts"]["shards"].pop()
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="do not cover"):
        ShardFilesHandler().restore(tmp_path / "1" / "shards", ShardFilesRestore(target))
