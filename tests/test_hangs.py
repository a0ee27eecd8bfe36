"""Loader workers must not inherit the locks of the process that starts them; multi-process runs must not hang.

They were fork()ed from a rank that had other threads. A check_dataset thread that Python had already joined could
still be in OpenCV's thread-exit cleanup, holding OpenCV's TLS mutex; the worker got that mutex locked, its first
cv2.imread waited forever and the other ranks waited in the next all-reduce (3-process test.py on the built-in
data: 3 of 6 runs hung in one series, 1 of 20 in another). Workers now start from a fork server
(workers.worker_context), a process with one thread.
"""
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from data.loaders import build_eval_loader
from conftest import TINY, run, torchrun

RUNS = 10
HANG_S = 120  # one 3-process run takes 10-30 s on 2 busy cores; a hung one never ends


# --- the mechanism, deterministically: a lock held by another thread while the workers start ---------------------

HELD = threading.Lock()  # a worker that imports this module gets a fresh, free one


class NeedsTheLock(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        with HELD:  # like OpenCV's TLS mutex in cv2.imread
            return torch.zeros(3, 1, 1), torch.full((1, 1), index)


def test_a_lock_held_by_another_thread_does_not_reach_the_workers():
    loader = build_eval_loader(NeedsTheLock(), 1, 2, 0, 1)
    loader.timeout = 60  # a worker stuck on the lock would make the loader raise instead of waiting forever
    started, release = threading.Event(), threading.Event()

    def hold():
        with HELD:
            started.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait()
    try:
        batches = iter(loader)  # the workers start while the other thread holds the lock
    finally:
        release.set()
        holder.join()
    assert sorted(int(label) for _, label in batches) == [0, 1, 2, 3]


# --- a dataset and transform from a --plugin file reach the workers ------------------------------------------------

PLUGIN = '''
import numpy as np
from data.transforms import EvalTransform, TrainTransform
from data.voc import SegmentationDataset, register_dataset


class Mirror:  # a plugin's own transform class, pickled by reference to module ailab_plugin_mirror_voc
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, image, label):
        return self.inner(np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1]))


class MirrorVOC(SegmentationDataset):
    pass


@register_dataset("mirror_voc")
def build(args, root, split, train):
    inner = TrainTransform(args.crop_size, args.scale_range, args.hflip_prob) if train else EvalTransform()
    return MirrorVOC(root, split, Mirror(inner), args.numclasses, check_contents=True)
'''


def test_plugin_dataset_with_loader_workers(tmp_path, tiny_data):
    plugin = tmp_path / "mirror_voc.py"
    plugin.write_text(PLUGIN)
    flags = list(TINY)
    flags[flags.index("--workers") + 1] = "2"
    logdir = tmp_path / "run"
    run(["train.py", *flags, "--plugin", str(plugin), "--dataset", "mirror_voc", "--dataset_path", tiny_data,
         "--numclasses", "5", "--limit_batches", "2", "--logdir", str(logdir)])
    # test.py imports the plugin again from the checkpoint, and so do its workers
    proc = run(["test.py", "--checkpoint", str(logdir / "last.pth"), "--save_path", str(tmp_path / "eval")])
    assert "mIoU" in proc.stdout and "7 images" in proc.stdout


# --- the scripts, many times, with their default workers ---------------------------------------------------------

def kill_leftovers(marker):
    """SIGKILL what is left of a hung run: every process whose command line holds `marker` (a path of that run),
    with its process group (torchrun starts each rank in a session of its own; its loader workers are in it)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            pid = int(pid)
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone already


def repeat_three_processes(script, make_args, tmp_path):
    """Run `script` under torchrun with 3 processes RUNS times; a message for the first hung or failed run, or None."""
    for i in range(1, RUNS + 1):
        marker = str(tmp_path / f"{os.path.splitext(script)[0]}-run{i:02d}")  # no marker is a prefix of another
        try:
            proc = torchrun(3, [script, "--distributed", *make_args(marker)], timeout=HANG_S, check=False)
        except subprocess.TimeoutExpired:
            kill_leftovers(marker)
            return f"run {i} of {RUNS}: 3-process {script} hung (still running after {HANG_S} s)"
        if proc.returncode != 0:
            return (f"run {i} of {RUNS}: 3-process {script} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return None


def test_three_process_test_py_and_infer_py_never_hang(tmp_path, trained, tiny_data):
    """Default loader workers (2 per process). The two scripts' series run side by side, one launch at a time each,
    so the test takes the time of one series on 2 cores whatever the pytest-xdist scheduling."""
    checkpoint = os.path.join(trained[0], "last.pth")
    images = os.path.join(tiny_data, "JPEGImages")
    series = {"test.py": lambda out: ["--checkpoint", checkpoint, "--save_path", out],
              "infer.py": lambda out: ["--checkpoint", checkpoint, "--input", images, "--output", out]}
    with ThreadPoolExecutor(len(series)) as pool:
        problems = list(pool.map(lambda item: repeat_three_processes(*item, tmp_path), series.items()))
    assert not any(problems), "\n".join(p for p in problems if p)
    assert len(os.listdir(tmp_path / f"test-run{RUNS:02d}" / "pred")) == 7
    masks = [n for n in os.listdir(tmp_path / f"infer-run{RUNS:02d}") if n.endswith(".png")]
    assert len(masks) == len(os.listdir(images))
