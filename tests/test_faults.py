"""Fault tolerance with real processes and real signals: bit-identical resume after SIGTERM (1 and 2 processes),
an elastic restart after SIGKILL, a kill during a save, non-finite losses, bad checkpoints and a failing disk."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, free_port, run, torchrun

# 16 images, batch 4, 2 epochs: 4 steps per epoch in one process, 2 per rank in two.
FAULT_RUN = [*TINY, "--numclasses", "5", "--epochs", "2", "--deterministic", "--log_interval", "1"]


def env_for(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "AILAB_DATA": str(tmp_path / "cache"),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def steps_logged(logdir):
    path = os.path.join(logdir, "events.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


def start(cmd, tmp_path):
    return subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def signal_at_step(proc, logdir, step, signum, pid=None, timeout=180):
    """Send `signum` once the run has logged `step` optimizer steps; return (exit code, output)."""
    deadline = time.time() + timeout
    while steps_logged(logdir) < step:
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"run ended or stalled before step {step}:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    os.kill(pid or proc.pid, signum)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def params(path):
    return torch.load(path, weights_only=True)["model"]


def assert_bit_identical(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_sigterm_then_resume_is_bit_identical(tmp_path, tiny_data):
    reference = tmp_path / "a"
    run(["train.py", *FAULT_RUN, "--dataset_path", tiny_data, "--logdir", str(reference), "--save_interval", "1",
         "--keep_last", "1"], tmp_path)
    periodic = sorted(n for n in os.listdir(reference) if n.endswith(".pth"))
    assert periodic == ["best.pth", "epoch_002.pth", "last.pth"]  # epoch_001.pth pruned by --keep_last 1
    interrupted = tmp_path / "b"
    cmd = [sys.executable, "train.py", *FAULT_RUN, "--dataset_path", tiny_data, "--logdir", str(interrupted),
           "--resume", "auto"]
    code, out = signal_at_step(start(cmd, tmp_path), interrupted, 6, signal.SIGTERM)  # mid-epoch 2
    assert code == 143, out
    assert "stopped by SIGTERM at epoch 2" in out and "recovery.pth" in out
    proc = run(cmd[1:], tmp_path)
    assert "resumed from" in proc.stdout and "epoch 2, batch" in proc.stdout
    assert_bit_identical(reference / "last.pth", interrupted / "last.pth")


def worker_pids(launcher_pid):
    """Process ids of torchrun's workers (its direct children)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_sigterm_to_one_rank_stops_both_and_resume_is_bit_identical(tmp_path, tiny_data):
    reference = tmp_path / "a"
    torchrun(2, ["train.py", *FAULT_RUN, "--dataset_path", tiny_data, "--logdir", str(reference)], tmp_path=tmp_path)
    interrupted = tmp_path / "b"
    args = ["train.py", *FAULT_RUN, "--dataset_path", tiny_data, "--logdir", str(interrupted), "--resume", "auto"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    proc = start([*launcher, *args], tmp_path)
    deadline = time.time() + 120
    while len(worker_pids(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    rank1 = sorted(worker_pids(proc.pid))[1]
    code, out = signal_at_step(proc, interrupted, 3, signal.SIGTERM, pid=rank1)  # 2 steps per epoch: epoch 2
    assert code != 0
    assert "[rank 1]" in out and "stopped by SIGTERM" in out  # the rank that got the signal
    assert "stopped by a stop signal on another rank" in out  # and rank 0, which only agreed
    ckpt = torch.load(interrupted / "recovery.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    torchrun(2, args, tmp_path=tmp_path)
    assert_bit_identical(reference / "last.pth", interrupted / "last.pth")


def test_elastic_restart_after_sigkill_redoes_at_most_the_recovery_interval(tmp_path, tiny_data):
    logdir = tmp_path / "elastic"
    args = ["train.py", *FAULT_RUN, "--epochs", "3", "--dataset_path", tiny_data, "--logdir", str(logdir),
            "--resume", "auto", "--recovery_interval", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    proc = start([*launcher, *args], tmp_path)
    deadline = time.time() + 120
    while len(worker_pids(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    victim = sorted(worker_pids(proc.pid))[1]
    while steps_logged(logdir) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    killed_after = steps_logged(logdir)
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out  # torchrun restarted the group, which resumed by itself
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "recovery.pth" in resumed[0], out
    resume_step = int(resumed[0].split(", step ")[1].split(";")[0])
    print(f"elastic restart: SIGKILL after step {killed_after} was logged, resumed at step {resume_step}")
    assert killed_after - 1 <= resume_step <= killed_after + 1  # at most --recovery_interval steps redone
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["resume_at"]["step"] == 6


def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, tiny_data):
    logdir = tmp_path / "save"
    cmd = [sys.executable, "train.py", *FAULT_RUN, "--epochs", "4", "--dataset_path", tiny_data,
           "--logdir", str(logdir), "--recovery_interval", "1"]
    proc = start(cmd, tmp_path)
    deadline = time.time() + 120
    while True:  # wait for a second recovery save to be under way, then kill the process in the middle of it
        assert proc.poll() is None and time.time() < deadline, "no save in progress was caught"
        names = os.listdir(logdir) if logdir.exists() else []
        if "recovery.pth" in names and any(n.startswith(".recovery.pth.tmp") for n in names):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.communicate()
    partial = [n for n in os.listdir(logdir) if n.startswith(".recovery.pth.tmp")]
    assert partial  # the torn temporary file is there ...
    ckpt = torch.load(logdir / "recovery.pth", weights_only=True)  # ... and the previous checkpoint is whole
    assert ckpt["resume_at"]["step"] >= 1
    proc = run(cmd[1:] + ["--resume", "auto", "--epochs", "1"], tmp_path)
    assert "resumed from" in proc.stdout


def nan_run(tmp_path, tiny_data, policy, calls, extra=()):
    logdir = tmp_path / policy
    proc = torchrun(2, ["train.py", *FAULT_RUN, "--dataset_path", tiny_data, "--logdir", str(logdir),
                        "--plugin", "tests/nan_plugin.py", "--loss", "nan_at", "--nan_policy", policy, *extra],
                    tmp_path=tmp_path, env={"AILAB_NAN_CALLS": calls, "AILAB_NAN_RANK": "1"}, check=False)
    return proc, logdir, proc.stdout + proc.stderr


def test_nan_stop_policy_stops_every_rank_after_saving_the_last_good_step(tmp_path, tiny_data):
    proc, logdir, out = nan_run(tmp_path, tiny_data, "stop", "2")
    assert proc.returncode != 0
    assert "[rank 1] error: non-finite loss nan" in out and "error: non-finite loss nan" in out.replace("[rank 1] ", "", 1)
    assert "at epoch 1, batch 1, step 1" in out and "--nan_policy stop" in out
    ckpt = torch.load(logdir / "recovery.pth", weights_only=True)
    assert ckpt["resume_at"] == {"epoch": 0, "batch": 1, "step": 1}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_skip_policy_skips_on_every_rank_then_stops_at_the_limit(tmp_path, tiny_data):
    proc, logdir, out = nan_run(tmp_path, tiny_data, "skip", "2", ["--max_nan_skips", "1"])
    assert proc.returncode == 0, out
    skipped = [line for line in out.splitlines() if "update skipped on every rank (1/1 skips)" in line]
    assert len(skipped) == 2 and sum("[rank 1]" in line for line in skipped) == 1  # both ranks skipped it
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["nan_skips"] == 1 and ckpt["resume_at"]["step"] == 4  # the skipped update still counts a step
    proc, _, out = nan_run(tmp_path / "again", tiny_data, "skip", "2,3", ["--max_nan_skips", "1"])
    assert proc.returncode != 0 and "1 updates already skipped (--max_nan_skips)" in out


def logdir_digest(logdir):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(logdir)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def bad_checkpoints(tmp_path, good):
    """(path, extra flags, expected message part) for each kind of bad checkpoint."""
    raw = open(good, "rb").read()
    cases = []
    noise = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    # b"\x80\x05" opens a protocol-5 pickle: torch would add a warning about it to the one-line error
    for name, payload in (("truncated.pth", raw[: len(raw) // 2]), ("noise.pth", noise),
                          ("pickle5_noise.pth", b"\x80\x05" + noise)):
        (tmp_path / name).write_bytes(payload)
        cases.append((tmp_path / name, [], "could not be read"))
    torch.save(torch.load(good, weights_only=True)["model"], tmp_path / "weights_only.pth")
    cases.append((tmp_path / "weights_only.pth", [], "is not an ailab checkpoint"))
    cases.append((tmp_path / "missing.pth", [], "does not exist"))
    # Another --layers or --numclasses is refused the same way; test_config.py covers those flags.
    for flag, value in (("--model_type", "res50_ASPP"),):
        cases.append((good, [flag, value], f"was trained with {flag}"))
    return cases


def test_bad_checkpoints_stop_with_a_message_and_change_nothing(tmp_path, tiny_data, trained):
    logdir, _ = trained
    target = tmp_path / "target"
    run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--limit_batches", "1",
         "--logdir", str(target)], tmp_path)
    before = logdir_digest(target)
    for path, extra, expected in bad_checkpoints(tmp_path, os.path.join(logdir, "last.pth")):
        proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--logdir", str(target), "--resume", str(path),
                    *extra], tmp_path, check=False)
        assert proc.returncode == 2, (path, extra, proc.stderr)
        assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (path, proc.stderr)
        assert logdir_digest(target) == before, f"{path} {extra} changed the logdir"


def test_a_failing_disk_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    import resource
    logdir = tmp_path / "disk"
    base = ["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--logdir", str(logdir)]
    run(base, tmp_path)
    last = logdir / "last.pth"
    size, digest = last.stat().st_size, hashlib.sha256(last.read_bytes()).hexdigest()

    def small_files():  # "disk full" for any file past half a checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, *base, "--resume", "auto", "--epochs", "2"], cwd=ROOT,
                          env=env_for(tmp_path), capture_output=True, text=True, preexec_fn=small_files, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"could not write checkpoint {last}" in proc.stderr and "previous file is untouched" in proc.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert not [n for n in os.listdir(logdir) if ".tmp" in n]


def test_another_world_size_resumes_with_a_warning_unless_strict(tmp_path, tiny_data, trained):
    logdir, _ = trained
    last = os.path.join(logdir, "last.pth")
    common = ["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--resume", last]
    proc = torchrun(2, [*common, "--resume_strict", "--logdir", str(tmp_path / "s")], tmp_path=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "--resume_strict" in proc.stderr and "world size 1, this run has 2" in proc.stderr
    proc = torchrun(2, [*common, "--epochs", "2", "--logdir", str(tmp_path / "w")], tmp_path=tmp_path)
    assert "cannot be reproduced" in proc.stdout + proc.stderr
    assert torch.load(tmp_path / "w" / "last.pth", weights_only=True)["world_size"] == 2


def test_port_in_use_is_one_clear_line(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run(["train.py", "--distributed", "--limit_batches", "1"], tmp_path, check=False,
                   env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(port)})
    assert proc.returncode == 2 and f"port {port}" in proc.stderr and "already in use" in proc.stderr


def test_first_ctrl_c_asks_to_stop_and_the_second_quits_at_once():
    from argparse import Namespace
    from engine import faults
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a shell's background job
    signal.signal(signal.SIGINT, signal.default_int_handler)
    guard = faults.Guard(Namespace(nan_policy="stop", max_nan_skips=0))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread between bytecodes
        assert guard.signal == signal.SIGINT and not guard.stop_pending
        assert guard.agree(torch.tensor([2.0, 1.5]), 2, 1, {"ce": None}, 0.1, 0, 0, 0) == (1.0, {"ce": 0.75}, False)
        assert guard.stop_pending
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop = guard.stop_for_signal(1, 3, 7)
        assert stop.exit_code == 130 and "stopped by SIGINT at epoch 2, batch 3, step 7" in str(stop)
    finally:
        guard.restore()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, before)
    assert restored is signal.default_int_handler


def test_a_second_checkpoint_name_is_a_link_and_a_later_save_replaces_only_its_own_name(tmp_path, monkeypatch):
    """last.pth and best.pth of one epoch are written once (a hard link); the next epoch's last.pth must not change
    best.pth. Without hard links the second name is written again."""
    from engine.checkpoint import save_on_rank0
    ctx = SimpleNamespace(is_main=True)
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    save_on_rank0(ctx, {"epoch": 1, "w": torch.arange(4.0)}, [str(last), str(best)])
    assert last.stat().st_ino == best.stat().st_ino
    save_on_rank0(ctx, {"epoch": 2, "w": torch.zeros(4)}, [str(last)])
    assert torch.load(best)["epoch"] == 1 and torch.load(best)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert torch.load(last)["epoch"] == 2
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    save_on_rank0(ctx, {"epoch": 3}, [str(last), str(best)])
    assert last.stat().st_ino != best.stat().st_ino and torch.load(best)["epoch"] == torch.load(last)["epoch"] == 3
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
