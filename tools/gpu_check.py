"""The rows of tools/gpu_check.sh: run each GPU path for a few steps and report PASS/FAIL/SKIP, seconds,
images/s and peak GPU memory as a table (stdout and $OUT/gpu_check.md), each row's log in $OUT/<row>.log.

Settings come from the environment; tools/gpu_check.sh lists them. Exit code: 0 when no row failed, 1 when one
did, 2 when there is no CUDA GPU and GPU_CHECK_DEVICE=cpu is not set, 130 when interrupted.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers beside this script, however it is loaded
from gpu_check_logs import (last_data_wait, misplaced_collectives, parse_train_log, short,  # noqa: E402
                            steady_rate)
from gpu_check_procs import free_port  # noqa: E402
from gpu_check_runner import Row, Runner  # noqa: E402

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
COMPILE_FAILED = "--compile: torch.compile failed"
# test.py's mIoU through DALI's GPU decoder against the OpenCV loader's (nvJPEG and libjpeg round differently)
DALI_MIOU_TOLERANCE = 2e-3

# The NCCL rule the suite's collectives rely on (distributed.py copies CPU tensors to the GPU under NCCL):
# in an NCCL group, an all_reduce of a CPU tensor fails and one of a CUDA tensor works. Reported, not enforced.
NCCL_RULE = r"""
import datetime, socket, torch, torch.distributed as dist
def outcome(t):
    try:
        dist.all_reduce(t)
        if t.is_cuda:
            torch.cuda.synchronize()
        return f"worked (sum {t.item():g})"
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"failed: {type(e).__name__}: {text[:160]}"
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device,
                        timeout=datetime.timedelta(seconds=60))
