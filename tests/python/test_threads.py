"""CPU threads belong to the Engine (docs/DESIGN.md section 5.5): an Engine with threads=N runs N - 1
worker threads of its own and no others, gives them back when it goes, and two Engines used at the
same time from two Python threads neither share nor disturb each other's threads (outputs bit for bit
those of serial runs)."""
import gc
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from finequant import Engine, _core


def os_threads(expect=None) -> int:
    """This process's threads. A joined thread can stay listed for a moment (the kernel wakes the joiner
    before it removes the task; seen under ASan in CI), so with `expect` the count is re-read for up to 2 s
    until it matches."""
    deadline = time.monotonic() + 2.0
    n = len(os.listdir("/proc/self/task"))
    while expect is not None and n != expect and time.monotonic() < deadline:
        time.sleep(0.01)
        n = len(os.listdir("/proc/self/task"))
    return n


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def gpt2_dir(tiny_models):
    return str(tiny_models["gpt2"])


def test_an_engine_owns_its_threads(gpt2_dir):
    Engine(gpt2_dir, threads=1)  # anything loaded once per process (not threads) is loaded now
    gc.collect()
    before = os_threads()
    eng = Engine(gpt2_dir, threads=4)
    assert os_threads() == before + 3  # packing at load ran on the Engine's own pool too
    eng.forward(np.arange(12, dtype=np.int64).reshape(2, 6))
    assert os_threads() == before + 3
    eng.threads = 2
    eng.forward(np.arange(12, dtype=np.int64).reshape(2, 6))
    assert os_threads(before + 1) == before + 1
    del eng
    gc.collect()
    assert os_threads(before) == before


def test_two_engines_at_once_match_serial_runs(gpt2_dir):
    a, b = Engine(gpt2_dir, threads=2), Engine(gpt2_dir, threads=1)
    ids = np.random.default_rng(0).integers(0, 64, (3, 17)).astype(np.int64)
    want_a, want_b = a.forward(ids), b.forward(ids)
    want_gen = a._engine.generate(ids[:1], None, 6, 0.0, 0, 1.0, 0, [], None)
    errors = []

    def hammer(fn, want):
        try:
            for _ in range(20):
                if not np.array_equal(fn(), want):
                    errors.append("output changed")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(lambda: a.forward(ids), want_a)),
               threading.Thread(target=hammer, args=(lambda: b.forward(ids), want_b)),
               threading.Thread(target=hammer, args=(lambda: np.array(b._engine.generate(ids[:1], None, 6, 0.0, 0, 1.0, 0,
                                                                                         [], None)),
                                                     np.array(want_gen)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_one_engine_from_two_threads(gpt2_dir):
    # A second caller of a busy Engine runs its work on its own thread (no deadlock, same results).
    eng = Engine(gpt2_dir, threads=2)
    ids = np.arange(40, dtype=np.int64).reshape(4, 10) % 64
    want = eng.forward(ids)
    results = []
    workers = [threading.Thread(target=lambda: results.extend(eng.forward(ids) for _ in range(15))) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(results) == 45 and all(np.array_equal(r, want) for r in results)


def test_default_threads_follow_set_threads(gpt2_dir):
    _core.set_threads(3)
    try:
        gc.collect()
        before = os_threads()
        eng = Engine(gpt2_dir)
        assert os_threads() == before + 2
        del eng
    finally:
        _core.set_threads(0)
    assert _core.default_threads() >= 1


def test_engine_in_a_fork_child(gpt2_dir):
    # multiprocessing's fork start method: an Engine made in the parent keeps working in the child
    # (on the child's one thread: the parent's workers do not exist there), and deleting it there
    # must not wait for them.
    script = f"""
import os, time, numpy as np
from finequant import Engine
eng = Engine({gpt2_dir!r}, threads=2)
ids = np.arange(20, dtype=np.int64).reshape(2, 10) % 64
want = eng.forward(ids)
time.sleep(0.2)  # the workers sleep
pid = os.fork()
if pid == 0:
    ok = np.array_equal(eng.forward(ids), want)
    del eng
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert np.array_equal(eng.forward(ids), want)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
