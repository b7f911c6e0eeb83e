"""Chapter 8: the independent jobs task parallelism hands out - MPI-free, so any process runs them.

A task is a plain dict {"id": int, "kind": str, ...arguments}; `run_task(task, inputs)` returns
a JSON-ready dict. `inputs` maps the ids of the task's dependencies ("deps") to their results,
which is how a task graph (tokenise -> train -> evaluate) passes data along.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from tfcourse.data import CharCorpus, lm_batch
from tfcourse.nn.model import generate, init_params, loss_and_grads, preset
from tfcourse.nn.optim import adamw_init
from tfcourse.train import TRAIN_PRESETS, load_corpus, optimizer_update


def _train(ids: np.ndarray, vocab_size: int, lr: float, seed: int, steps: int):
    """Train the tiny LM on `ids`; returns (params, config, losses)."""
    config = preset("tiny", vocab_size)
    settings = dataclasses.replace(TRAIN_PRESETS["tiny"], lr=lr, seed=seed, steps=steps)
    params = init_params(config, seed)
    opt_state, losses = adamw_init(params), []
    for step in range(steps):
        x, y = lm_batch(ids, settings.batch_size, settings.seq_len, seed, step)
        loss, grads = loss_and_grads(params, x, y, config)
        params, opt_state, _ = optimizer_update(params, grads, opt_state, settings, step)
        losses.append(loss)
    return params, config, losses


def task_train(task: dict, inputs: dict) -> dict:
    """Train with (lr, seed) for `steps` steps on the Zen corpus, or on the token ids of a
    "tokenise" dependency; report the final loss and a greedy sample."""
    if inputs:
        (tokenised,) = inputs.values()
        corpus = CharCorpus.from_text(tokenised["text"])
    else:
        corpus = load_corpus()
    params, config, losses = _train(corpus.ids, corpus.vocab.size, task["lr"], task["seed"],
                                    task["steps"])
    sample = generate(params, corpus.vocab.encode("Beautiful"), 20, config)
    result = {"lr": task["lr"], "seed": task["seed"], "final_loss": losses[-1],
              "losses": losses, "sample": corpus.vocab.decode(sample)}
    if task.get("keep"):  # a graph's evaluate stage needs the weights
        result["params"] = {k: v.tolist() for k, v in params.items()}
    return result


def task_tokenise(task: dict, inputs: dict) -> dict:
    """Stage 1 of the graph: the text to train on and its vocabulary."""
    corpus = load_corpus()
    return {"text": corpus.text, "vocab_size": corpus.vocab.size, "n_tokens": len(corpus.ids)}


def task_evaluate(task: dict, inputs: dict) -> dict:
    """Stage 3: the loss of a trained model (a "train" dependency) on held-out batches."""
    (trained,) = inputs.values()
    corpus = load_corpus()
    config = preset("tiny", corpus.vocab.size)
    params = {k: np.asarray(v) for k, v in trained["params"].items()}
    losses = [loss_and_grads(params, *lm_batch(corpus.ids, 8, 32, 10_000 + i, 0), config)[0]
              for i in range(task.get("batches", 4))]
    return {"lr": trained["lr"], "seed": trained["seed"], "eval_loss": float(np.mean(losses))}


def task_select(task: dict, inputs: dict) -> dict:
    """Last stage: the best configuration by evaluation loss."""
    best = min(inputs.values(), key=lambda r: r["eval_loss"])
    return {"best_lr": best["lr"], "best_seed": best["seed"], "eval_loss": best["eval_loss"]}


def task_work(task: dict, inputs: dict) -> dict:
    """A task of known cost: `units` x a fixed block of small matmuls (about 20 ms per unit
    on one core here), for scheduling experiments."""
    rng = np.random.default_rng(task["id"])
    a = rng.standard_normal((96, 96))
    checksum = 0.0
    for _ in range(task["units"] * 400):
        a = np.tanh(a @ a / 96)
        checksum += float(a[0, 0])
    return {"units": task["units"], "checksum": checksum}


def task_fail(task: dict, inputs: dict) -> dict:
    raise RuntimeError(f"task {task['id']} failed on purpose (kind 'fail')")


TASK_KINDS = {"train": task_train, "tokenise": task_tokenise, "evaluate": task_evaluate,
              "select": task_select, "work": task_work, "fail": task_fail}


def run_task(task: dict, inputs: dict | None = None) -> dict:
    """Run one task; its result, or a ValueError naming an unknown kind."""
    if task.get("kind") not in TASK_KINDS:
        raise ValueError(f"task['kind']: expected one of {sorted(TASK_KINDS)}, "
                         f"got {task.get('kind')!r}")
    return TASK_KINDS[task["kind"]](task, inputs or {})


def timed_task(task: dict, inputs: dict | None, worker: int, t0: float) -> dict:
    """Run a task and wrap its outcome: {"id", "worker", "start", "end", "result" | "error"}.

    Errors are caught and returned as text, so one failing task never loses the others."""
    start = time.time() - t0
    try:
        outcome = {"result": run_task(task, inputs)}
    except Exception as err:  # noqa: BLE001 - any failure of a task is reported, not raised
        outcome = {"error": f"{type(err).__name__}: {err}"}
    return {"id": task["id"], "worker": worker, "start": start, "end": time.time() - t0,
            **outcome}


# --------------------------------------------------------------------------- workloads


def sweep_tasks(lrs, seeds, steps: int) -> list[dict]:
    """One "train" task per (learning rate, seed) pair."""
    return [{"id": i, "kind": "train", "lr": lr, "seed": seed, "steps": steps}
            for i, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in seeds)]


def graph_tasks(lrs, steps: int) -> list[dict]:
    """tokenise -> train (one per lr) -> evaluate (one per lr) -> select, with "deps"."""
    tasks = [{"id": 0, "kind": "tokenise", "deps": []}]
    train_ids = list(range(1, len(lrs) + 1))
    for tid, lr in zip(train_ids, lrs, strict=True):
        tasks.append({"id": tid, "kind": "train", "lr": lr, "seed": 0, "steps": steps,
                      "keep": True, "deps": [0]})
    eval_ids = [tid + len(lrs) for tid in train_ids]
    for eid, tid in zip(eval_ids, train_ids, strict=True):
        tasks.append({"id": eid, "kind": "evaluate", "deps": [tid]})
    tasks.append({"id": 2 * len(lrs) + 1, "kind": "select", "deps": eval_ids})
    return tasks


def imbalanced_tasks(costs) -> list[dict]:
    """"work" tasks with the given relative costs."""
    return [{"id": i, "kind": "work", "units": int(c)} for i, c in enumerate(costs)]


def ready_tasks(tasks: list[dict], done: set[int], started: set[int]) -> list[dict]:
    """Tasks not yet started whose dependencies have all finished, in id order."""
    return [t for t in tasks if t["id"] not in started and set(t.get("deps", [])) <= done]


def dependency_inputs(task: dict, outcomes: dict[int, dict]) -> tuple[dict, str | None]:
    """(results of the task's dependencies, or the error text if one of them failed)."""
    failed = [d for d in task.get("deps", []) if "error" in outcomes[d]]
    if failed:
        return {}, f"skipped: dependency {failed[0]} failed"
    return {d: outcomes[d]["result"] for d in task.get("deps", [])}, None


def skipped(task: dict, reason: str, t0: float) -> dict:
    now = time.time() - t0
    return {"id": task["id"], "worker": None, "start": now, "end": now, "error": reason}


def run_serial(tasks: list[dict]) -> dict[int, dict]:
    """The reference: every task in one process, dependencies first. {id: outcome}."""
    outcomes, t0 = {}, time.time()
    while len(outcomes) < len(tasks):
        ready = ready_tasks(tasks, set(outcomes), set(outcomes))
        if not ready:
            raise ValueError("tasks: the dependency graph has a cycle or a missing task")
        for task in ready:
            inputs, failure = dependency_inputs(task, outcomes)
            outcomes[task["id"]] = (skipped(task, failure, t0) if failure
                                    else timed_task(task, inputs, 0, t0))
    return outcomes


# --------------------------------------------------------------------------- scheduling models


def simulate_static(costs, n_workers: int) -> list[dict]:
    """Round-robin: worker w runs tasks w, w + n, w + 2n, ... back to back.
    Returns [{"id", "worker", "start", "end"}] in task order."""
    clock = [0.0] * n_workers
    timeline = []
    for task_id, cost in enumerate(costs):
        w = task_id % n_workers
        timeline.append({"id": task_id, "worker": w, "start": clock[w], "end": clock[w] + cost})
        clock[w] += cost
    return timeline


def simulate_dynamic(costs, n_workers: int) -> list[dict]:
    """Master/worker: whenever a worker becomes free it gets the next task in order (ties go
    to the lowest-numbered worker). Returns [{"id", "worker", "start", "end"}]."""
    clock = [0.0] * n_workers
    timeline = []
    for task_id, cost in enumerate(costs):
        w = min(range(n_workers), key=lambda i: (clock[i], i))
        timeline.append({"id": task_id, "worker": w, "start": clock[w], "end": clock[w] + cost})
        clock[w] += cost
    return timeline


def makespan(timeline: list[dict]) -> float:
    return max(entry["end"] for entry in timeline)
