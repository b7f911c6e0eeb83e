"""Checkpoints of the MPI training programs (chapter 12's fault tolerance): each rank writes its
pieces of the serial model's global arrays, rank 0 the manifest once every piece is durable,
and a run resumes from the newest complete checkpoint whatever layout wrote it.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.data_parallel --checkpoint ck
    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.tensor_parallel --resume ck

The format is tfcourse.checkpoint's; where each rank's arrays sit in the global ones is
tfcourse.parallel.plans.placement's.
"""

from __future__ import annotations

import dataclasses

from tfcourse.checkpoint import step_folder, write_manifest, write_shard
from tfcourse.nn.model import init_params, param_shapes
from tfcourse.nn.optim import adamw_init, loss_scale_init
from tfcourse.parallel.plans.placement import Placement, local_state, pieces
from tfcourse.parallel.program import Start, State, agree_on_arguments, stop_together
from tfcourse.train import TrainingSetup, checkpoint_manifest, load_resume_state


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """--checkpoint DIR: after the last step (and every `every`), each rank writes its pieces
    of the global arrays (plans.placement), and rank 0 the manifest once all are durable."""

    folder: str
    every: int
    keep: int
    placement: Placement
    layout: dict

    def save(self, comm, setup: TrainingSetup, state: State, step: int, losses: list) -> None:
        folder, error, entry = step_folder(self.folder, step), None, None
        try:
            entry = write_shard(folder, comm.rank, comm.size, pieces(
                self.placement, state.params, state.opt_state, param_shapes(setup.config),
                comm.rank), {"rank": comm.rank, "step": step})
        except OSError as err:
            error = f"rank {comm.rank}: {err.strerror or err}"
        shards = comm.gather((entry, error), root=0)
        if comm.rank == 0:
            errors = [e for _, e in shards if e]
            try:
                if not errors:
                    write_manifest(folder, checkpoint_manifest(
                        step, losses, setup.config, setup.settings, self.layout,
                        [e for e, _ in shards], state.loss_scale), self.keep)
            except OSError as err:
                errors.append(f"rank 0: {err.strerror or err}")
            error = (f"--checkpoint: saving step {step} in {self.folder!r} failed ("
                     f"{'; '.join(errors)}); the previous complete checkpoint there is "
                     f"unchanged") if errors else None
        stop_together(comm, error if comm.rank == 0 else None)


def start_training(comm, args, setup: TrainingSetup, placement: Placement, layout: dict
                   ) -> tuple[Start, Checkpointing | None]:
    """This rank's part of the serial model's fresh parameters and AdamW state (and fp16's
    fresh loss scale) - or, with --resume, of the newest checkpoint there, written by any
    layout (every rank assembles the global arrays and takes its part; the loss scale is
    the same on every rank) - and what --checkpoint asks to save."""
    config, settings = setup.config, setup.settings

    def load() -> Start:
        params = init_params(config, settings.seed)
        if not args.resume:
            loss_scale = loss_scale_init() if config.precision == "fp16" else None
            return Start(State(*local_state(placement, params, adamw_init(params)),
                               loss_scale), placement=placement)
        resumed = load_resume_state(args.resume, params, config, settings)
        return Start(State(*local_state(placement, resumed.params, resumed.opt_state),
                           resumed.loss_scale), resumed.step, tuple(resumed.losses), placement)

    start = agree_on_arguments(comm, load)  # a corrupt shard stops every rank, cleanly
    saving = None if not args.checkpoint else Checkpointing(
        args.checkpoint, args.checkpoint_every, args.keep, placement,
        {**layout, "world_size": comm.size})
    return start, saving


