"""What the benchmarks share: time one training command and read a val metric from its summary.csv."""
import csv
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(cmd, env, logdir, column, quiet_stderr=False):
    """(wall seconds, best and last value of `column` in LOGDIR/summary.csv) of `cmd` run from the repo root;
    its output is dropped (stderr too with `quiet_stderr`)."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if quiet_stderr else None)
    seconds = time.perf_counter() - start
    values = [float(row[column]) for row in summary_rows(logdir)]
    return seconds, max(values), values[-1]


def summary_rows(logdir):
    """The rows of LOGDIR/summary.csv (one per epoch) as dicts of strings."""
    with open(os.path.join(logdir, "summary.csv")) as f:
        return list(csv.DictReader(f))
