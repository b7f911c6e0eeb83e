"""Tensor parallelism with dropout, under mpiexec - for tests/test_tensor_parallel.py.

    mpiexec -n 2 python -m mpi4py -m mpi_tp_dropout --json out.json   # tests/ on PYTHONPATH

Every rank runs the serial model's loss_and_grads on its shard with Megatron's f and g as the
entry/exit operators and dropout 0.25, all ranks drawing from one seed (dropout acts after g,
on values every rank holds, so the masks must agree). Rank 0 glues the gradient shards back
and writes how far they, and the loss, are from the serial model's with the same generator,
and how far the serial gradients with dropout are from those without (dropout must matter).
"""

import argparse
import dataclasses
import json

import numpy as np
from mpi4py import MPI

from tfcourse.nn.model import init_params, loss_and_grads, preset
from tfcourse.parallel.plans.tensor import shard_params, unshard_params
from tfcourse.parallel.program import EventLog
from tfcourse.parallel.tensor_parallel import max_relative_error, megatron_ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    config = preset("tiny", vocab_size=23, dropout=0.25)
    full = init_params(config, seed=3)
    rng = np.random.default_rng(7)
    tokens, targets = rng.integers(0, 23, (2, 3, 16))
    local = shard_params(full, comm.rank, comm.size)
    loss, grads = loss_and_grads(local, tokens, targets, config, rng=np.random.default_rng(11),
                                 ops=megatron_ops(comm, EventLog()), check=False)
    gathered = unshard_params(comm.allgather(grads))
    if comm.rank == 0:
        serial_loss, serial = loss_and_grads(full, tokens, targets, config,
                                             rng=np.random.default_rng(11))
        no_dropout = loss_and_grads(full, tokens, targets,
                                    dataclasses.replace(config, dropout=0.0))[1]
        with open(args.json, "w") as f:
            json.dump({"loss_error": abs(loss - serial_loss),
                       "grad_error": max_relative_error(gathered, serial),
                       "dropout_effect": max_relative_error(no_dropout, serial)}, f)


if __name__ == "__main__":
    main()
