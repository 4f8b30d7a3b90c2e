"""Data: sources (files, checksums, parsers), checks of users' arrays, and tf.data pipelines.

  sources   one record per --dataset source; load(name) -> Dataset of [N, H, W, C] images
  checks    check_images and DataError: one line naming the problem and the fix
  pipeline  training batches (binarized afresh each epoch for binary likelihoods), the fixed
            evaluation images, uint8 -> float scaling
"""

from tfvae.data.checks import DataError, check_images, is_binary
from tfvae.data.pipeline import (
    TEST_BINARIZATION_SEED,
    binarize,
    eval_arrays,
    eval_pipeline,
    steps_per_epoch,
    to_unit_float,
    train_pipeline,
)
from tfvae.data.sources import (
    SOURCES,
    Dataset,
    Source,
    fetch,
    load,
    parse_amat,
    parse_frey_face,
    parse_idx_images,
    resolve_data_dir,
    sha256_of,
)

__all__ = [
    "SOURCES", "TEST_BINARIZATION_SEED", "DataError", "Dataset", "Source", "binarize",
    "check_images", "eval_arrays", "eval_pipeline", "fetch", "is_binary", "load", "parse_amat",
    "parse_frey_face", "parse_idx_images", "resolve_data_dir", "sha256_of", "steps_per_epoch",
    "to_unit_float", "train_pipeline",
]
