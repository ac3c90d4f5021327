"""Give every test 16 emulated CPU devices (the seed's 4 nodes x 4 GPUs) before JAX starts, and
one persistent compilation cache shared by the tests, the command lines they start and the
notebook kernels (the environment is inherited), so a program compiled once is not compiled again
by the next file or process that builds the same one."""

import contextlib
import ctypes
import gc
import os

from _train_helpers import COMPILE_CACHE

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILE_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    from maxjax.config import load_config

    return load_config("configs/tiny.yaml", ["training.dtype=float32"])


@pytest.fixture(scope="session")
def paper_cfg():
    from maxjax.config import load_config

    return load_config("configs/paper.yaml")


def _return_freed_memory() -> None:
    """Collect garbage, then give the pages glibc's malloc keeps after a free back to the system.
    Compiles and steps free many large blocks that glibc otherwise holds on to: without this a
    worker's resident memory ratchets up to twice what it uses, and two workers no longer fit."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True)
def _free_memory_after_each_test():
    yield
    _return_freed_memory()


@pytest.fixture(autouse=True, scope="module")
def _free_device_memory_after_each_file():
    """Drop compiled programs and dead arrays between files, so a worker's memory stays flat."""
    yield
    jax.clear_caches()
    _return_freed_memory()
