#!/usr/bin/env python
"""Show what OMP_WAIT_POLICY does to torch's OpenMP threads, and that it must be set before
torch is imported.

    python scripts/omp_wait_check.py

Runs the same loop (a 2-thread tensor op, then 1 ms of something else, 200 times) in three
fresh processes: OMP_WAIT_POLICY unset, PASSIVE set before `import torch`, and PASSIVE set
after it. It prints the wall time and the CPU time the process burnt; with threads that spin
while they wait, the CPU time exceeds what the work needs and other processes on the same
cores (a second job of a sweep) lose that time.
"""
from __future__ import annotations

import os
import subprocess
import sys

LOOP = """
import resource, time
import torch
torch.set_num_threads(2)
x = torch.randn(2000, 2000)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
for _ in range(20):
    x.add_(1.0)
t0, c0 = time.perf_counter(), cpu()
for _ in range(200):
    x.add_(1.0)          # parallel over 2 threads (4M elements)
    time.sleep(0.001)    # the main thread does something else (Python, I/O, a data batch)
t1, c1 = time.perf_counter(), cpu()
print(f"{t1 - t0:.2f} s wall, {c1 - c0:.2f} s CPU ({100 * (c1 - c0) / (t1 - t0):.0f}% of a core)")
"""

CASES = [
    ("OMP_WAIT_POLICY unset", None, ""),
    ("PASSIVE, set before import torch", "PASSIVE", ""),
    ("PASSIVE, set after import torch (too late)", None,
     "import torch, os; os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'\n"),
]


def main() -> None:
    print("| OpenMP wait policy | loop of 200 short parallel ops |")
    print("|---|---|")
    for label, value, prefix in CASES:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if value:
            env["OMP_WAIT_POLICY"] = value
        out = subprocess.run([sys.executable, "-c", prefix + LOOP], env=env, text=True,
                             capture_output=True, check=True).stdout.strip()
        print(f"| {label} | {out} |")


if __name__ == "__main__":
    main()
