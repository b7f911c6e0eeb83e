"""The learner program's check of a learner's `zero3_hooks(gather)` (chapter 6, ZeRO-3): the
hooks run on a real `zero3.Gather` over a small model's pieces, walking forward and then back as
`forward_pass` and `backward_pass` do, with real broadcasts from the owners. What equality to
serial training cannot see is checked at every fill and after every hook (see learner_cases):
- the piece about to run is in the working dict, with its owners' values;
- memory: the working dict holds that piece's tensors and no other piece's, at each fill (so
  freeing comes before gathering) and after the hook - with the prefetched piece in flight,
  the rank holds two pieces' parameters at most, as the library's hooks do;
- prefetch: once the piece is filled, the next one's broadcasts (going forward the piece
  after, walking back the piece before) are posted, and nothing else; none after the last.
"""

from __future__ import annotations

from mpi4py import MPI

from tfcourse.nn.model import init_params, piece_params, preset
from tfcourse.parallel.plans.batches import partition_params
from tfcourse.parallel.program import EventLog
from tfcourse.parallel.zero3 import Gather

ALLOWED = ("order", "fill", "drop")
LEFT = {"forward": "going forward, the piece before", "backward": "walking back, the piece after"}
NEXT = {"forward": "going forward, the piece after", "backward": "walking back, the piece before"}


class Watched:
    """What a learner's zero3_hooks is given: a Gather's order, fill and drop and nothing else;
    notes, at each fill, which other pieces' tensors the working dict holds."""

    def __init__(self, gather: Gather):
        self._gather, self.order, self.fills = gather, list(gather.order), []

    def fill(self, piece: str, then: str | None) -> None:
        self._gather.fill(piece, then)
        self.fills.append((piece, then, [p for p in held(self._gather) if p != piece]))

    def drop(self, piece: str) -> None:
        self._gather.drop(piece)

    def __getattr__(self, name: str):
        raise AttributeError(f"gather.{name}: zero3_hooks may use gather.order, gather.fill and "
                             f"gather.drop only")


def held(gather: Gather) -> list[str]:
    """The pieces with at least one tensor in the working dict, in order."""
    return [p for p in gather.order if any(n in gather.working for n in gather.pieces[p])]


def tensors(gather: Gather, piece: str) -> str:
    return ", ".join(n for n in gather.pieces[piece] if n in gather.working)


def after_hook(gather: Gather, watched: Watched, params: dict, direction: str, piece: str,
               then: str | None, fills: list) -> str | None:
    """What is wrong once the `direction` hook for `piece` returned (None if nothing)."""
    at = f"{direction}_hook({piece!r})"
    missing = [n for n in gather.pieces[piece] if n not in gather.working]
    if missing:
        return (f"{at}: the working dict lacks {piece}'s tensors {missing} when the model reads "
                f"them: the hook must fill the piece about to run")
    wrong = [n for n in gather.pieces[piece] if (gather.working[n] != params[n]).any()]
    if wrong:
        return f"{at}: {wrong} do not hold their owners' values: fill the piece about to run"
    now = [p for p in held(gather) if p != piece]
    if now:
        k, other = gather.order.index(piece), now[0]
        if (gather.order.index(other) > k) == (direction == "forward"):
            return (f"{at}: the working dict also holds {other}'s tensors, a piece the walk has "
                    f"not reached: fill only the piece about to run, and let the next one "
                    f"travel (fill's `then`)")
        return (f"{at}: the working dict still holds {other}'s tensors ({tensors(gather, other)})"
                f" after the hook: drop the piece the walk has just left ({LEFT[direction]}) - "
                f"without it every gathered piece stays, and ZeRO-3 holds the whole model")
    early = [(filled, extra) for filled, _, extra in fills if extra]
    if early:
        filled, extra = early[0]
        return (f"{at}: {extra[0]}'s tensors were still in the working dict when {filled} was "
                f"filled (and only dropped after): for that moment the rank held three pieces "
                f"(the one left, this one, the next on its way) where two will do - drop the "
                f"piece you are done with first, then fill")
    posted = sorted(gather.posted)
    if then is not None and then not in posted:
        instead = f" ({posted[0]} was posted instead)" if posted else ""
        return (f"{at}: {then}'s broadcasts were not posted once {piece} was filled{instead} - "
                f"prefetch: pass the piece the walk needs next ({NEXT[direction]}) as fill's "
                f"`then`, so its tensors travel while {piece} computes instead of each piece "
                f"waiting for its whole broadcast")
    stray = [p for p in posted if p != then]
    if stray and then is None:
        return (f"{at}: {stray[0]}'s broadcasts are in flight after the last piece of the "
                f"{direction} walk: nothing comes after it, so post nothing")
    if stray:
        return (f"{at}: {stray[0]}'s broadcasts are in flight, but the walk needs {then} next "
                f"({NEXT[direction]}): prefetch only that piece")
    return None


def walk(fn, gather: Gather, params: dict) -> str | None:
    """One training step's walk with the learner's hooks: forward over the pieces, then back.
    Whatever is still posted when it stops (wrong answers) is waited for, on every rank alike,
    so no broadcast is left in flight."""
    watched = Watched(gather)
    try:
        forward_hook, backward_hook = fn(watched)
        for direction, hook, pieces in (("forward", forward_hook, gather.order),
                                        ("backward", backward_hook, gather.order[::-1])):
            for i, piece in enumerate(pieces):
                start = len(watched.fills)
                hook(piece)
                then = pieces[i + 1] if i + 1 < len(pieces) else None
                problem = after_hook(gather, watched, params, direction, piece, then,
                                     watched.fills[start:])
                if problem:
                    return problem
        return None
    finally:
        for requests in gather.posted.values():
            MPI.Request.Waitall([request for request, _, _ in requests])


def check_zero3_hooks(fn, comm):
    """ZeRO-3's free/gather/prefetch order, on models of 1 and 3 blocks whose tensors are owned
    across the ranks (largest first to the least loaded rank, as data_parallel does)."""
    for layers in (1, 3):
        config = preset("tiny", vocab_size=11, n_layers=layers)
        params = init_params(config, seed=layers)
        names = [n for names in piece_params(config).values() for n in names]
        owners = partition_params({n: params[n].size for n in names}, comm.size)
        local = {n: params[n] for n in names if owners[n] == comm.rank}
        gather = Gather(local, owners, config, comm, EventLog())
        problem = walk(fn, gather, params)
        yield f"{layers} block(s): {problem}" if problem else None
