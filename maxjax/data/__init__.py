"""Training data: the offline GPT-2 tokenizer, document sources and resumable token batches."""

from maxjax.data.pipeline import (
    SPLITS,
    STREAM_SHUFFLE_WINDOWS,
    TokenBatches,
    validation_batches,
    validation_score,
    window_permutation,
)
from maxjax.data.sources import (
    C4_DATASET,
    SUPPORTED_SUFFIXES,
    DataError,
    c4_documents,
    documents_from_config,
    embedded_documents,
    expand_paths,
    file_documents,
)
from maxjax.data.tokenizer import (
    EOT_ID,
    GPT2_VOCAB,
    decode,
    encode,
    encode_batch,
    gpt2_tokenizer,
)

__all__ = [
    "C4_DATASET",
    "EOT_ID",
    "GPT2_VOCAB",
    "SPLITS",
    "STREAM_SHUFFLE_WINDOWS",
    "SUPPORTED_SUFFIXES",
    "DataError",
    "TokenBatches",
    "c4_documents",
    "decode",
    "documents_from_config",
    "embedded_documents",
    "encode",
    "encode_batch",
    "expand_paths",
    "file_documents",
    "gpt2_tokenizer",
    "validation_batches",
    "validation_score",
    "window_permutation",
]
