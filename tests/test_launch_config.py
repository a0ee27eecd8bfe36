"""The VS Code debug entries and --help, as a user meets them."""
import json
import os
import re

from conftest import ROOT, TINY, free_port, run


def load_jsonc(path):
    """VS Code's launch.json allows // comments; drop them (outside strings) and parse the rest as JSON."""
    text = open(path).read()
    text = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*', lambda m: m.group(1) or "", text)
    return json.loads(text)


def test_vscode_launch_entries():
    configs = {c["name"]: c for c in load_jsonc(os.path.join(ROOT, ".vscode", "launch.json"))["configurations"]}
    ddp = configs["Debug DDP Training"]
    assert "--distributed" in ddp["args"]
    assert {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items() <= ddp["env"].items()
    assert {"MASTER_ADDR", "MASTER_PORT"} <= set(ddp["env"])
    torchrun = [c for c in configs.values() if c.get("module") == "torch.distributed.run"]
    assert torchrun and "--nproc_per_node=2" in torchrun[0]["args"] and "train.py" in torchrun[0]["args"]
    programs = {os.path.basename(c.get("program", "")) for c in configs.values()}
    assert {"train.py", "test.py", "infer.py", "main.py"} <= programs


def test_debug_ddp_entry_runs_a_process_group_of_one(tmp_path, tiny_data):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run(["train.py", "--distributed", *TINY, "--dataset_path", tiny_data, "--numclasses", "5",
                "--logdir", str(tmp_path / "run")], env=env)
    assert "1 process(es) on cpu (backend gloo)" in proc.stdout
    assert os.path.exists(tmp_path / "run" / "last.pth")


def test_help_groups_the_flags():
    out = run(["train.py", "--help"]).stdout
    for group in ("data:", "task:", "segmentation:", "classification:", "model:", "optimisation:", "recipe:", "run:",
                  "processes:", "config:"):
        assert group in out
    for flag in ("--layers", "--model_type", "--dataset_path", "--numclasses", "--batchsize", "--epochs", "--lr",
                 "--workers", "--logdir", "--distributed", "--world_size", "--dist_url", "--resume", "--lr_scaling"):
        assert flag in out


def test_the_launcher_finds_python3_where_there_is_no_python(tmp_path):
    """Many images have only `python3`: without PYTHON set, train_torchrun.sh uses it."""
    import sys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/bin", "PYTHON": "", "NPROC_PER_NODE": "1"}  # empty: the script's default
    proc = run(["bash", "train_torchrun.sh", "--help"], env=env, check=False)
    assert proc.returncode == 0 and "usage: train.py" in proc.stdout, proc.stdout + proc.stderr
