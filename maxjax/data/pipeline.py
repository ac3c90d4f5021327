"""Token batches for training and validation: split, window, shuffle, shard, resume.

Every document is tokenised with GPT-2 BPE and followed by `<|endoftext|>`; a split's documents
are concatenated in source order and cut into windows of exactly `sequence.length` tokens (the
ragged tail is dropped). A batch is `sequence.batch_size` windows.

Split. A document belongs to validation when `validation_score(text) < training.validation_split`.
The score is a hash of the text, so the split is the same on every machine, run and seed, and
duplicate documents never straddle it. For the finite sources ('embedded', 'files') the split
then guarantees that validation holds at least one full batch: if the hash leaves it smaller,
the train documents with the smallest scores move to validation until it does. C4 uses the same
hash rule on its TFDS 'train' split (not TFDS's own 'validation' split), so `validation_split`
means the same thing for every source.

Order. Finite sources are tokenised once per process (cached) and held in memory; train windows
are reshuffled every epoch by a permutation seeded by (training.seed, epoch); validation windows
are in one fixed order that does not depend on the seed. C4 is streamed: windows are shuffled
only within consecutive blocks of `STREAM_SHUFFLE_WINDOWS` windows, seeded by (seed, epoch,
block), and validation is read in stream order.

Resume. `TokenBatches.state()` is a small JSON-serialisable dict; a pipeline built with it (or
`restore`d to it) continues with exactly the batches the uninterrupted one would have produced.
For C4 the state records the document and token where the current shuffle block starts, so a
restore re-reads only one block instead of everything already consumed.

Processes. With `process_count` P, process p gets rows [p*B/P, (p+1)*B/P) of every global batch;
every process reads the same data and keeps its rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maxjax.data.sources import (
    DataError,
    documents_from_config,
    embedded_documents,
    expand_paths,
    file_documents,
)
from maxjax.data.tokenizer import EOT_ID, GPT2_VOCAB, encode_batch

if TYPE_CHECKING:
    from maxjax.config import Config

SPLITS = ("train", "validation")
STREAM_SHUFFLE_WINDOWS = 4096
_TOKENIZE_CHUNK_DOCUMENTS = 256
_TOKEN_DTYPE = np.uint16  # GPT-2 ids are < 2**16; halves the memory of int32


def validation_score(text: str) -> float:
    """A number in [0, 1) fixed by the document's text; below `validation_split` = validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"maxjax-split").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _key64(*parts: Any) -> np.uint64:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8, person=b"maxjax-order").digest()
    return np.uint64(int.from_bytes(digest, "big"))


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array: a fixed bijection, identical on every platform."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def window_permutation(num_windows: int, *key: Any) -> np.ndarray:
    """A permutation of range(num_windows) determined by `key` alone.

    Defined by integer hashing rather than a NumPy random generator, so it cannot change with
    the NumPy version.
    """
    indices = np.arange(num_windows, dtype=np.uint64)
    return np.argsort(_mix64(indices + _key64(*key)), kind="stable")


def _tokenized_documents(texts: Iterator[str]) -> Iterator[tuple[int, str, np.ndarray]]:
    """(document number, text, ids followed by EOT) for every non-empty document, in order."""
    numbered = enumerate(texts)
    while chunk := list(itertools.islice(numbered, _TOKENIZE_CHUNK_DOCUMENTS)):
        ids = encode_batch([text for _, text in chunk], num_threads=min(8, os.cpu_count() or 1))
        for (number, text), doc_ids in zip(chunk, ids, strict=True):
            if doc_ids:
                doc_ids.append(EOT_ID)
                yield number, text, np.asarray(doc_ids, dtype=_TOKEN_DTYPE)


@dataclasses.dataclass(frozen=True)
class _Corpus:
    tokens: np.ndarray  # every document's ids followed by EOT, concatenated
    document_lengths: np.ndarray
    scores: np.ndarray  # validation_score of each document


