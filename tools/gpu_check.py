"""The rows of tools/gpu_check.sh: run each GPU path for a few steps and report PASS/FAIL/SKIP, seconds,
images/s and peak GPU memory as a table (stdout and $OUT/gpu_check.md), each row's log in $OUT/<row>.log.

Settings come from the environment; tools/gpu_check.sh lists them. Exit code: 0 when no row failed, 1 when one
did, 2 when there is no CUDA GPU and GPU_CHECK_DEVICE=cpu is not set, 130 when interrupted.
"""
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers beside this script, however it is loaded
from gpu_check_logs import (error_line, fmt, last_data_wait, misplaced_collectives, parse_train_log,  # noqa: E402
                            short, steady_rate)
from gpu_check_procs import free_port, kill_group  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@dataclass
class Row:
    name: str
    status: str = "SKIP"
    seconds: float = None
    rate: float = None       # mean img/s of the epoch (train.log "done" line)
    steady: float = None     # img/s over the second half of the steps (events.jsonl), without warm-up/compile
    gpu_mib: float = None
    note: str = ""


def env_int(name, default):
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        sys.exit(f"gpu_check: {name}={value!r} is not an integer")


class Check:
    def __init__(self):
        self.gpu_mode = os.environ.get("GPU_CHECK_DEVICE", "").strip().lower() != "cpu"
        self.out = os.path.abspath(os.environ.get("OUT") or "/tmp/ailab-gpu-check")
        self.python = os.environ.get("PYTHON") or sys.executable
        self.steps = env_int("STEPS", 20)
        self.compile_steps = env_int("COMPILE_STEPS", 10)
        self.batchsize = env_int("BATCHSIZE", 16)
        self.crop = env_int("CROP", 128)
        self.workers = env_int("WORKERS", 4 if self.gpu_mode else 0)
        self.infer_images = env_int("INFER_IMAGES", 16)
        self.row_timeout = env_int("ROW_TIMEOUT", 150)
        self.compile_timeout = env_int("COMPILE_TIMEOUT", 300)
        self.budget = env_int("BUDGET", 540)
        model = os.environ.get("MODEL")
        self.model = shlex.split(model if model is not None else "--model_type deeplabv3p --layers 50")
        self.train_flags = shlex.split(os.environ.get("TRAIN_FLAGS", ""))
        self.cls_flags = shlex.split(os.environ.get("CLS_FLAGS", ""))
        only = os.environ.get("ROWS", "").replace(",", " ").split()
        self.only = set(only) or None
        self.cpu_compile = os.environ.get("GPU_CHECK_CPU_COMPILE", "") not in ("", "0")
        self.device = "cuda" if self.gpu_mode else "cpu"
        self.gpus = 0
        self.header = []
        self.rows = []
        self.commands = {}
        self.miou = {}  # the mIoU of each passing test row
        self.deadline = None
        self.limit = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "AILAB_COLLECTIVE_LOG": os.path.join(self.out, "collectives")}
        if not self.gpu_mode:
            self.env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    # ------------------------------------------------------------------ setup and report

    def probe(self):
        """Exit 2 (one line) without a CUDA GPU, unless CPU mode; else collect the header lines."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            cuda = torch.cuda.is_available()
            self.gpus = torch.cuda.device_count() if cuda else 0
        if self.gpu_mode and not cuda:
            print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                  f"GPU_CHECK_DEVICE=cpu runs the CPU rows instead", flush=True)
            sys.exit(2)
        if self.gpu_mode:
            smi = ""
            if shutil.which("nvidia-smi"):
                try:
                    smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
                except (OSError, subprocess.SubprocessError):
                    smi = ""
            for line in smi.strip().splitlines():
                self.header.append(f"GPU (nvidia-smi): {line.strip()}")
            for i in range(self.gpus):
                p = torch.cuda.get_device_properties(i)
                self.header.append(f"GPU {i} (torch): {p.name}, compute capability {p.major}.{p.minor}, "
                                   f"{p.total_memory / 2**20:.0f} MiB")
            try:
                nccl = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # a build without NCCL
                nccl = "none"
            self.header.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                               f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
        else:
            self.header.append(f"device: CPU (GPU_CHECK_DEVICE=cpu; CUDA available: {cuda}); GPU-only rows SKIP")
            self.header.append(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
        self.header.append(f"python {sys.version.split()[0]} ({self.python}), {os.cpu_count()} CPU cores, "
                           f"host {socket.gethostname()}")
        self.header.append(f"settings: STEPS={self.steps} COMPILE_STEPS={self.compile_steps} BATCHSIZE={self.batchsize} "
                           f"CROP={self.crop} WORKERS={self.workers} MODEL='{shlex.join(self.model)}' "
                           f"TRAIN_FLAGS='{shlex.join(self.train_flags)}' ROW_TIMEOUT={self.row_timeout} "
                           f"COMPILE_TIMEOUT={self.compile_timeout} BUDGET={self.budget} OUT={self.out}")

    def table(self, markdown):
        cols = ["row", "result", "s", "img/s", "steady img/s", "peak GPU MiB", "note"]
        cells = [[r.name, r.status, fmt(r.seconds, 1), fmt(r.rate, 1), fmt(r.steady, 1), fmt(r.gpu_mib, 0),
                  r.note] for r in self.rows]
        if markdown:
            lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
            return "\n".join(lines)
        widths = [max(len(c[i]) for c in [cols] + cells) for i in range(len(cols) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
                         for row in [cols] + cells)

    def write_markdown(self):
        text = ["# ailab GPU check", "", *[f"- {h}" for h in self.header], "",
                "img/s: mean over the training epoch (train.log); steady img/s: the second half of the steps only "
                "(events.jsonl), without warm-up and compile time. Full logs: `<row>.log` beside this file.", "",
                self.table(markdown=True), "", "## Commands", ""]
        text += [f"- `{name}`: `{cmd}`" for name, cmd in self.commands.items()]
        path = os.path.join(self.out, "gpu_check.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(text) + "\n")
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------ running

    def run(self, name, cmd, timeout):
        """Run `cmd` in its own process group with its output in $OUT/<name>.log; on timeout the whole group
        (torchrun's workers, DataLoader workers) is killed. Returns (exit code or None on timeout, seconds, output)."""
        self.commands[name] = shlex.join(cmd)
        self.limit = timeout
        log_path = os.path.join(self.out, f"{name}.log")
        started = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with open(log_path, errors="replace") as f:
                    before = f.read()  # what it was doing, not what the kill made it say
                kill_group(proc)
                rc = None
            except BaseException:
                kill_group(proc)
                raise
        seconds = time.monotonic() - started
        if rc is None:
            with open(log_path, "a") as f:
                f.write(f"\ngpu_check: killed after {timeout:.0f} s\n")
            return rc, seconds, before
        with open(log_path, errors="replace") as f:
            return rc, seconds, f.read()

    def row(self, name, fn, gpu_only=None, needs=None, timeout=None):
        """Run one row unless it is skipped; record and print it, rewrite gpu_check.md."""
        row = Row(name)
        left = self.deadline - time.monotonic()
        stale = os.path.join(self.out, f"{name}.log")  # from an earlier check; this one may skip the row
        if os.path.exists(stale):
            os.remove(stale)
        if self.only is not None and name not in self.only:
            row.note = "not in ROWS"
        elif gpu_only is not None and not self.gpu_mode:
            row.note = f"CPU mode: {gpu_only}"
        elif needs is not None and self.status(needs) != "PASS":
            row.note = f"needs a passing {needs} row"
        elif left < 10:
            row.note = f"BUDGET of {self.budget} s spent"
        else:
            print(f"... {name}", flush=True)
            try:
                fn(row, min(timeout or self.row_timeout, left))
            except Exception as e:  # a bug in a check must not lose the other rows
                row.status, row.note = "FAIL", short(f"gpu_check: {type(e).__name__}: {e}")
            except KeyboardInterrupt:
                row.status, row.note = "FAIL", "interrupted (Ctrl-C or SIGTERM); the rows after this one did not run"
                self.rows.append(row)
                self.write_markdown()
                raise
        self.rows.append(row)
        print(f"{row.status:4}  {name}" + (f"  {row.seconds:.1f} s" if row.seconds is not None else "")
              + (f"  {row.note}" if row.note else ""), flush=True)
        self.write_markdown()
        return row

    def status(self, name):
        return next((r.status for r in self.rows if r.name == name), None)

    def finish(self, row, rc, seconds, text, problem=None):
        """PASS when the command exited 0 and `problem` is None; else FAIL with the reason."""
        row.seconds = seconds
        if rc is None:
            lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("$ ")]
            row.status, row.note = "FAIL", short(f"timed out (limit {self.limit:.0f} s); last output: "
                                                 f"{lines[-1] if lines else '(none)'}")
        elif rc != 0:
            row.status, row.note = "FAIL", short(f"exit {rc}: {error_line(text)}")
        elif problem:
            row.status, row.note = "FAIL", short(problem)
        else:
            row.status = "PASS"

    # ------------------------------------------------------------------ rows

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
                row.note = "; ".join(x for x in [*[e.strip("(); ") for e in expect if "backend" in e or "autocast" in e],
                                                 f"data wait {wait:.0%}" if wait is not None else ""] if x)
        return self.row(name, fn, timeout=timeout, **kw)

    def checkpoint(self):
        return os.path.join(self.out, "runs", "train-fp32", "best.pth")

    def test_row(self, name="test", extra=(), compare=None, **kw):
        """test.py on train-fp32's checkpoint, with `extra` flags; with `compare` (a row name), its mIoU must be
        within DALI_MIOU_TOLERANCE of that row's."""
        def fn(row, limit):
            save = self.logdir(name)
            rc, seconds, text = self.run(name, [self.python, "test.py", "--checkpoint", self.checkpoint(),
                                                "--save_path", save, "--no_save_pred", "--workers", str(self.workers),
                                                "--device", self.device, *extra], limit)
            m = re.search(r"\bmIoU ([\d.]+)\s+pixel acc", text)
            n = re.search(r": (\d+) images, ", text)
            problem = None if m and os.path.exists(os.path.join(save, "metrics.json")) else "no mIoU or metrics.json"
            if problem is None and compare is not None:
                other = self.miou.get(compare)
                if other is None or abs(float(m.group(1)) - other) > DALI_MIOU_TOLERANCE:
                    problem = f"mIoU {m.group(1)} against {other} of the {compare} row (tolerance {DALI_MIOU_TOLERANCE})"
            self.finish(row, rc, seconds, text, problem)
            if row.status == "PASS":
                self.miou[name] = float(m.group(1))
                row.note = f"mIoU {m.group(1)} on {n.group(1) if n else '?'} val images" + (
                    f" ({compare}: {self.miou[compare]})" if compare else "")
        return self.row(name, fn, needs=kw.pop("needs", "train-fp32"), **kw)

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
            self.train("train-amp-bf16", ["--amp"], expect=["autocast bfloat16"])
            self.train("train-amp-fp16", ["--amp", "--amp_dtype", "float16"],
                       expect=["autocast float16 with a GradScaler"], gpu_only="float16 autocast needs CUDA")
            self.train("train-channels-last", ["--channels_last"])
            self.train("classify-amp-channels-last", ["--task", "classification", "--model_type", "resnet", "--layers",
                                                      "50", "--image_size", "64", "--amp", "--channels_last"],
                       expect=["classification data", "autocast bfloat16"], base=self.cls_flags)
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
