"""Progress of a long read on stderr: rows, rows/s and the time left.

On a terminal one line is redrawn in place; otherwise (a log file, CI) a plain
line is printed every NON_TTY_INTERVAL seconds. Nothing at all is printed for
work that ends within QUIET_FOR seconds, so small files stay silent. The time
left comes from the share of the input file consumed (compressed bytes for a
.gz), which is known up front, unlike the row count.
"""
import sys
import time

QUIET_FOR = 2.0          # seconds of work before the first line
TTY_INTERVAL = 0.5       # seconds between redraws on a terminal
NON_TTY_INTERVAL = 10.0  # seconds between plain lines elsewhere


class Progress:
    """`update(rows, done)` as work goes on (`done` of `total` input bytes), `close()` at the end."""

    def __init__(self, what: str, total: int, stream=None, clock=time.monotonic):
        self.what, self.total = what, max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.tty = _isatty(self.stream)
        self.interval = TTY_INTERVAL if self.tty else NON_TTY_INTERVAL
        self.next = self.start + QUIET_FOR
        self.rows = 0
        self.shown = False

    def update(self, rows: int, done: int) -> None:
        self.rows = rows
        now = self.clock()
        if now < self.next:
            return
        self.next = now + self.interval
        elapsed = now - self.start
        rate = rows / elapsed if elapsed > 0 else 0.0
        share = min(done / self.total, 1.0)
        left = elapsed * (1 - share) / share if share > 0 else float('inf')
        self._show(f'{self.what}: {rows:,} rows, {rate:,.0f} rows/s, {share:.0%}, '
                   f'{_duration(left)} left')

    def close(self, finished: bool = True) -> None:
        """The closing line, if anything was shown (if not `finished`, just end the line)."""
        if not self.shown:
            return
        if not finished:
            if self.tty:
                self.stream.write('\n')
                self.stream.flush()
            self.shown = False
            return
        elapsed = self.clock() - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        self._show(f'{self.what}: {self.rows:,} rows in {_duration(elapsed)}, {rate:,.0f} rows/s')
        if self.tty:
            self.stream.write('\n')
            self.stream.flush()
        self.shown = False

    def _show(self, line: str) -> None:
        if self.tty:
            self.stream.write('\r' + line + '\x1b[K')   # \x1b[K clears what a longer line left
        else:
            self.stream.write(line + '\n')
        self.stream.flush()
        self.shown = True


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if seconds == float('inf'):
        return '?'
    seconds = int(round(seconds))
    return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'
