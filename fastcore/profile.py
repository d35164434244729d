"""`python -m fastcore.profile`: the doctor, the calibration and the report, from the command line.

  doctor [LOGDIR]    (default: profiles) checks that TensorBoard and the profile plugin import and
                     agree, lists the runs under LOGDIR with their scalars and profile traces, explains
                     what would make TensorBoard say "No profile data was found", and how to view them.
  calibrate          measures the machine's peak matmul GFLOP/s per dtype and path again (the figures
                     utilisation is computed against) and rewrites the cache.
  report RUN         draws the run's loss, metric and throughput curves into RUN/report.png (beside its
                     summary.json); needs matplotlib: pip install 'fastcore[plot]'.

Exit codes: 0 healthy (or drawn), 1 a problem found (each printed as PROBLEM with its fix, or the calibration
failed), 2 bad input (a damaged or missing summary.json, a planted link in the cache folder, no matplotlib for
report), 130 / 143 SIGINT / SIGTERM.
"""
from __future__ import annotations

import argparse
import sys

from fastcore.engine import runguard
from fastcore.errors import UsageError
from fastcore.observe.doctor import doctor


def calibrate_main(dtypes, paths, out=sys.stdout) -> int:
    from fastcore.observe import calibrate
    size = calibrate.LARGE
    print(f"matmul GFLOP/s on {calibrate.machine_key()} ({size}^3, {calibrate.threads()} threads, "
          f"fastest of {calibrate.LEAST}-{calibrate.MOST} interleaved rounds):", file=out, flush=True)
    measured = calibrate.peaks([(dtype, path) for path in paths for dtype in dtypes], refresh=True)
    for name, rate in measured.items():
        dtype, path = name.split("/")
        print(f"  {dtype:9s} {path:6s} {rate.gflops:8,.0f}", file=out)
    noise = next((rate.noise for rate in measured.values() if rate.noise), None)
    print(f"noisy ({noise}), not cached: run it again on a quieter machine" if noise
          else f"cached in {calibrate.cache_path()}", file=out)
    return 0


def report_main(run_dir: str, out=sys.stdout) -> int:
    from fastcore.observe import plot
    if not plot.available():
        print("fastcore-profile: report draws with matplotlib, which is not installed: pip install 'fastcore[plot]' "
              "(or pip install matplotlib)", file=sys.stderr)
        return 2
    print(f"report: {plot.draw(run_dir)}", file=out)
    return 0


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    runguard.raise_on_signals()
    try:
        return _main(argv)
    except runguard.Signalled as e:   # the cache is rewritten atomically: nothing is half-written
        print(f"fastcore-profile: stopped by {e.name}", file=sys.stderr)
        return e.exit_code
    except UsageError as e:
        print(f"fastcore-profile: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    from fastcore.cli import quiet
    parser = OneLineParser(prog="fastcore-profile", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    d = sub.add_parser("doctor", help="check TensorBoard, the profile plugin and the runs under LOGDIR")
    d.add_argument("logdir", nargs="?", default="profiles", metavar="LOGDIR",
                   help="the folder given to fastcore.train --logdir (default: %(default)s)")
    c = sub.add_parser("calibrate", help="measure the peak matmul GFLOP/s again (per dtype and path) and cache it")
    c.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--path", action="append", choices=("xla", "graph"))
    r = sub.add_parser("report", help="draw the run's loss, metric and throughput curves into RUN/report.png")
    r.add_argument("run", metavar="RUN", help="a run folder (<logdir>/<run-name>, holding summary.json)")
    args = parser.parse_args(argv)
    quiet.silence_native_logs()
    import logging
    logging.getLogger().setLevel(logging.ERROR)   # the plugin logs INFO lines while it loads
    if args.command == "doctor":
        return doctor(args.logdir)
    if args.command == "report":
        return report_main(args.run)
    from fastcore.observe.calibrate import Unavailable
    try:
        return calibrate_main(args.dtype or ["float32", "bfloat16", "float16"], args.path or ["xla", "graph"])
    except Unavailable as e:
        print(f"fastcore-profile: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
