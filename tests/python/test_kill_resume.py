"""Nothing lost on faults (docs/DESIGN.md, Reliability): `finequant quantize --lkd` / `--distill` killed with
SIGKILL at random moments of training, then run again with the same checkpoint directory, ends with
the same model as a run never interrupted; a kill leaves either no OUT or the finished model there.

Each run is a real process (python -m finequant); the kill moments are seeded, drawn uniformly over
the training part of an uninterrupted run (from the checkpoint directory's creation to the model's
publication, counted from each run's start), so kills land in training steps, checkpoint saves and the
final write alike; a resumed run has less left to do, so later kills may find it finished. The first kill
is timed from the run's own checkpoint marker, within the first half of training: timed from the start,
a run that started faster than the reference could finish first (it did once, for distillation); a run that
still finishes first (it trained faster than the reference, on a machine busy during the reference run) is
started over and killed sooner.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
from safetensors.numpy import load_file  # noqa: E402

# Small training runs that still last a few seconds past the imports (checkpoints: LKD per block,
# distillation every 50 steps).
RUNS = {
    "lkd": ("llama", "lkd.json", ["--scheme", "w4a8", "--lkd", "--lkd-steps", "150", "--lkd-batch", "4",
                                  "--lkd-seq", "16", "--lkd-samples", "8", "--lkd-data", "random"]),
    "distill": ("bert", "distill.json", ["--scheme", "w4a8", "--distill", "--distill-steps", "160",
                                         "--distill-batch", "4", "--distill-seq", "12"]),
}


def _start(src, out, ck, args):
    flag = "--lkd-checkpoint" if "--lkd" in args else "--distill-checkpoint"
    return subprocess.Popen([sys.executable, "-m", "finequant", "quantize", str(src), "-o", str(out), "--quiet",
                             "--seed", "3", flag, str(ck), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _until(cond, seconds=120.0):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _tensors(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("mode", sorted(RUNS))
def test_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(mode, tiny_models, tmp_path):
    family, marker, args = RUNS[mode]
    src = tiny_models[family]

    ref_ck = tmp_path / "ref_ck"
    started = time.time()
    proc = _start(src, tmp_path / "ref", ref_ck, args)
    _until(lambda: (ref_ck / marker).exists())
    began = time.time()
    startup = began - started  # imports, loading, quantization: the same in every run
    _until(lambda: (tmp_path / "ref").exists() or proc.poll() is not None)
    training = time.time() - began  # checkpoint directory made -> model published
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    ref = _tensors(tmp_path / "ref")

    out, ck = tmp_path / "out", tmp_path / "ck"
    rng = random.Random(f"{mode}-kills")
    killed_before_done = 0
    first_kill = training / 2
    for attempt in range(4):
        proc = _start(src, out, ck, args)
        if attempt == 0:  # the first kill inside training whatever this run's startup took: one resume at least
            _until(lambda: (ck / marker).exists() or proc.poll() is not None)
            time.sleep(rng.uniform(0, first_kill))
            for _ in range(3):
                if proc.poll() is None:
                    break
                # It finished first: it trained faster than the reference (a machine busy during the
                # reference run): start it over and kill it sooner.
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(ck, ignore_errors=True)
                first_kill /= 4
                proc = _start(src, out, ck, args)
                _until(lambda: (ck / marker).exists() or proc.poll() is not None)
                time.sleep(rng.uniform(0, first_kill))
        else:
            time.sleep(startup + rng.uniform(0, training))
        if proc.poll() is not None:  # finished before the kill (resumed from late checkpoints)
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # OUT appears whole (one rename of the finished directory) or not at all: a kill after the
        # rename leaves the finished model, checked below.
        if out.exists():
            break
        killed_before_done += 1
    assert killed_before_done >= 1  # at least one run died mid-way and was resumed
    if not out.exists():
        proc = _start(src, out, ck, args)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()

    got = _tensors(out)
    assert sorted(got) == sorted(ref)
    different = [n for n in ref if not (got[n] == ref[n]).all()]
    assert not different, different
    # Leftovers of killed runs are hidden partial directories, never at OUT's name.
    assert all(name.startswith(".out.partial-") for name in os.listdir(tmp_path)
               if name not in ("ref", "ref_ck", "out", "ck"))
