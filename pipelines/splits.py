"""tfds split strings ('train[:90%]', 'test[8000:]') applied to local arrays.

Local files must slice exactly like `tfds.load(split=...)` so a run reads the
same examples online and offline; percent boundaries use tfds' 'closest'
rounding (Python round, i.e. half to even).
"""
import re

from pipelines.errors import DataError

_SPEC = re.compile(r'^(?P<name>[\w-]+)(\[(?P<lo>[^:\]]*):(?P<hi>[^:\]]*)\])?$')
_BOUND = re.compile(r'^(?P<val>-?\d+(\.\d*)?)(?P<pct>%)?$')
_HELP = "use e.g. 'train', 'test[8000:]', 'train[:90%]', 'train[-500000:]'"


def split_name(spec: str) -> str:
    """The split a spec reads from, e.g. 'train' for 'train[:90%]'."""
    return _match(spec)['name']


def parse_split(spec: str, n: int) -> slice:
    """Rows [start:stop) of an n-row split that `spec` selects; never empty."""
    m = _match(spec)
    lo, hi = _bound(spec, m['lo']), _bound(spec, m['hi'])
    if m['lo'] is not None and lo is None and hi is None:
        raise DataError(f'bad split {spec!r}: {_HELP}')
    units = {b[1] for b in (lo, hi) if b is not None}
    if len(units) > 1:
        raise DataError(f'split {spec!r} mixes percent and absolute bounds: {_HELP}')
    start = 0 if lo is None else _absolute(spec, lo, n)
    stop = n if hi is None else _absolute(spec, hi, n)
    if stop <= start:
        raise DataError(f'split {spec!r} selects no examples out of {n}: {_HELP}')
    return slice(start, stop)


def _match(spec: str) -> re.Match:
    m = _SPEC.match(spec.strip())
    if not m:
        raise DataError(f'bad split {spec!r}: {_HELP}')
    return m


def _bound(spec: str, text: str | None) -> tuple[float, bool] | None:
    """(value, is_percent), or None for an open end."""
    if text is None or text == '':
        return None
    m = _BOUND.match(text)
    if not m or ('.' in m['val'] and not m['pct']):
        raise DataError(f'bad split {spec!r}: {_HELP}')
    return float(m['val']), bool(m['pct'])


def _absolute(spec: str, bound: tuple[float, bool], n: int) -> int:
    value, pct = bound
    if pct:
        if abs(value) > 100:
            raise DataError(f'split {spec!r}: percent bounds must lie in [-100%, 100%]')
        value = int(round(value * n / 100.0))
    value = int(value)
    if abs(value) > n:
        raise DataError(f'split {spec!r} is out of range for {n} examples: {_HELP}')
    return value + n if value < 0 else value