def _source_key(cfg: Config) -> tuple:
    """Identifies a finite source's content: its kind, plus each file's path, mtime and size."""
    if cfg.training.source == "embedded":
        return ("embedded",)
    files = []
    for path in expand_paths(cfg.training.data_files):
        stat = path.stat()
        files.append((str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    return ("files", tuple(files))


@functools.lru_cache(maxsize=4)
def _load_corpus(source_key: tuple) -> _Corpus:
    if source_key[0] == "embedded":
        texts = embedded_documents()
    else:
        texts = file_documents([Path(path) for path, _, _ in source_key[1]])
    arrays, scores = [], []
    for _, text, ids in _tokenized_documents(texts):
        arrays.append(ids)
        scores.append(validation_score(text))
    if not arrays:
        where = (
            "the embedded corpus"
            if source_key[0] == "embedded"
            else "training.data_files (" + ", ".join(path for path, _, _ in source_key[1]) + ")"
        )
        raise DataError(f"{where} holds no non-empty document (an empty corpus)")
    return _Corpus(
        tokens=np.concatenate(arrays),
        document_lengths=np.array([len(a) for a in arrays], dtype=np.int64),
        scores=np.array(scores, dtype=np.float64),
    )


@dataclasses.dataclass(frozen=True)
class _SplitTokens:
    tokens: np.ndarray
    num_documents: int


@functools.lru_cache(maxsize=8)
def _split_corpus(
    source_key: tuple, validation_split: float, min_tokens: int
) -> dict[str, _SplitTokens]:
    """Both splits of a finite source, each with at least `min_tokens` tokens."""
    corpus = _load_corpus(source_key)
    lengths = corpus.document_lengths
    in_validation = corpus.scores < validation_split
    validation_tokens = int(lengths[in_validation].sum())
    for document in np.argsort(corpus.scores, kind="stable"):
        if validation_tokens >= min_tokens:
            break
        if not in_validation[document]:
            in_validation[document] = True
            validation_tokens += int(lengths[document])
    splits = {}
    for split, members in (("train", ~in_validation), ("validation", in_validation)):
        tokens = corpus.tokens[np.repeat(members, lengths)]
        if len(tokens) < min_tokens:
            raise DataError(
                f"the data source is too small: its {split} split has {len(tokens)} tokens, "
                f"fewer than one batch (sequence.batch_size * sequence.length = {min_tokens}); "
                f"the corpus has {len(corpus.tokens)} tokens in {len(lengths)} documents"
            )
        splits[split] = _SplitTokens(tokens=tokens, num_documents=int(members.sum()))
    return splits


class _InMemoryBatches:
    """Global batches of windows held in memory, in a permuted order per epoch."""

    def __init__(self, windows: np.ndarray, batch_size: int, order_key: tuple, endless: bool):
        self.windows = windows
        self.batch_size = batch_size
        self.batches_per_epoch = len(windows) // batch_size
        self._order_key = order_key
        self._endless = endless
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self.epoch = 0
        self.index = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def next_global(self) -> np.ndarray | None:
        if self.index >= self.batches_per_epoch:
            if not self._endless:
                return None
            self.epoch, self.index = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = window_permutation(len(self.windows), *self._order_key, self.epoch)
            self._order_epoch = self.epoch
        rows = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return self.windows[rows]


class _WindowStream:
    """Windows of a streamed split, optionally shuffled within blocks, seekable by position.

    A position is (document number and token offset where the current block starts, block
    number, windows of that block already taken).
    """

    def __init__(
        self,
        open_documents: Callable[[int], Iterator[str]],
        keep: Callable[[float], bool],
        length: int,
        block_windows: int,
        order_key: tuple | None,
    ):
        self._open_documents = open_documents
        self._keep = keep
        self._length = length
        self._block_windows = block_windows
        self._order_key = order_key
        self.seek(0, {"document": 0, "offset": 0, "block": 0, "consumed": 0})

    def seek(self, epoch: int, position: dict[str, Any]) -> None:
        self._epoch = epoch
        self._block_start = (int(position["document"]), int(position["offset"]))
        self._block_number = int(position["block"])
        self._consumed = int(position["consumed"])
        self._blocks: Iterator[tuple[int, int, np.ndarray]] | None = None
        self._block: np.ndarray | None = None

    def position(self) -> dict[str, int]:
        document, offset = self._block_start
        return {
            "document": document,
            "offset": offset,
            "block": self._block_number,
            "consumed": self._consumed,
        }

    def _kept_documents(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        texts = self._open_documents(start)
        for number, text, ids in _tokenized_documents(texts):
            if self._keep(validation_score(text)):
                yield start + number, ids

    def _generate_blocks(self, document: int, offset: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start document, start offset, windows) of consecutive blocks from a position."""
        block_tokens = self._block_windows * self._length
        segments: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()
        buffered = 0

        def take(count: int) -> tuple[int, int, np.ndarray]:
            nonlocal buffered
            start_document, start_offset, _ = segments[0]
            parts = []
            while count:
                number, seg_offset, ids = segments.popleft()
                used = min(count, len(ids))
                parts.append(ids[:used])
                if used < len(ids):
                    segments.appendleft((number, seg_offset + used, ids[used:]))
                count -= used
                buffered -= used
            return start_document, start_offset, np.concatenate(parts).reshape(-1, self._length)

        for number, ids in self._kept_documents(document):
            skip = offset if number == document else 0
            segments.append((number, skip, ids[skip:]))
            buffered += len(ids) - skip
            while buffered >= block_tokens:
                yield take(block_tokens)
        if buffered >= self._length:
            yield take(buffered // self._length * self._length)

    def next_window(self) -> np.ndarray | None:
        """The next window, or None at the end of the stream."""
        if self._blocks is None:
            self._blocks = self._generate_blocks(*self._block_start)
            self._block = self._load_next_block()
        while self._block is not None and self._consumed >= len(self._block):
            self._block_number += 1
            self._consumed = 0
            self._block = self._load_next_block()
        if self._block is None:
            return None
        window = self._block[self._consumed]
        self._consumed += 1
        return window

    def _load_next_block(self) -> np.ndarray | None:
        assert self._blocks is not None
        generated = next(self._blocks, None)
        if generated is None:
            return None
        document, offset, windows = generated
        self._block_start = (document, offset)
        if self._order_key is not None:
            order = window_permutation(
                len(windows), *self._order_key, self._epoch, self._block_number
            )
            windows = windows[order]
        return windows


class _StreamingBatches:
    """Global batches from a `_WindowStream`; a new epoch restarts the stream."""

    def __init__(self, stream: _WindowStream, batch_size: int, endless: bool):
        self._stream = stream
        self.batch_size = batch_size
        self._endless = endless
        self.epoch = 0
        self.index = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, **self._stream.position()}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._stream.seek(self.epoch, state)

    def _take_batch(self) -> np.ndarray | None:
        windows = []
        while len(windows) < self.batch_size:
            window = self._stream.next_window()
            if window is None:
                return None
            windows.append(window)
        return np.stack(windows)

    def next_global(self) -> np.ndarray | None:
        batch = self._take_batch()
        if batch is None and self._endless:
            if self.index == 0:
                raise DataError("the C4 stream holds fewer windows than one batch")
            self.epoch, self.index = self.epoch + 1, 0
            self._stream.seek(self.epoch, {"document": 0, "offset": 0, "block": 0, "consumed": 0})
            batch = self._take_batch()
        if batch is not None:
            self.index += 1
        return batch


class TokenBatches:
    """Global [B, S] batches of one split, as this process's rows: int32 [B/P, S] numpy arrays.

    Train iterates endlessly, epoch after epoch, reshuffled each epoch; validation is one pass
    in a fixed order. `state()` / `restore()` (or the `state` argument) resume exactly.
    """

    def __init__(
        self,
        cfg: Config,
        split: str = "train",
        *,
        process_index: int = 0,
        process_count: int = 1,
        state: dict[str, Any] | None = None,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        batch_size, length = cfg.sequence.batch_size, cfg.sequence.length
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(
                f"process_index must be in 0..process_count-1, got {process_index} of "
                f"{process_count}"
            )
        if batch_size % process_count:
            raise DataError(
                f"sequence.batch_size = {batch_size} must be divisible by the number of "
                f"processes ({process_count}) so that each process gets whole rows"
            )
        if cfg.training.vocab_size < GPT2_VOCAB:
            raise DataError(
                f"training.vocab_size = {cfg.training.vocab_size} is smaller than the GPT-2 "
                f"tokenizer's {GPT2_VOCAB} ids"
            )
        self.split = split
        self.source = cfg.training.source
        self.sequence_length = length
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self._rows = slice(
            process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size
        )
        self.num_documents: int | None = None
        self.num_tokens: int | None = None
        self.num_windows: int | None = None
        self.batches_per_epoch: int | None = None
        order_key = ("train", cfg.training.seed) if split == "train" else ("validation",)
        if self.source == "c4":
            documents_from_config(cfg)  # fail here, not at the first batch, if C4 is unavailable
            fraction = cfg.training.validation_split
            if split == "train":
                keep: Callable[[float], bool] = lambda score: score >= fraction
            else:
                keep = lambda score: score < fraction
            stream = _WindowStream(
                open_documents=lambda start: documents_from_config(cfg, start=start),
                keep=keep,
                length=length,
                block_windows=STREAM_SHUFFLE_WINDOWS,
                order_key=order_key if split == "train" else None,
            )
            self._batches: _InMemoryBatches | _StreamingBatches = _StreamingBatches(
                stream, batch_size, endless=split == "train"
            )
        else:
            splits = _split_corpus(
                _source_key(cfg), cfg.training.validation_split, batch_size * length
            )
            tokens = splits[split].tokens
            self.num_documents = splits[split].num_documents
            self.num_tokens = len(tokens)
            self.num_windows = len(tokens) // length
            windows = tokens[: self.num_windows * length].reshape(self.num_windows, length)
            in_memory = _InMemoryBatches(windows, batch_size, order_key, endless=split == "train")
            self.batches_per_epoch = in_memory.batches_per_epoch
            self._batches = in_memory
        if state is not None:
            self.restore(state)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> np.ndarray:
        batch = self._batches.next_global()
        if batch is None:
            raise StopIteration
        return batch[self._rows].astype(np.int32)

    def state(self) -> dict[str, Any]:
        """Where the iterator stands: a small JSON-serialisable dict for checkpoints."""
        return {"split": self.split, **self._batches.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`: the next batches are those that followed it originally."""
        if state.get("split", self.split) != self.split:
            raise DataError(
                f"cannot restore a {state.get('split')!r} data state into a {self.split!r} pipeline"
            )
        required = {"epoch", "index"} | (
            {"document", "offset", "block", "consumed"} if self.source == "c4" else set()
        )
        missing = sorted(required - set(state))
        if missing:
            raise DataError(f"data state {state!r} lacks {missing} (source {self.source!r})")
        self._batches.restore(state)

    def describe(self) -> dict[str, Any]:
        """Sizes of this split for logging (counts are None for the streamed C4 source)."""
        return {
            "source": self.source,
            "split": self.split,
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "windows": self.num_windows,
            "batches_per_epoch": self.batches_per_epoch,
            "global_batch_size": self.global_batch_size,
            "local_batch_size": self.local_batch_size,
            "sequence_length": self.sequence_length,
        }


def validation_batches(
    cfg: Config,
    num_batches: int | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> list[np.ndarray]:
    """The first `num_batches` validation batches (all if None): the same ones on every call."""
    batches = TokenBatches(
        cfg, "validation", process_index=process_index, process_count=process_count
    )
    return list(itertools.islice(batches, num_batches))
