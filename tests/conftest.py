"""Shared fixtures: a tiny built-in dataset, a trained tiny checkpoint, and a way to run the scripts as a user would."""
import importlib.util
import os
import socket
import subprocess
import sys

import pytest

from data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough that a whole run takes seconds on 2 CPU cores.
TINY = ["--layers", "18", "--crop_size", "64", "--batchsize", "4", "--epochs", "1", "--workers", "0",
        "--head_channels", "32", "--log_interval", "1", "--lr", "0.01"]


def load_script(path):
    """A script of the repo (path relative to the root) imported as a module, without running its main()."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, tmp_path=None, env=None, timeout=240, check=True):
    """Run a command from the repo root like a user would; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), "PYTHON": sys.executable, **(env or {})}
    if tmp_path is not None:
        full_env["AILAB_DATA"] = str(tmp_path / "cache")
    cmd = [sys.executable, *args] if args[0].endswith(".py") or args[0] == "-m" else list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def torchrun(nproc, args, **kw):
    port = str(free_port())
    return run(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *args], **kw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """16 train / 7 val images at 64 px: 7 is odd, so no world size of 2 or 3 divides it."""
    root = tmp_path_factory.mktemp("tiny") / "voc"
    synthetic.make_synthetic_voc(str(root), n_train=16, n_val=7, size=64, seed=1)
    return str(root)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data):
    """A one-epoch single-process run: (logdir, process)."""
    logdir = tmp_path_factory.mktemp("run") / "single"
    proc = run(["train.py", *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--logdir", str(logdir)])
    return str(logdir), proc