print(f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, 1-process nccl group")
print("RESULT cpu tensor: " + outcome(torch.ones(1)))
print("RESULT cuda tensor: " + outcome(torch.ones(1, device=device)))
dist.destroy_process_group()
"""


class Check(Runner):
    """The rows, in the order main() runs them."""

    def __init__(self):
        super().__init__()
        self.miou = {}  # the mIoU of each passing test row

    def logdir(self, name):
        path = os.path.join(self.out, "runs", name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def train(self, name, extra=(), nproc=None, steps=None, expect=(), timeout=None, base=None, **kw):
        """A training row: train.py (under torchrun with `nproc`) for `steps` batches of one epoch, with
        TRAIN_FLAGS (or `base` instead) and `extra`."""
        def fn(row, limit):
            logdir = self.logdir(name)
            flags = [*self.model, "--epochs", "1", "--batchsize", str(self.batchsize), "--crop_size", str(self.crop),
                     "--limit_batches", str(steps or self.steps), "--workers", str(self.workers),
                     "--log_interval", "1", "--no_progress", "--vis_interval", "0", "--gpu_stats_interval", "0",
                     "--device", self.device, "--logdir", logdir,
                     *(self.train_flags if base is None else base), *extra]
            if nproc:  # every collective recorded: on the device the backend needs, called from distributed.py
                shutil.rmtree(self.env["AILAB_COLLECTIVE_LOG"], ignore_errors=True)
                os.makedirs(self.env["AILAB_COLLECTIVE_LOG"])
                flags += ["--plugin", os.path.join("tests", "collective_probe.py")]
                cmd = [self.python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                       "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", "--distributed", *flags]
            else:
                cmd = [self.python, "train.py", *flags]
            rc, seconds, text = self.run(name, cmd, limit)
            log_path = os.path.join(logdir, "train.log")
            log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
            world = nproc or 1
            where = f"{world} process(es) on {'cuda:0' if self.gpu_mode else 'cpu'}"
            row.rate, row.gpu_mib = parse_train_log(log)
            events = os.path.join(logdir, "events.jsonl")
            row.steady = steady_rate(events, self.batchsize * world)
            problem = None
            if not log:
                problem = f"no {log_path}"
            elif where not in log:
                problem = f"train.log lacks '{where}'"
            elif not (row.rate or 0) > 0:
                problem = "no 'mean X img/s' in train.log"
            elif not all(os.path.exists(os.path.join(logdir, f)) for f in ("last.pth", "best.pth")):
                problem = "last.pth or best.pth missing"
            for needle in expect:
                if problem is None and needle not in log:
                    problem = f"train.log lacks '{needle}'"
            if problem is None and nproc:
                problem = misplaced_collectives(self.env["AILAB_COLLECTIVE_LOG"])
            if problem is None and COMPILE_FAILED in log:
                problem = next(l for l in log.splitlines() if COMPILE_FAILED in l)
            self.finish(row, rc, seconds, text if rc is None else text + "\n" + log, problem)
            if row.status == "PASS":
                wait = last_data_wait(events)
                row.note = "; ".join(x for x in [*[e.strip("(); ") for e in expect if "backend" in e or "autocast" in e or "float32" in e],
                                                 f"data wait {wait:.0%}" if wait is not None else ""] if x)
        return self.row(name, fn, timeout=timeout, **kw)

    def checkpoint(self):
        return os.path.join(self.out, "runs", "train-fp32", "best.pth")

    def test_row(self, name="test", extra=(), compare=None, needs="train-fp32", **kw):
        """test.py on train-fp32's checkpoint, with `extra` flags; with `compare` (a row name), its mIoU (metrics.json)
        must be within DALI_MIOU_TOLERANCE of that row's."""
        def fn(row, limit):
            save = self.logdir(name)
            rc, seconds, text = self.run(name, [self.python, "test.py", "--checkpoint", self.checkpoint(),
                                                "--save_path", save, "--no_save_pred", "--workers", str(self.workers),
                                                "--device", self.device, *extra], limit)
            m = re.search(r"\bmIoU ([\d.]+)\s+pixel acc", text)
            n = re.search(r": (\d+) images, ", text)
            metrics = os.path.join(save, "metrics.json")
            problem = None if m and os.path.exists(metrics) else "no mIoU or metrics.json"
            miou = json.load(open(metrics))["miou"] if problem is None else None
            if problem is None and compare is not None:
                other = self.miou.get(compare)
                if other is None or abs(miou - other) > DALI_MIOU_TOLERANCE:
                    problem = f"mIoU {miou} against {other} of the {compare} row (tolerance {DALI_MIOU_TOLERANCE})"
            self.finish(row, rc, seconds, text, problem)
            if row.status == "PASS":
                self.miou[name] = miou
                row.note = f"mIoU {m.group(1)} on {n.group(1) if n else '?'} val images" + (
                    f" ({compare}: {self.miou[compare]:.4f})" if compare else "")
        return self.row(name, fn, needs=needs, **kw)

    def dali_rows(self):
        """--loader dali on the GPU: training with images decoded by DALI's mixed (nvJPEG) decoder, and test.py's
        metrics through it against the OpenCV loader's on the same checkpoint. The CPU pipeline is tested by
        tests/test_dali*.py; these rows are for what only a GPU runs."""
        cpu = "tests/test_dali*.py cover the CPU pipeline"
        if self.gpu_mode and (importlib.util.find_spec("nvidia") is None
                              or importlib.util.find_spec("nvidia.dali") is None):
            for name in ("train-dali", "test-dali"):
                self.rows.append(Row(name, note="skip: NVIDIA DALI not installed (pip install -r "
                                                "requirements-dali.txt)"))
            self.write_markdown()
            return
        self.train("train-dali", ["--loader", "dali"], expect=["images decoded on cuda"], gpu_only=cpu)
        self.test_row("test-dali", ["--loader", "dali"], compare="test", needs="test", gpu_only=cpu)

    def infer_row(self):
        def fn(row, limit):
            with open(os.path.join(self.out, "runs", "train-fp32", "train.log"), errors="replace") as f:
                m = re.search(r"\bdata (.+?): \d+ train / \d+ val images", f.read())
            if not m:
                row.status, row.note = "FAIL", "no 'data ROOT: N train / M val images' line in train-fp32's train.log"
                return
            root = m.group(1)
            with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")) as f:
                ids = [l.strip() for l in f if l.strip()][:self.infer_images]
            images = [os.path.join(root, "JPEGImages", i + ".jpg") for i in ids]
            listing = os.path.join(self.out, "infer-input.txt")
            with open(listing, "w") as f:
                f.write("".join(p + "\n" for p in images))
            output = self.logdir("infer")
            rc, seconds, text = self.run("infer", [self.python, "infer.py", "--checkpoint", self.checkpoint(),
                                                   "--input", listing, "--output", output, "--overwrite",
                                                   "--workers", str(self.workers), "--device", self.device], limit)
            jsonl = os.path.join(output, "predictions.jsonl")
            lines = sum(1 for _ in open(jsonl)) if os.path.exists(jsonl) else 0
            problem = None if lines == len(images) else f"{lines} lines in predictions.jsonl for {len(images)} images"
            self.finish(row, rc, seconds, text, problem)
            if row.status == "PASS":
                row.note = f"{lines} masks"
        return self.row("infer", fn, needs="train-fp32")

    def export_row(self, fmt):
        name = f"export-{fmt}"

        def fn(row, limit):
            if fmt == "onnx":
                missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
                if missing:
                    row.note = f"skip: {', '.join(missing)} not installed (pip install {' '.join(missing)})"
                    return
            path = os.path.join(self.logdir(name), "model." + ("pt" if fmt == "torchscript" else "onnx"))
            rc, seconds, text = self.run(name, [self.python, "infer.py", "--checkpoint", self.checkpoint(),
                                                "--export", fmt, "--export_path", path, "--device", self.device], limit)
            self.finish(row, rc, seconds, text, None if os.path.exists(path) else f"{path} was not written")
            if row.status == "PASS":
                m = re.search(r"(dynamic [^;]*|fixed [^;]*); (max abs difference from PyTorch \S+)", text)
                row.note = f"{m.group(1)}; {m.group(2)}" if m else ""
        return self.row(name, fn, needs="train-fp32")

    def nccl_rule_row(self):
        def fn(row, limit):
            rc, seconds, text = self.run("nccl-cpu-tensor-rule", [self.python, "-c", NCCL_RULE], limit)
            results = re.findall(r"^RESULT (.*)$", text, re.M)
            cuda_ok = any(r.startswith("cuda tensor: worked") for r in results)
            self.finish(row, rc, seconds, text, None if cuda_ok else "the CUDA tensor's all_reduce did not work")
            if row.status == "PASS":
                row.note = short("; ".join(results), 300)
        return self.row("nccl-cpu-tensor-rule", fn, gpu_only="NCCL needs CUDA")

    def step_overhead_row(self, model):
        """benchmarks/step_overhead.py: the suite's training loop against a bare loop on the GPU, where its host
        syncs cost (on a CPU they do not; the CPU figures are in the README)."""
        name = "step-overhead" + ("-tiny" if model == "tiny" else "")

        def fn(row, limit):
            rc, seconds, text = self.run(name, [self.python, "benchmarks/step_overhead.py", "--model", model,
                                                "--pairs", "4"], limit)
            m = re.search(r"suite (\S+ ms/step), bare (\S+ ms/step), ratio (\S+ \(range [^)]*\))", text)
            self.finish(row, rc, seconds, text, None if m else "no ratio line in its output")
            if row.status == "PASS":
                row.note = f"suite {m.group(1)}, bare {m.group(2)}, ratio {m.group(3)}"
        return self.row(name, fn, gpu_only="the CPU figures are benchmarks/step_overhead.py's, in the README")

    def main(self):
        self.probe()
        os.makedirs(self.out, exist_ok=True)
        print("\n".join(self.header), flush=True)
        self.deadline = time.monotonic() + self.budget
        gpu = self.gpu_mode
        backend = "(backend nccl)" if gpu else "(backend gloo)"
        try:
            self.train("train-fp32", expect=["; float32"])
            self.test_row()
            self.infer_row()
            self.export_row("torchscript")
            self.export_row("onnx")
            amp = "autocast bfloat16" if self.bf16 else "--amp: running in float32"
            self.train("train-amp-bf16", ["--amp"], expect=[amp])
            self.train("train-amp-fp16", ["--amp", "--amp_dtype", "float16"],
                       expect=["autocast float16 with a GradScaler"], gpu_only="float16 autocast needs CUDA")
            self.train("train-channels-last", ["--channels_last"])
            self.train("classify-amp-channels-last", ["--task", "classification", "--model_type", "resnet", "--layers",
                                                      "50", "--image_size", "64", "--amp", "--channels_last"],
                       expect=["classification data", amp], base=self.cls_flags)
            self.nccl_rule_row()
            self.train("ddp-1proc", nproc=1, expect=[backend])
            if gpu and self.gpus < 2:
                self.rows.append(Row("ddp-2proc", note=f"{self.gpus} GPU visible; needs 2"))
                self.write_markdown()
            else:
                self.train("ddp-2proc", nproc=2, expect=[backend], gpu_only="2 GPU processes with NCCL")
            self.step_overhead_row("default")
            self.step_overhead_row("tiny")
            self.dali_rows()
            if gpu or self.cpu_compile:
                self.train("train-compile", ["--compile"], steps=self.compile_steps, timeout=self.compile_timeout)
            else:
                self.row("train-compile", None, gpu_only="inductor builds C++ slowly (GPU_CHECK_CPU_COMPILE=1 runs it)")
        except KeyboardInterrupt:
            print("\n" + self.table(markdown=False), flush=True)
            return 130
        failed = [r.name for r in self.rows if r.status == "FAIL"]
        print("\n" + self.table(markdown=False))
        print(f"\n{len(self.rows) - len(failed)} of {len(self.rows)} rows did not fail"
              + (f"; FAILED: {', '.join(failed)}" if failed else "")
              + f". Table: {os.path.join(self.out, 'gpu_check.md')}; logs: {self.out}/<row>.log", flush=True)
        return 1 if failed else 0


def interrupt(signum, frame):
    """SIGTERM/SIGHUP (e.g. an outer `timeout`) end the check like Ctrl-C: the running row's process group is
    killed (it lives in its own session, so a signal to this script's group would not reach it) and the table
    so far is written."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    sys.exit(Check().main())
