"""Document sources: each yields document strings in a fixed, reproducible order.

* `embedded_documents`: CPython's own help text (`pydoc_data.topics`), always available offline.
* `file_documents`: local `.txt`, `.jsonl` and gzip JSON-lines files (the public C4 shard format).
* `c4_documents`: C4 through TensorFlow Datasets (the optional `data` extra), streamed.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maxjax.config import Config

C4_DATASET = "c4/en:3.0.1"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
GZIP_JSONL_SUFFIXES = (".json.gz", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + GZIP_JSONL_SUFFIXES
_GLOB_CHARS = "*?["


class DataError(ValueError):
    """Training data cannot be read: a missing file, a bad record, or a missing optional extra."""


def embedded_documents() -> Iterator[str]:
    """CPython's help topics (~465 kB of English), one document per topic in sorted key order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Paths in the given order, each glob pattern replaced by its matches in sorted order.

    A path that exists literally is never treated as a pattern, even if it contains `*?[`.

    Raises DataError for a path that does not exist, a pattern that matches nothing, or a file
    whose suffix is not one of SUPPORTED_SUFFIXES.
    """
    expanded: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        if any(char in text for char in _GLOB_CHARS) and not Path(text).exists():
            matches = sorted(glob.glob(text))
            if not matches:
                raise DataError(f"data file pattern {text!r} matches no file")
            expanded.extend(Path(m) for m in matches)
        else:
            expanded.append(Path(text))
    for path in expanded:
        if not path.exists():
            raise DataError(f"data file {str(path)!r} does not exist")
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} is not a regular file")
        if not os.access(path, os.R_OK):
            raise DataError(f"data file {str(path)!r} cannot be read (permission denied)")
        if not path.name.endswith(SUPPORTED_SUFFIXES):
            raise DataError(
                f"data file {str(path)!r} has an unsupported type; "
                f"supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}"
            )
    return expanded


def _json_lines_texts(path: Path, lines: Iterable[str]) -> Iterator[str]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{where}: expected a JSON object with a "text" field')
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f'{where}: the "text" field must be a string')
        yield text


def _documents_of_file(path: Path) -> Iterator[str]:
    name = path.name
    try:
        if name.endswith(TEXT_SUFFIXES):
            yield path.read_text(encoding="utf-8")
        elif name.endswith(JSONL_SUFFIXES):
            with path.open(encoding="utf-8") as lines:
                yield from _json_lines_texts(path, lines)
        else:
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                yield from _json_lines_texts(path, lines)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read ({e.strerror or e})") from None


def file_documents(paths: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """Documents of local files, file by file in the given order.

    `.txt`: the whole file is one document. `.jsonl`, `.json.gz`, `.jsonl.gz`: one JSON object
    per line, its "text" field is a document (the format of the public C4 shards
    `c4-train.00000-of-01024.json.gz`). Glob patterns are expanded in sorted order. Paths are
    checked when this is called; records are checked while iterating; both raise DataError.
    """
    expanded = expand_paths(paths)
    return itertools.chain.from_iterable(_documents_of_file(p) for p in expanded)


def _import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "training.source 'c4' reads C4 through TensorFlow Datasets, which is not installed; "
            "install the optional 'data' extra: pip install -e '.[data]'"
        ) from e
    # JAX owns the accelerators; TensorFlow only reads files. RuntimeError: TF's devices were
    # already initialised by the caller, who then decides.
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    return tfds


def c4_documents(
    split: str = "train", data_dir: str | None = None, start: int = 0
) -> Iterator[str]:
    """Texts of the prepared TFDS dataset `c4/en:3.0.1`, in its canonical (unshuffled) order.

    `split` is a TFDS split name ('train' or 'validation'); the first `start` documents are
    skipped without being decoded (used to resume a stream). C4 is not downloaded here: it must
    have been prepared with TFDS (an Apache Beam job) into `data_dir` beforehand. A missing
    TensorFlow Datasets or unprepared data raise DataError when this is called.
    """
    tfds = _import_tfds()
    dataset_name = C4_DATASET
    name, _, version = dataset_name.partition(":")
    looked_in = Path(data_dir or tfds.core.constants.DATA_DIR).expanduser() / name / version
    try:
        builder = tfds.builder(dataset_name, data_dir=data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except (AssertionError, ValueError, OSError) as e:
        raise DataError(
            f"C4 ({dataset_name}, split {split!r}) is not prepared at {str(looked_in)!r} "
            f"(training.data_dir = {data_dir!r}). C4 is not downloaded by maxjax: prepare it "
            "with TensorFlow Datasets (an Apache Beam pipeline, see "
            "https://www.tensorflow.org/datasets/catalog/c4) on your side, or copy a prepared "
            "copy there, and set training.data_dir to the TFDS data directory that holds it. "
            f"TFDS said: {e}"
        ) from e
    if start:
        dataset = dataset.skip(start)
    return _decoded_texts(tfds.as_numpy(dataset))


def _decoded_texts(examples: Iterable[dict]) -> Iterator[str]:
    for example in examples:
        text = example["text"]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def documents_from_config(cfg: Config, start: int = 0) -> Iterator[str]:
    """All documents of the source `cfg.training.source` names, from document number `start`.

    The train/validation split is made from these by the pipeline (`maxjax.data.pipeline`);
    for C4 they are the documents of the TFDS 'train' split.
    """
    training = cfg.training
    if training.source == "embedded":
        return itertools.islice(embedded_documents(), start, None)
    if training.source == "files":
        return itertools.islice(file_documents(training.data_files), start, None)
    if training.source == "c4":
        return c4_documents("train", training.data_dir, start=start)
    raise DataError(f"unknown training.source {training.source!r}")
