"""`python -m tfcourse.check NAME FILE` runs a learner's MPI function under real mpiexec: the
library's own algorithm passes at 1-4 ranks, and classic wrong answers are rejected with a
message that points at the cause (issue 18)."""

import contextlib
import inspect
import subprocess
import sys
import textwrap

import pytest

from tfcourse import check as mpi_check
from tfcourse.parallel import comm, context_parallel, task_parallel, zero3
from tfcourse.parallel.plans.pipeline import schedule

pytestmark = pytest.mark.mpi


def library_source(name: str) -> str:
    source = inspect.getsource(getattr(comm, name))
    return mpi_check.HEADER + source.replace("tuple[int, int]", "tuple").replace(
        "np.ndarray", "object").replace("MPI.Comm", "object")


def write(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("name", ["ring_reduce_scatter", "ring_all_gather"])
def test_the_library_algorithm_passes_at_one_to_four_ranks(tmp_path, name):
    path = write(tmp_path, name, library_source(name))
    proc = subprocess.run([sys.executable, "-m", "tfcourse.check", name, str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"✓ {name}: equals the library under mpiexec with 1, 2, 3, 4")


DEADLOCK = r"no answer within \d+ s - a deadlock\? Every rank must send and receive"
WRONG = {  # name: (function, right line, wrong line, what the message must say)
    "p steps instead of p - 1": ("ring_reduce_scatter", "for step in range(p - 1):",
                                 "for step in range(p):",
                                 r", rank \d: .*sent 4 messages, expected p - 1 = 3"),
    # the chunks sent and expected differ in size: the ranks wait for each other forever
    "the wrong neighbour": ("ring_reduce_scatter", "right, left = (r + 1) % p, (r - 1) % p",
                            "right, left = (r - 1) % p, (r + 1) % p", DEADLOCK),
    "received chunk overwrites instead of adding": (
        "ring_reduce_scatter", "buf[recv_lo:recv_hi] += incoming",
        "buf[recv_lo:recv_hi] = incoming",
        r", rank \d: .*(is wrong at|every step must add exactly one received chunk)"),
    "all-gather forwards the wrong chunk": (
        "ring_all_gather", "bounds[(r + 1 - step) % p]", "bounds[(r - step) % p]", DEADLOCK),
    "all-gather stops one step early": (
        "ring_all_gather", "for step in range(p - 1):", "for step in range(p - 2):",
        r", rank \d: .*expected"),
}


@pytest.mark.parametrize("wrong", WRONG)
def test_classic_wrong_answers_are_rejected_with_a_pointer(tmp_path, wrong):
    name, right, mistake, says = WRONG[wrong]
    source = library_source(name)
    assert right in source
    path = write(tmp_path, name, source.replace(right, mistake))
    with pytest.raises(AssertionError, match=f"{name} under mpiexec -n 4{says}"
                       if says != DEADLOCK else f"{name} under mpiexec -n 4: {says}"):
        # a deadlock can only be told by waiting: keep that wait short
        mpi_check.run_check(name, path, ranks=(4,), timeout=6 if says == DEADLOCK else 60)


RIGHT_MERGE = """
def merge_partials(a, b):
    (m_a, l_a, acc_a), (m_b, l_b, acc_b) = a, b
    m = np.maximum(m_a, m_b)
    shift = np.where(np.isfinite(m), m, 0.0)
    w_a, w_b = np.exp(m_a - shift), np.exp(m_b - shift)
    return m, l_a * w_a + l_b * w_b, acc_a * w_a + acc_b * w_b
"""
RIGHT_1F1B = """
def schedule_1f1b(p, stage, m):
    warmup = min(p - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]
"""
MORE_WRONG = {  # name: (function, right source, right line, wrong line, what it must say)
    "merge with a's maximum": ("merge_partials", RIGHT_MERGE, "m = np.maximum(m_a, m_b)",
                               "m = m_a", "m differs from the exact merge"),
    "merge without rescaling": ("merge_partials", RIGHT_MERGE,
                                "l_a * w_a + l_b * w_b, acc_a * w_a + acc_b * w_b",
                                "l_a + l_b, acc_a + acc_b", "differs from the exact merge"),
    "1F1B warming up p - s micro-batches": ("schedule_1f1b", RIGHT_1F1B,
                                            "min(p - stage - 1, m)", "min(p - stage, m)",
                                            "how many forwards does stage s run"),
    "GPipe instead of 1F1B": ("schedule_1f1b", RIGHT_1F1B, "warmup = min(p - stage - 1, m)",
                              "warmup = m", "instead of"),
}


RIGHT_BROADCAST = """
def broadcast_from_owners(params, owners, comm):
    out = {}
    for name, value in params.items():
        buf = np.ascontiguousarray(value).copy()
        comm.Bcast(buf, root=owners[name])
        out[name] = buf
    return out
"""
MORE_WRONG.update({
    "broadcast from rank 0 always": ("broadcast_from_owners", RIGHT_BROADCAST,
                                     "root=owners[name]", "root=0",
                                     "expected the owner's value"),
    "broadcast into the caller's arrays": ("broadcast_from_owners", RIGHT_BROADCAST,
                                           "np.ascontiguousarray(value).copy()", "value",
                                           "changed in place"),
})
RIGHT_MEGATRON = """
def megatron_ops(comm):
    def summed(x):
        out = np.empty_like(x)
        comm.Allreduce(np.ascontiguousarray(x), out, op=MPI.SUM)
        return out
    return SublayerOps(enter=Operator(backward=summed), exit=Operator(forward=summed))
"""
RIGHT_MASTER = inspect.getsource(task_parallel.master)  # the library's own loop
MORE_WRONG.update({
    "f's gradient averaged over the ranks": (
        "megatron_ops", RIGHT_MEGATRON, "out, op=MPI.SUM)\n",
        "out, op=MPI.SUM)\n        out /= comm.size\n",
        "enter \\(f\\) backward returned the mean over the ranks, expected the sum"),
    "f and g swapped": ("megatron_ops", RIGHT_MEGATRON,
                        "enter=Operator(backward=summed), exit=Operator(forward=summed)",
                        "enter=Operator(forward=summed), exit=Operator(backward=summed)",
                        "enter \\(f\\) forward returned the sum over the ranks, expected "
                        "this rank's own array"),
    "no all-reduce in f": ("megatron_ops", RIGHT_MEGATRON, "enter=Operator(backward=summed)",
                           "enter=Operator()", "enter \\(f\\) backward returned this rank's "
                           "own array"),
    "tasks dealt round-robin": ("master", RIGHT_MASTER, "dest=idle.pop(0)",
                                "dest=1 + task['id'] % (comm.size - 1)",
                                "was sent to worker 1 while it was still running task 0"),
    "results collected in a fixed order": (
        "master", RIGHT_MASTER, "wait_for_message(comm, MPI.ANY_SOURCE, RESULT, status)",
        "wait_for_message(comm, min(set(range(1, comm.size)) - set(idle)), RESULT, status)",
        "also given tasks"),
    "dependencies ignored": ("master", RIGHT_MASTER,
                             "ready_tasks(tasks, set(outcomes), started)",
                             "[t for t in tasks if t['id'] not in started]",
                             "raised KeyError"),
})
RIGHT = {"merge_partials": RIGHT_MERGE, "schedule_1f1b": RIGHT_1F1B,
         "broadcast_from_owners": RIGHT_BROADCAST, "megatron_ops": RIGHT_MEGATRON,
         "master": RIGHT_MASTER}


@pytest.mark.parametrize("name", RIGHT)
def test_the_right_merge_schedule_broadcast_f_g_and_master_pass_in_their_programs(tmp_path, name):
    source = RIGHT[name]
    path = write(tmp_path, name, mpi_check.header(name) + source)
    line = mpi_check.run_check(name, path, ranks=(1, 3))
    assert line.startswith(f"✓ {name}: equals the library under mpiexec with 1, 3 ranks")


@pytest.mark.parametrize("wrong", MORE_WRONG)
def test_classic_wrong_answers_to_the_other_functions_are_rejected(tmp_path, wrong):
    name, source, right, mistake, says = MORE_WRONG[wrong]
    assert right in source
    path = write(tmp_path, name, mpi_check.header(name) + source.replace(right, mistake))
    with pytest.raises(AssertionError, match=f"{name} under mpiexec -n 3, rank \\d: .*{says}"):
        mpi_check.run_check(name, path, ranks=(3,), timeout=30)


def test_a_master_that_never_stops_its_workers_is_a_deadlock_with_a_pointer(tmp_path):
    path = write(tmp_path, "master", mpi_check.header("master") + RIGHT_MASTER.replace(
        "comm.send(None, dest=worker, tag=STOP)", "pass"))
    with pytest.raises(AssertionError, match="no answer within 10 s - a deadlock. Did the "
                       "master send STOP to every worker"):
        mpi_check.run_check("master", path, ranks=(3,), timeout=10)


def test_bad_arguments_exit_2_before_any_job(tmp_path):
    no_function = write(tmp_path, "x", "y = 1\n")
    for args, says in [(["nope", str(no_function)], "NAME: expected one of"),
                       (["ring_all_gather", str(tmp_path / "missing.py")], "FILE: no file"),
                       (["ring_all_gather", str(no_function)], "defines no function")]:
        proc = subprocess.run([sys.executable, "-m", "tfcourse.check", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode in (1, 2) and says in proc.stderr, proc.stderr


def test_a_notebook_function_is_saved_with_its_imports_and_checked(tmp_path, capsys):
    namespace = {}
    exec(textwrap.dedent(library_source("ring_all_gather")), namespace)
    fn = namespace["ring_all_gather"]
    fn.__module__ = "__main__"
    # inspect.getsource needs a file: give the function one, as IPython does for cells
    path = write(tmp_path, "cell", library_source("ring_all_gather"))
    code = compile(path.read_text(), str(path), "exec")
    namespace = {}
    exec(code, namespace)
    mpi_check.check_under_mpi("ring_all_gather", namespace["ring_all_gather"], ranks=(3,))
    assert capsys.readouterr().out.startswith("✓ ring_all_gather: equals the library")


RIGHT_ZERO3 = inspect.getsource(zero3.zero3_hooks).replace("(gather: Gather)", "(gather)")
FORWARD_DROP = "        if k > 0:\n            gather.drop(order[k - 1])\n"
FORWARD_FILL = "        gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)\n"
BACKWARD_FILL = "        gather.fill(piece, order[k - 1] if k > 0 else None)\n"
ZERO3_WRONG = {  # what goes wrong: ([(right, wrong), ...], what the message must say)
    "never drops": ([("gather.drop(order[k - 1])", "pass"), ("gather.drop(order[k + 1])", "pass")],
                    r"1 block\(s\): forward_hook\('blocks.0'\): the working dict still holds "
                    r"embed's tensors \(tok_emb, pos_emb\) after the hook: drop the piece the "
                    r"walk has just left \(going forward, the piece before\)"),
    "no prefetch": ([(FORWARD_FILL, "        gather.fill(piece, None)\n"),
                     (BACKWARD_FILL, "        gather.fill(piece, None)\n")],
                    r"forward_hook\('embed'\): blocks.0's broadcasts were not posted once embed "
                    r"was filled - prefetch: pass the piece the walk needs next"),
    "forward drops the wrong neighbour (k + 1)": (
        [("gather.drop(order[k - 1])", "gather.drop(order[k + 1])")],
        r"forward_hook\('blocks.0'\): the working dict still holds embed's tensors"),
    "backward prefetches the wrong way (k + 1)": (
        [(BACKWARD_FILL, FORWARD_FILL)],
        r"backward_hook\('head'\): blocks.0's broadcasts were not posted once head was filled "
        r"- prefetch: .*\(walking back, the piece before\)"),
    # fill waits for this piece and posts the next: filling first holds three pieces at once
    "forward fills before it drops": (
        [(FORWARD_DROP + FORWARD_FILL, FORWARD_FILL + FORWARD_DROP)],
        r"forward_hook\('blocks.0'\): embed's tensors were still in the working dict when "
        r"blocks.0 was filled \(and only dropped after\).* drop the piece you are done with "
        r"first, then fill"),
    "reads the gather's insides": ([("order = gather.order", "order = list(gather.pieces)")],
                                   r"raised AttributeError: gather.pieces: zero3_hooks may use "
                                   r"gather.order, gather.fill and gather.drop only"),
}


def test_the_library_zero3_hooks_pass_from_the_command_line_at_one_to_four_ranks(tmp_path):
    path = write(tmp_path, "zero3_hooks", mpi_check.header("zero3_hooks") + RIGHT_ZERO3)
    proc = subprocess.run([sys.executable, "-m", "tfcourse.check", "zero3_hooks", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("✓ zero3_hooks: equals the library under mpiexec with 1, 2, "
                                  "3, 4 ranks, and each rank holds one gathered piece")


@pytest.mark.parametrize("wrong", ZERO3_WRONG)
def test_zero3_hooks_that_hold_too_much_or_do_not_prefetch_are_rejected(tmp_path, wrong):
    edits, says = ZERO3_WRONG[wrong]
    source = RIGHT_ZERO3
    for right, mistake in edits:
        assert right in source
        source = source.replace(right, mistake)
    path = write(tmp_path, "zero3_hooks", mpi_check.header("zero3_hooks") + source)
    with pytest.raises(AssertionError, match=f"zero3_hooks under mpiexec -n 3, rank \\d: .*{says}"):
        mpi_check.run_check("zero3_hooks", path, ranks=(3,), timeout=30)


RIGHT_ZB_H1 = '''
def schedule_zb_h1(p, stage, m):
    warmup = min(p - stage - 1, m)  # 1F1B's order of forwards and backwards
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(m - warmup, m)]
    late = stage  # stage s runs W(i) right after B(i + s)
    with_w = []
    for kind, i in ops:
        with_w.append((kind, i))
        if kind == "B" and i >= late:
            with_w.append(("W", i - late))
    return with_w + [("W", i) for i in range(max(m - late, 0), m)]
'''
W_AFTER_B = ('        with_w.append((kind, i))\n        if kind == "B" and i >= late:\n'
             '            with_w.append(("W", i - late))\n')
W_TAIL = ' + [("W", i) for i in range(max(m - late, 0), m)]'
ZB_H1_WRONG = {  # what goes wrong: (right, wrong, what the message must say)
    "W right after its own B (1F1B split)": (
        "late = stage", "late = 0",
        r"p=2, stage 1, m=2: op 2 is \('W', 0\) where ZB-H1 runs \('F', 1\) - every W comes "
        r"right after its own B, on every stage: 1F1B with the backward split - it trains "
        r"right, but .*idle 20.0% .* at p=4, m=8 .*ZB-H1's 11.1% \(1F1B's, whole backwards: "
        r"27.3%\)"),
    "all W's at the end": (
        "late = stage", "late = m",
        r"p=1, stage 0, m=2: op 2 is \('F', 1\) where ZB-H1 runs \('W', 0\) - every W at the "
        r"very end of the step: at p=4, m=8 your stage 0 holds 8 micro-batches at once; ZB-H1 "
        r"holds at most min\(p, m\) = 4"),
    "W before its B": (W_AFTER_B, W_AFTER_B.replace("        with_w.append((kind, i))\n", "")
                       + "        with_w.append((kind, i))\n",
                       r"W\(0\) runs before B\(0\): W needs the work its B leaves"),
    "leftover W's forgotten": (W_TAIL, "", r"p=2, stage 1, m=1: op 2 is missing \(your list "
                               r"ends\) where ZB-H1 runs \('W', 0\) - W\(0\) is missing"),
    "a W twice": ("range(max(m - late, 0), m)", "range(m)", r"W\(0\) runs 2 times"),
    "W delayed p - stage - 1 (the wrong direction)": (
        "late = stage", "late = p - stage - 1",
        r"the wrong direction: at p=4, m=8 your stage 0 holds 7 micro-batches at once; ZB-H1 "
        r"holds at most min\(p, m\) = 4"),
    "whole backwards, no W": (
        "return with_w" + W_TAIL, "return ops",
        r"op 2 is missing \(your list ends\) where ZB-H1 runs \('W', 0\) - your lists have no "
        r"W: their B's are whole backwards \(that is 1F1B\)"),
}


def test_the_library_zb_h1_passes_from_the_command_line_at_one_to_four_ranks(tmp_path):
    namespace = {}
    exec(RIGHT_ZB_H1, namespace)
    assert all(namespace["schedule_zb_h1"](p, s, m) == schedule("zb-h1", p, s, m)
               for p in range(1, 6) for s in range(p) for m in range(1, 10))
    path = write(tmp_path, "schedule_zb_h1", mpi_check.header("schedule_zb_h1") + RIGHT_ZB_H1)
    proc = subprocess.run([sys.executable, "-m", "tfcourse.check", "schedule_zb_h1", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("✓ schedule_zb_h1: equals the library under mpiexec with 1, "
                                  "2, 3, 4 ranks, and pipeline training with it (B and W apart) "
                                  "equals serial training")


@pytest.mark.parametrize("wrong", ZB_H1_WRONG)
def test_classic_wrong_zb_h1_schedules_are_rejected_with_what_they_cost(tmp_path, wrong):
    right, mistake, says = ZB_H1_WRONG[wrong]
    assert right in RIGHT_ZB_H1
    path = write(tmp_path, "schedule_zb_h1", mpi_check.header("schedule_zb_h1")
                 + RIGHT_ZB_H1.replace(right, mistake))
    with pytest.raises(AssertionError, match=f"schedule_zb_h1 under mpiexec -n 3, rank \\d: "
                       f".*{says}"):
        mpi_check.run_check("schedule_zb_h1", path, ranks=(3,), timeout=30)


class NoLog:  # the library's Ulysses kernel logs its all-to-alls; the learner's has no log
    def span(self, kind, nbytes=0):
        return contextlib.nullcontext()


LIBRARY_ULYSSES = (mpi_check.header("ulysses_attention") + "import contextlib\n\n\n"
                   + inspect.getsource(NoLog) + "\n\n" + "\n\n".join(
                       inspect.getsource(getattr(context_parallel, name)) for name in (
                           "alltoall", "sequence_to_heads", "heads_to_sequence"))
                   + "\n\n" + inspect.getsource(context_parallel.ulysses_attention).replace(
                       "def ulysses_attention(comm, log)", "def library_kernel(comm, log)")
                   + "\n\ndef ulysses_attention(comm):\n    return library_kernel(comm, NoLog())\n")
RIGHT_ULYSSES = """
def ulysses_attention(comm):
    p = comm.size

    def to_heads(x):  # (B, H, T/p, d) -> (B, H/p, T, d): my heads, every position
        b, h, n, d = x.shape
        send = np.ascontiguousarray(x.reshape(b, p, h // p, n, d).transpose(1, 0, 2, 3, 4))
        recv = np.empty_like(send)
        comm.Alltoall(send, recv)  # recv[s]: rank s's positions of my heads
        return recv.transpose(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)

    def to_sequence(y):  # (B, H/p, T, d) -> (B, H, T/p, d): every head, my positions
        b, h, n, d = y.shape
        send = np.ascontiguousarray(y.reshape(b, h, p, n // p, d).transpose(2, 0, 1, 3, 4))
        recv = np.empty_like(send)
        comm.Alltoall(send, recv)  # recv[s]: rank s's heads of my positions
        return recv.transpose(1, 0, 2, 3, 4).reshape(b, p * h, n // p, d)

    def forward(q, k, v, mask=None, keep_weights=True, precision="fp32"):
        q, k, v = (to_heads(x) for x in (q, k, v))
        out, cache = local_attention_forward(q, k, v, mask, keep_weights, precision)
        return to_sequence(out), cache

    def backward(dout, cache):
        dq, dk, dv = local_attention_backward(to_heads(dout), cache)
        return tuple(to_sequence(g) for g in (dq, dk, dv))

    return AttentionKernel(forward, backward)
"""
STRIDED_THERE = ("x.reshape(b, p, h // p, n, d).transpose(1, 0, 2, 3, 4)",
                 "x.reshape(b, h // p, p, n, d).transpose(2, 0, 1, 3, 4)")  # heads r::p
STRIDED_BACK = ("recv.transpose(1, 0, 2, 3, 4).reshape", "recv.transpose(1, 2, 0, 3, 4).reshape")
SHAPE = r"\(1, 4, 8, 3\): {} has shape \(1, 1, 8, 3\), expected \(1, 4, 2, 3\) = \(B, H, T/p, " \
        r"d_head\), this rank's slice of the positions for every head: did it go back"
POSITION_ORDER = (r"\(1, 4, 8, 3\): out differs from causal attention over the whole sequence "
                  r"\(max error .*, first at sequence 0, head 0, position {}\): does each rank "
                  r"attend over the whole sequence, with the slices in position order")
ULYSSES_WRONG = {  # what goes wrong: ([(right, wrong), ...], what the message must say at -n 4)
    "no all-to-all back in the forward": (
        [("return to_sequence(out), cache", "return out, cache")], SHAPE.format("out")),
    "the slices gathered in reverse rank order": (
        [("return recv.transpose(1, 2, 0, 3, 4)", "return recv[::-1].transpose(1, 2, 0, 3, 4)")],
        POSITION_ORDER.format(0)),
    "the slices interleaved (a wrong transpose)": (
        [("recv.transpose(1, 2, 0, 3, 4).reshape", "recv.transpose(1, 2, 3, 0, 4).reshape")],
        POSITION_ORDER.format(1)),
    # heads r::p out and contiguous blocks back: two heads per rank land in each other's places
    "heads r::p sent, contiguous blocks returned": (
        [STRIDED_THERE], r"two heads per rank, B=2 \(B, H, T, d_head\) = \(2, 8, 12, 4\): each "
                         r"head's output is right but in another head's place \(head 1 holds "
                         r"head 4's\): every head must come back to where it left from"),
    "no all-to-all back in the backward": (
        [("return tuple(to_sequence(g) for g in (dq, dk, dv))", "return dq, dk, dv")],
        SHAPE.format("backward's dq")),
    "a backward that recomputes without the causal mask": (
        [("local_attention_backward(to_heads(dout), cache)", "local_attention_backward(to_heads("
          "dout), local_attention_forward(cache['q'], cache['k'], cache['v'])[1])")],
        r"the forward is right, but dq is the gradient of attention without the causal mask: "
        r"the backward must mask the scores as the forward did"),
    # the model runs both layers' forwards before their backwards: one cache kept is wrong
    "the cache kept in the kernel, not returned": (
        [("    p = comm.size\n", "    p = comm.size\n    kept = {}\n"),
         ("        return to_sequence(out), cache", "        kept['cache'] = cache\n"
                                                  "        return to_sequence(out), None"),
         ("local_attention_backward(to_heads(dout), cache)",
          "local_attention_backward(to_heads(dout), kept['cache'])")],
        r"two layers .*: layer 0: dq differs from the gradient of causal attention .*: one "
        r"layer alone passed, but the model runs every layer's forward before the backwards"),
    "every head sent to every rank (the learner's code raises)": (
        [("x.reshape(b, p, h // p, n, d)", "x.reshape(b, p, h, n, d)")],
        r"one head per rank .*: raised ValueError: cannot reshape array of size 24"),
}


def ulysses_source(edits=()) -> str:
    source = RIGHT_ULYSSES
    for right, mistake in edits:
        assert right in source
        source = source.replace(right, mistake)
    return mpi_check.header("ulysses_attention") + source


def test_the_library_ulysses_kernel_passes_from_the_command_line_at_one_to_four_ranks(tmp_path):
    path = write(tmp_path, "ulysses_attention", LIBRARY_ULYSSES)
    proc = subprocess.run([sys.executable, "-m", "tfcourse.check", "ulysses_attention",
                           str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("✓ ulysses_attention: equals the library under mpiexec with "
                                  "1, 2, 3, 4 ranks, and context-parallel training with it "
                                  "equals serial training (at 1, 2 and 4 ranks")


def test_a_self_consistent_strided_head_split_is_still_ulysses(tmp_path):
    """Heads are independent: rank r may attend heads r::p, if they come back to r::p."""
    path = write(tmp_path, "ulysses_attention", ulysses_source([STRIDED_THERE, STRIDED_BACK]))
    line = mpi_check.run_check("ulysses_attention", path, ranks=(2, 4))
    assert line.startswith("✓ ulysses_attention: equals the library under mpiexec with 2, 4")


@pytest.mark.parametrize("wrong", ULYSSES_WRONG)
def test_classic_wrong_ulysses_kernels_are_rejected_with_a_pointer(tmp_path, wrong):
    edits, says = ULYSSES_WRONG[wrong]
    path = write(tmp_path, "ulysses_attention", ulysses_source(edits))
    with pytest.raises(AssertionError, match=f"ulysses_attention under mpiexec -n 4, rank \\d: "
                                             f".*{says}"):
        mpi_check.run_check("ulysses_attention", path, ranks=(4,), timeout=30)


def test_a_ulysses_kernel_that_ignores_the_other_ranks_passes_alone_and_fails_at_two(tmp_path):
    path = write(tmp_path, "ulysses_attention", mpi_check.header("ulysses_attention") + (
        "def ulysses_attention(comm):\n"
        "    return AttentionKernel(local_attention_forward, local_attention_backward)\n"))
    assert mpi_check.run_check("ulysses_attention", path, ranks=(1,)).startswith("✓")
    # rank 0's queries need no other slice; its keys are seen by rank 1's queries
    with pytest.raises(AssertionError, match=r"ulysses_attention under mpiexec -n 2, rank 0: "
                       r"one head per rank .*: dk is the gradient of attention over this "
                       r"rank's own positions only: the queries the other ranks hold see"):
        mpi_check.run_check("ulysses_attention", path, ranks=(1, 2), timeout=30)


def test_training_with_the_learners_ulysses_kernel_is_checked_too(tmp_path):
    """A kernel right on the checker's short sequences (at most 3p positions) but off by 1e-6
    on the model's (32 positions) is caught by context-parallel training."""
    path = write(tmp_path, "ulysses_attention", ulysses_source([(
        "return to_sequence(out), cache",
        "return to_sequence(out * (1 + 1e-6 * (q.shape[2] > 12))), cache")]))
    with pytest.raises(AssertionError, match=r"ulysses_attention under mpiexec -n 2, rank 0: "
                       r"training with it gives losses \[.*\], serial training \[.*\]"):
        mpi_check.run_check("ulysses_attention", path, ranks=(2,), timeout=30)


def test_a_ulysses_kernel_whose_alltoall_only_rank_0_calls_is_a_deadlock_with_a_pointer(
        tmp_path):
    path = write(tmp_path, "ulysses_attention", ulysses_source([(
        "comm.Alltoall(send, recv)", "comm.Alltoall(send, recv) if comm.rank == 0 else None")]))
    with pytest.raises(AssertionError, match=r"ulysses_attention under mpiexec -n 2: no answer "
                       r"within 6 s - a deadlock\? Every rank must call Alltoall the same "
                       r"number of times"):
        mpi_check.run_check("ulysses_attention", path, ranks=(2,), timeout=6)


def test_a_notebook_ulysses_kernel_is_saved_with_the_attention_imports(tmp_path, capsys):
    path = write(tmp_path, "cell", "import numpy as np\n" + RIGHT_ULYSSES.replace(
        "def ulysses_attention(comm)", "def my_kernel(comm)"))
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    mpi_check.check_under_mpi("ulysses_attention", namespace["my_kernel"], ranks=(2,))
    assert capsys.readouterr().out.startswith("✓ ulysses_attention: equals the library")
