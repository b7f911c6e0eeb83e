"""A real MPI program with one rank made to fail mid-training - for tests/test_mpi_faults.py.

    FAULT_KIND=raise FAULT_RANK=1 FAULT_STEP=2 \\
        mpiexec -n 3 python -m mpi4py -m mpi_fault_injection --steps 50   # tests/ on PYTHONPATH

Runs tfcourse.parallel.data_parallel unchanged, except that on rank FAULT_RANK, at step
FAULT_STEP, `train_step` raises (FAULT_KIND=raise) or never returns (FAULT_KIND=hang): the
other ranks are then inside, or waiting at, the step's all-reduces. No fault hook lives in
the course's own code.
"""

from __future__ import annotations

import os
import sys
import time

from tfcourse.parallel import data_parallel

real_train_step = data_parallel.train_step


def faulty_train_step(state, x, y, step, log, dp):
    comm = dp.comm
    if comm.rank == int(os.environ["FAULT_RANK"]) and step == int(os.environ["FAULT_STEP"]):
        if os.environ["FAULT_KIND"] == "hang":
            while True:  # never reaches the all-reduce: the other ranks wait for it forever
                time.sleep(1.0)
        raise FloatingPointError(f"rank {comm.rank}: injected failure at step {step}")
    return real_train_step(state, x, y, step, log, dp)


data_parallel.train_step = faulty_train_step

if __name__ == "__main__":
    sys.exit(data_parallel.main())
