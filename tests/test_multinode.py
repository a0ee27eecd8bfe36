"""Many machines, simulated on one: two torchrun agents (one per "node", each in its own working folder) that meet
through a rendezvous endpoint on 127.0.0.1, as `--nnodes=2` jobs on two machines do."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY, free_port, torchrun
from test_faults import params, steps_logged, worker_pids

RUN = [*TINY, "--numclasses", "5", "--epochs", "2", "--deterministic"]


def node_env(tmp_path, node):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
           "AILAB_DATA": str(tmp_path / f"cache{node}")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def start_nodes(tmp_path, cmd_for_node, env_for_node=lambda node: {}):
    """Start one agent per node, each in its own working folder (its own 'machine'); returns the processes."""
    procs = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        procs.append(subprocess.Popen(cmd_for_node(node), cwd=cwd, env={**node_env(tmp_path, node),
                                                                         **env_for_node(node)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def finish(procs, timeout=300):
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("the two-node job hung:\n" + "\n".join(p.communicate()[0] for p in procs))
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(outputs)
    return outputs


def c10d_agent(port, node, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ailab-test", *extra]


def test_two_nodes_train_like_one_node_and_write_one_set_of_outputs(tmp_path, tiny_data):
    reference = tmp_path / "reference"
    torchrun(2, ["train.py", *RUN, "--dataset_path", tiny_data, "--logdir", str(reference)], tmp_path=tmp_path)

    # c10d rendezvous, as on a cluster; the run folder is relative, so each node would write into its own folder
    port = free_port()
    (tmp_path / "c10d").mkdir()
    finish(start_nodes(tmp_path / "c10d", lambda node: [
        *c10d_agent(port, node), os.path.join(ROOT, "train.py"), "--distributed", *RUN,
        "--dataset_path", tiny_data, "--logdir", "runs/two"]))
    written = [node for node in range(2) if (tmp_path / "c10d" / f"node{node}" / "runs" / "two").exists()]
    assert len(written) == 1, written  # one writer: global rank 0
    logdir = tmp_path / "c10d" / f"node{written[0]}" / "runs" / "two"
    assert {"train.log", "summary.csv", "last.pth", "best.pth", "config.toml"} <= set(os.listdir(logdir))
    with open(logdir / "train.log") as f:
        log = f.read()
    assert "2 process(es) on cpu (backend gloo)" in log and "val mIoU" in log

    # the shell launcher with a static rendezvous: NNODES=2, NODE_RANK=0/1, the first node's address and port
    port = str(free_port())
    (tmp_path / "static").mkdir()
    finish(start_nodes(tmp_path / "static", lambda node: [
        "bash", os.path.join(ROOT, "train_torchrun.sh"), *RUN, "--dataset_path", tiny_data, "--logdir", "runs/two"],
        lambda node: {"NNODES": "2", "NODE_RANK": str(node), "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": port}))
    static = tmp_path / "static" / "node0" / "runs" / "two"
    assert not (tmp_path / "static" / "node1" / "runs").exists()  # node 1 has global rank 1: it writes nothing

    for path in (logdir / "last.pth", static / "last.pth"):
        got, want = params(path), params(reference / "last.pth")
        assert got.keys() == want.keys()
        worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
        assert worst <= 1e-6, f"{path}: largest difference from the one-node run {worst:g}"


def test_a_killed_worker_on_node_1_restarts_the_job_which_resumes(tmp_path, tiny_data):
    port = free_port()
    run_dir = tmp_path / "shared"
    logdir = run_dir / "runs" / "elastic"  # absolute: both nodes see one folder, as with a shared filesystem
    procs = start_nodes(tmp_path, lambda node: [
        *c10d_agent(port, node, ["--max-restarts=1"]), os.path.join(ROOT, "train.py"), "--distributed", *RUN,
        "--epochs", "3", "--dataset_path", tiny_data, "--logdir", str(logdir), "--resume", "auto",
        "--recovery_interval", "1"])
    deadline = time.time() + 180
    while steps_logged(logdir) < 3:
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "the job ended or stalled early"
        time.sleep(0.05)
    victims = worker_pids(procs[1].pid)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    outputs = finish(procs)
    everything = "\n".join(outputs)
    resumed = [line for line in everything.splitlines() if "resumed from" in line]
    assert resumed and all("recovery.pth" in line for line in resumed), everything
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2


def test_a_machine_that_does_not_see_the_checkpoint_stops_every_process(tmp_path, tiny_data):
    """--logdir on each machine's own disk: node 0 holds last.pth, node 1 nothing. Resuming on node 0 alone would
    train two models (or hang); every process stops at once with the same line instead."""
    nodes = tmp_path / "local"
    (nodes / "node0").mkdir(parents=True)
    torchrun(1, [os.path.join(ROOT, "train.py"), *RUN, "--epochs", "1", "--dataset_path", tiny_data,
                 "--logdir", str(nodes / "node0" / "run")], tmp_path=tmp_path)
    port = free_port()
    procs = start_nodes(nodes, lambda node: [
        *c10d_agent(port, node), os.path.join(ROOT, "train.py"), "--distributed", *RUN, "--dataset_path", tiny_data,
        "--logdir", "run", "--resume", "auto"])
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("the processes waited on each other instead of stopping")
    line = ("--resume auto: rank 0 resumes run/last.pth at epoch 2, batch 0, but 1 process(es) see another checkpoint "
            "or none; expected every machine to see the same checkpoint")
    assert all(p.returncode != 0 for p in procs) and all(line in out for out in outputs), "\n=====\n".join(outputs)
    assert not (nodes / "node1" / "run" / "last.pth").exists()
