"""The machinery of tools/gpu_check.py: its settings (environment variables), the probe of the machine, running
one row's command in its own process group with a time limit, and the PASS/FAIL/SKIP table (stdout and
$OUT/gpu_check.md). gpu_check.py's Check adds the rows themselves."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

from gpu_check_logs import error_line, fmt, short
from gpu_check_procs import kill_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


class Runner:
    """Settings, probe, running rows and the report; subclassed by gpu_check.Check, which has the rows."""

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
        self.bf16 = None  # set by probe(): whether --amp runs bfloat16 on the checked device
        self.header = []
        self.rows = []
        self.commands = {}
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
            if ROOT not in sys.path:
                sys.path.insert(0, ROOT)
            from engine.recipe import native_bf16
            # What train.py's --amp runs on the checked device: the amp rows expect exactly that.
            self.bf16 = native_bf16("cuda:0" if self.gpu_mode and cuda else "cpu")
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
        self.header.append(f"--amp runs {'autocast bfloat16' if self.bf16 else 'float32 (no native bfloat16 here)'}")
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
