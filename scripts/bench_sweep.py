#!/usr/bin/env python
"""Time a sweep of small `gsgd train` jobs with the joblib launcher, n_jobs=1 against n_jobs=2.

    python scripts/bench_sweep.py                  # 8 jobs (seeds 0..7), 1 epoch each, 3 rounds
    python scripts/bench_sweep.py --jobs 8 --rounds 2 --args "train.epochs=1 optimizer=sgd"

Each round runs the same sweep (`gsgd train -m hydra/launcher=joblib hydra.launcher.n_jobs=N
seed=0,...,7 train.epochs=1`, the default MLP [49:64:64:10] on Fashion-MNIST 7x7) once per
n_jobs value, alternating, and records the wall time of the whole command. Prints a markdown
table (min / median / max over the rounds) and the speedup (median over the rounds of the
n_jobs=1 time over the n_jobs=N time of the same round).

With n_jobs > 1 joblib starts worker processes and sets OMP_NUM_THREADS=cores // n_jobs in
them; `gsgd` sets OMP_WAIT_POLICY=PASSIVE before torch loads (unless set), so the jobs' threads
sleep instead of spinning while they wait, and jobs do not slow each other down that way.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs in the sweep (seeds)")
    parser.add_argument("--n-jobs", default="1,2", help="values of hydra.launcher.n_jobs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--args", default="train.epochs=1", help="overrides for every job")
    args = parser.parse_args()
    n_jobs = [int(n) for n in args.n_jobs.split(",")]
    seeds = ",".join(str(s) for s in range(args.jobs))
    times: dict[int, list[float]] = {n: [] for n in n_jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in n_jobs:
                sweep_dir = Path(tmp) / f"n{n}-r{r}"
                cmd = [sys.executable, "-m", "gsgd_cli", "train", "-m", "hydra/launcher=joblib",
                       f"hydra.launcher.n_jobs={n}", f"seed={seeds}", *args.args.split(),
                       f"hydra.sweep.dir={sweep_dir}"]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                times[n].append(time.perf_counter() - start)
                if done.returncode != 0 or f"{args.jobs} of {args.jobs} jobs completed" not in done.stdout:
                    sys.exit(f"bench_sweep: `{' '.join(cmd)}` failed:\n{done.stdout[-1000:]}"
                             f"{done.stderr[-2000:]}")
    cores = os.cpu_count()
    print(f"`python scripts/bench_sweep.py {' '.join(sys.argv[1:])}` on {cores} CPU cores: "
          f"`gsgd train -m hydra/launcher=joblib hydra.launcher.n_jobs=N seed={seeds} "
          f"{args.args}`, {args.rounds} rounds, alternating; wall s as min / median / max\n")
    print("| n_jobs | sweep wall s | speedup over n_jobs=1 |")
    print("|---|---|---|")
    base = times[n_jobs[0]]
    for n in n_jobs:
        t = sorted(times[n])
        speedup = statistics.median(b / x for b, x in zip(base, times[n]))
        print(f"| {n} | {t[0]:.1f} / {statistics.median(t):.1f} / {t[-1]:.1f} | "
              f"{speedup:.2f}x |")


if __name__ == "__main__":
    main()
