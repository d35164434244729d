"""tfds as a source, failing in well under a second when it cannot download.

tfds retries a failed download with exponential backoff; offline that reads
as a hang. If the dataset is not prepared yet and its download host cannot
even be reached, raise at once with the local-files advice instead.
"""
import socket
import urllib.parse
import urllib.request

import numpy as np

from pipelines.errors import DataError

_PROBE_TIMEOUT_S = 3.0


def tfds_numpy(name: str, spec: str, files_hint: str, supervised: bool):
    """All rows of `spec` as numpy: (x, y) if `supervised`, else a feature dict."""
    import tensorflow_datasets as tfds

    advice = (f'could not download {name} with tfds (no network?): point --data-dir or '
              f'FASTCORE_DATA_DIR at a folder with {files_hint}')
    try:
        builder = tfds.builder(name)
        if not builder.is_prepared():
            _probe(builder, advice)
            builder.download_and_prepare()
    except DataError:
        raise
    except Exception as e:  # tfds surfaces network trouble as many exception types
        raise DataError(f'{advice} [{type(e).__name__}: {e}]'.replace('\n', ' ')) from e
    try:
        ds = builder.as_dataset(split=spec, as_supervised=supervised)
    except (ValueError, KeyError) as e:
        raise DataError(f'tfds {name} cannot read split {spec!r}: {e}'.replace('\n', ' ')) from e
    return _concat(tfds.as_numpy(ds.batch(65536)))


def _probe(builder, advice: str) -> None:
    """Raise DataError unless every download host (or the proxy) accepts a TCP connection."""
    proxy = urllib.request.getproxies().get('https')
    urls = [proxy] if proxy else list(builder.url_infos or {})
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        try:
            socket.create_connection((parts.hostname, parts.port or 443),
                                     timeout=_PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise DataError(f'{advice} [{parts.hostname}: {e}]') from e


def _concat(batches):
    """Join batches from `as_numpy`, whether tuples or feature dicts."""
    batches = list(batches)
    if not batches:
        raise DataError('tfds returned no examples for this split')
    first = batches[0]
    if isinstance(first, dict):
        return {k: np.concatenate([b[k] for b in batches]) for k in first}
    return tuple(np.concatenate([b[i] for b in batches]) for i in range(len(first)))
