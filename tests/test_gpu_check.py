"""tools/gpu_check.sh: the GPU check's CPU mode runs every CPU row, and without a GPU the script refuses in one line."""
import importlib.util
import json
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, TINY, run
from engine.recipe import native_bf16

SCRIPT = ["bash", "tools/gpu_check.sh"]
TRAIN_ROWS = ["train-fp32", "train-amp-bf16", "train-channels-last", "classify-amp-channels-last", "ddp-1proc"]
# export-onnx is left out of the end-to-end run (ROWS) to keep it short: the ONNX export itself is tested in
# test_inference.py, the row's skip without the packages below.
CPU_ROWS = TRAIN_ROWS + ["test", "infer", "export-torchscript"]
GPU_ONLY_ROWS = ["train-amp-fp16", "nccl-cpu-tensor-rule", "ddp-2proc", "train-compile", "train-dali", "test-dali"]


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_table(path):
    """{row name: {column: cell}} from the markdown table of gpu_check.md."""
    lines = [l for l in open(path).read().splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells))
            for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines[1:])}


def tiny_env(tmp_path, tiny_data):
    flags = dict(zip(TINY[::2], TINY[1::2]))
    return {"GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path / "out"), "CROP": flags["--crop_size"],
            "BATCHSIZE": flags["--batchsize"], "STEPS": "2", "WORKERS": "0", "INFER_IMAGES": "4",
            "MODEL": f"--layers {flags['--layers']} --head_channels {flags['--head_channels']}",
            "TRAIN_FLAGS": f"--dataset_path {tiny_data} --numclasses 5 --lr {flags['--lr']}",
            "ROWS": ",".join(CPU_ROWS + GPU_ONLY_ROWS)}


def test_cpu_mode_passes_the_cpu_rows_and_skips_the_gpu_rows(tmp_path, tiny_data):
    proc = run(SCRIPT, tmp_path=tmp_path, env=tiny_env(tmp_path, tiny_data), timeout=400, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "device: CPU (GPU_CHECK_DEVICE=cpu" in out and f"torch {torch.__version__}" in out
    md = tmp_path / "out" / "gpu_check.md"
    table = read_table(md)
    assert set(CPU_ROWS + GPU_ONLY_ROWS) <= set(table), table.keys()
    for name in CPU_ROWS:
        assert table[name]["result"] == "PASS", (name, table[name], out)
        assert (tmp_path / "out" / f"{name}.log").exists()
    assert table["export-onnx"]["result"] == "SKIP" and table["export-onnx"]["note"] == "not in ROWS"
    for name in TRAIN_ROWS:
        assert float(table[name]["img/s"]) > 0 and float(table[name]["steady img/s"]) > 0, table[name]
        assert table[name]["peak GPU MiB"] == "-"
    assert "backend gloo" in table["ddp-1proc"]["note"]
    # --amp runs what this CPU runs natively: bfloat16 autocast, or float32 with a line saying why.
    amp = "autocast bfloat16" if native_bf16("cpu") else "--amp: running in float32"
    assert amp in table["train-amp-bf16"]["note"] and amp in table["classify-amp-channels-last"]["note"]
    assert f"--amp runs {'autocast bfloat16' if native_bf16('cpu') else 'float32'}" in out
    assert table["infer"]["note"] == "4 masks" and "mIoU" in table["test"]["note"]
    for name in GPU_ONLY_ROWS:
        assert table[name]["result"] == "SKIP" and table[name]["note"].startswith("CPU mode"), table[name]
    # The printed table has the same rows and verdicts as the file.
    for name, row in table.items():
        assert any(line.split()[:2] == [name, row["result"]] for line in out.splitlines()), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    proc = run(SCRIPT, env={"GPU_CHECK_DEVICE": "", "OUT": str(tmp_path / "out")}, timeout=120, check=False)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert len(out.splitlines()) == 1 and "no CUDA GPU" in out and "GPU_CHECK_DEVICE=cpu" in out
    assert not (tmp_path / "out").exists()


def test_parsing_of_gpu_logs_and_failures(tmp_path):
    """What CPU mode cannot show: the GPU memory of the done line, torchrun's failure box, the steady rate."""
    gc = load_module()
    log = ("12:00:01 epoch 1/1: train loss 1.2, val mIoU 0.5, pixel acc 0.8, 950.5 img/s (best)\n"
           "12:00:02 done in 9 s: best val mIoU 0.5 at epoch 1; last epoch val mIoU 0.5, pixel acc 0.8; "
           "mean 950.5 img/s; peak memory 3000 MiB RSS, 4321 MiB GPU; checkpoints a and b\n")
    assert gc.parse_train_log(log) == (950.5, 4321.0)
    assert gc.parse_train_log(log.splitlines()[0]) == (950.5, None)
    failed = ("$ python -m torch.distributed.run train.py\n[rank 0] error: --dist_backend nccl needs a CUDA device\n"
              "E0101 elastic failed\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
              "============================================================\n")
    error_line = sys.modules["gpu_check_logs"].error_line  # imported by gpu_check's runner
    assert error_line(failed) == "[rank 0] error: --dist_backend nccl needs a CUDA device"
    assert error_line("Traceback (most recent call last):\n  x\nRuntimeError: CUDA out of memory\n") \
        == "RuntimeError: CUDA out of memory"
    events = tmp_path / "events.jsonl"
    # A slow first step (compile), then 0.1 s per step of 16 images: the steady rate ignores the first half.
    times = [100.0, 100.1, 100.2, 100.3, 100.4]
    events.write_text("".join(json.dumps({"step": i + 1, "time": t, "train/images_per_s": 1.0}) + "\n"
                              for i, t in enumerate(times)))
    assert gc.steady_rate(str(events), 16) == pytest.approx(160.0)


def test_onnx_row_skips_without_the_packages(tmp_path, monkeypatch):
    gc = load_module()
    monkeypatch.setenv("GPU_CHECK_DEVICE", "cpu")
    monkeypatch.setenv("OUT", str(tmp_path))
    check = gc.Check()
    check.deadline = gc.time.monotonic() + 60
    check.rows.append(gc.Row("train-fp32", "PASS"))
    real = importlib.util.find_spec
    monkeypatch.setattr(gc.importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    row = check.export_row("onnx")
    assert row.status == "SKIP" and row.note == "skip: onnxscript not installed (pip install onnxscript)"
    assert "export-onnx" not in check.commands and (tmp_path / "gpu_check.md").exists()


def test_step_overhead_row_reads_the_benchmarks_ratio(tmp_path, monkeypatch):
    """The row runs benchmarks/step_overhead.py for real (here on the CPU, with gpu_mode forced) and its note carries
    the benchmark's ratio; a run that prints no ratio line fails the row."""
    gc = load_module()
    monkeypatch.setenv("GPU_CHECK_DEVICE", "cpu")
    monkeypatch.setenv("OUT", str(tmp_path))
    # One thread, as every test's subprocess has (conftest.run): the tiny model's steps are microseconds of work,
    # and two OpenMP threads on 2 cores shared with the other test worker wait on each other ten times longer.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    check = gc.Check()
    check.deadline = gc.time.monotonic() + 120
    check.gpu_mode = True
    row = check.step_overhead_row("tiny")
    assert row.status == "PASS", (row.note, (tmp_path / "step-overhead-tiny.log").read_text())
    assert re.fullmatch(r"suite \S+ ms/step, bare \S+ ms/step, ratio \d+\.\d+ \(range \S+\)", row.note), row.note
    monkeypatch.setattr(check, "python", "true")  # exits 0 and prints nothing
    assert check.step_overhead_row("tiny").status == "FAIL"
