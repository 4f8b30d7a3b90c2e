"""Data: sources (files, checksums, parsers), checks of users' arrays, and tf.data pipelines.

  sources   one record per --dataset source; load(name) -> Dataset of splits, its validation
            split settled (with_validation)
  splits    arrays in memory, image files streamed from disk, tf.data streams
  folders   folder:PATH, image files; tabular: csv:PATH; tfds_source: tfds:NAME
  checks    check_images, check_vectors and DataError: one line naming the problem and the fix
  pipeline  training batches (binarized afresh each epoch for binary likelihoods), the fixed
            evaluation batches, uint8 -> float scaling
"""

from tfvae.data.checks import DataError, check_examples, check_images, check_vectors, is_binary
from tfvae.data.pipeline import (
    TEST_BINARIZATION_SEED,
    binarize,
    eval_arrays,
    eval_batches,
    eval_head,
    eval_pipeline,
    moments,
    steps_per_epoch,
    to_unit_float,
    train_pipeline,
)
from tfvae.data.sources import (
    SOURCES,
    Dataset,
    Source,
    default_model_name,
    fetch,
    load,
    parse_amat,
    parse_frey_face,
    parse_idx_images,
    resolve_data_dir,
    sha256_of,
    with_validation,
)
from tfvae.data.splits import ArraySplit, FileSplit, Split, StreamSplit
from tfvae.data.streams import examples_of, from_tf_data

__all__ = [
    "SOURCES", "TEST_BINARIZATION_SEED", "ArraySplit", "DataError", "Dataset", "FileSplit",
    "Source", "Split", "StreamSplit", "binarize", "check_examples", "check_images",
    "check_vectors", "default_model_name", "eval_arrays", "eval_batches", "eval_head",
    "eval_pipeline", "examples_of", "fetch", "from_tf_data", "is_binary", "load", "moments",
    "parse_amat", "parse_frey_face", "parse_idx_images", "resolve_data_dir", "sha256_of",
    "steps_per_epoch", "to_unit_float", "train_pipeline", "with_validation",
]
