"""Data for fastcore: loaders (local files or tfds) and tf.data streams."""
from pipelines.common import Arrays, eval_stream, parse_split, train_stream
from pipelines.errors import DataError
from pipelines.registry import DATASETS, FILE_DATASETS, load

__all__ = ['Arrays', 'DATASETS', 'DataError', 'FILE_DATASETS', 'eval_stream', 'load', 'parse_split', 'train_stream']
