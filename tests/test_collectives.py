"""Collectives that work on every backend: only core/distributed.py calls torch.distributed, every tensor it hands over
is on the device the group's backend requires (NCCL: this process's GPU; gloo: the CPU), and launchers are told
apart in the right order, with real processes."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from core import distributed
from conftest import ROOT, TINY, free_port, torchrun
from utils import UserError

PROBE = os.path.join("tests", "collective_probe.py")


def project_files():
    return [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
            if os.sep + "tests" + os.sep not in p and os.sep + "." not in p.replace(ROOT, "")]


def uses_torch_distributed(tree):
    """Line numbers where a module imports torch.distributed or reaches into it by attribute."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.distributed") or
                (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            lines.append(node.lineno)
    return lines


def test_only_distributed_py_touches_torch_distributed():
    found = {}
    for path in project_files():
        with open(path) as f:
            lines = uses_torch_distributed(ast.parse(f.read(), path))
        if lines:
            found[os.path.relpath(path, ROOT)] = lines
    assert list(found) == ["core/distributed.py"], found


def misplaced(records):
    """Records of calls that did not come from distributed.py, or whose tensors were not where the backend needs."""
    bad = []
    for r in records:
        need = f"cuda:{r['local_rank']}" if r["backend"] == "nccl" else "cpu"
        if r["caller"] != "core/distributed.py" or any(d != need for d in r["devices"]):
            bad.append(r)
    return bad


def test_the_check_catches_a_cpu_tensor_under_nccl_and_a_call_from_elsewhere():
    # what faults.Guard.agree did before: a CPU flag tensor in an NCCL group, called from faults.py
    assert misplaced([{"op": "all_reduce", "caller": "faults.py", "backend": "nccl", "local_rank": 0,
                       "devices": ["cpu"]}])
    assert misplaced([{"op": "all_reduce", "caller": "core/distributed.py", "backend": "nccl", "local_rank": 1,
                       "devices": ["cuda:0"]}])
    assert not misplaced([{"op": "all_reduce", "caller": "core/distributed.py", "backend": "nccl", "local_rank": 1,
                           "devices": ["cuda:1"]}])


def read_records(folder):
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "rank*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f]
    return records


def test_training_evaluation_and_inference_call_collectives_only_through_distributed_py(tmp_path, tiny_data):
    log_dir = tmp_path / "collectives"
    log_dir.mkdir()
    env = {"AILAB_COLLECTIVE_LOG": str(log_dir)}
    logdir = tmp_path / "run"
    torchrun(2, ["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--epochs", "2",
                 "--logdir", str(logdir), "--plugin", PROBE, "--ema_decay", "0.9", "--recovery_interval", "2",
                 "--early_stop_patience", "5"], tmp_path=tmp_path, env=env)
    torchrun(2, ["test.py", "--checkpoint", str(logdir / "last.pth"), "--plugin", PROBE, "--workers", "0",
                 "--save_path", str(tmp_path / "test")], tmp_path=tmp_path, env=env)
    torchrun(2, ["infer.py", "--checkpoint", str(logdir / "last.pth"), "--plugin", PROBE, "--workers", "0",
                 "--input", os.path.join(tiny_data, "JPEGImages"), "--output", str(tmp_path / "pred")],
             tmp_path=tmp_path, env=env)
    records = read_records(log_dir)
    ops = {r["op"] for r in records}
    # the signal/NaN flags and loss sums, the confusion matrix, buffers, the logdir and stop decisions, RNG states
    assert {"all_reduce", "broadcast", "broadcast_object_list", "gather_object"} <= ops, ops
    assert {r["backend"] for r in records} == {"gloo"}
    assert not misplaced(records), misplaced(records)[:5]


def test_device_rules():
    assert distributed.comm_device("nccl", torch.device("cuda:1")) == torch.device("cuda:1")
    assert distributed.comm_device("gloo", torch.device("cuda:1")) == torch.device("cpu")
    assert distributed.comm_device("gloo", torch.device("cpu")) == torch.device("cpu")
    assert distributed.pick_device("cpu", 1, 2, True) == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda:0 names one GPU, but 2 processes run on this node"):
        distributed.pick_device("cuda:0", 1, 2, True, visible=2)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            distributed.pick_device("cuda", 0, 1, True)


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_each_process_gets_a_gpu_of_its_own(spec, monkeypatch):
    """LOCAL_RANK when that many GPUs are visible; cuda:0 when exactly one is (one GPU per task); otherwise an error
    naming LOCAL_RANK, the count and CUDA_VISIBLE_DEVICES, never two ranks on one GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for local_rank, visible, expected in [(0, 8, 0), (3, 8, 3), (7, 8, 7), (0, 1, 0), (1, 1, 0), (5, 1, 0)]:
        assert distributed.pick_device(spec, local_rank, 8, True, visible=visible) == torch.device("cuda", expected)
    with pytest.raises(UserError) as e:
        distributed.pick_device(spec, 2, 4, True, visible=2)
    assert str(e.value) == ("LOCAL_RANK 2 has no GPU of its own: 2 GPU(s) are visible to it (CUDA_VISIBLE_DEVICES=0,1)"
                            "; expected at least LOCAL_RANK+1 = 3 visible GPUs, or exactly one per process")
    if spec == "auto":
        assert distributed.pick_device(spec, 3, 4, True, visible=0) == torch.device("cpu")
    # one visible GPU per task: cuda:0 is each process's own, even with several processes on the node
    assert distributed.pick_device("cuda:0", 3, 4, True, visible=1) == torch.device("cuda", 0)
    with pytest.raises(UserError, match="--device cuda:0 names one GPU, but 4 processes run on this node"):
        distributed.pick_device("cuda:0", 3, 4, True, visible=2)


LAUNCHER_KEYS = [key for _, *keys in distributed.LAUNCHER_ENV for key in keys]


@pytest.mark.parametrize("launcher", ["OpenMPI", "PMI"])
def test_mpirun_inside_a_slurm_job_forms_one_group(tmp_path, tiny_data, launcher):
    """Two processes as mpirun starts them inside an sbatch allocation: MPI's rank variables, and the batch step's
    SLURM_PROCID=0 / SLURM_NTASKS=1 in both. They must form one group of 2, not two runs that both think they are
    rank 0 of 1."""
    logdir = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
        env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1"})
        if launcher == "OpenMPI":
            env.update({"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
        else:
            env.update({"PMI_RANK": str(rank), "PMI_SIZE": "2", "MPI_LOCALRANKID": str(rank), "MPI_LOCALNRANKS": "2"})
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", "--distributed", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
             "--logdir", str(logdir), "--limit_batches", "2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "2 process(es) on cpu (backend gloo)" in outputs[0] and "lr 0.01 × 2 processes = 0.02" in outputs[0]
    assert outputs[1].strip() == ""  # rank 1 logs only warnings and errors
    with open(logdir / "train.log") as f:
        assert f.read().count("2 process(es) on cpu") == 1
