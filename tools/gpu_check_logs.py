"""Reading what a gpu_check row left behind: its log, events.jsonl and the recorded collectives."""
import json
import os
import re


def short(text, n=220):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def error_line(text):
    """The line that says why a run failed: the suite's one-line 'error: ...', else the last exception line,
    else the last non-empty line (torchrun's ChildFailedError box is never the reason)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    lines = [l for l in lines if "ChildFailedError" not in l and not l.startswith("$ ") and not set(l) <= set("=-_*")]
    for pattern in (r"(^|\] )error: ", r"\b[A-Za-z_.]*(Error|Exception)\b(:|$)", r"Traceback|FAILED|Killed"):
        hits = [l for l in lines if re.search(pattern, l)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "(no output)"


def parse_train_log(text):
    """(mean img/s, peak GPU MiB) from train.py's log: the 'done in' line, else the last epoch line."""
    rate = gpu = None
    done = [l for l in text.splitlines() if re.search(r"\bdone in \d+ s:", l)]
    if done:
        m = re.search(r"; mean ([\d.]+) img/s", done[-1])
        rate = float(m.group(1)) if m else None
        m = re.search(r", (\d+) MiB GPU", done[-1])
        gpu = float(m.group(1)) if m else None
    if rate is None:
        epochs = re.findall(r"epoch \d+/\d+: train loss .*?, ([\d.]+) img/s", text)
        rate = float(epochs[-1]) if epochs else None
    return rate, gpu


def steady_rate(events_path, images_per_step):
    """img/s from the event times of the second half of the logged steps (needs --log_interval 1), so the first
    steps (cudnn autotuning, torch.compile) do not count. None with fewer than 2 logged steps."""
    steps = []
    try:
        with open(events_path) as f:
            for line in f:
                record = json.loads(line)
                if "train/images_per_s" in record:
                    steps.append((record["step"], record["time"]))
    except (OSError, ValueError):
        return None
    if len(steps) < 2:
        return None
    (first_step, t0), (last_step, t1) = steps[(len(steps) - 1) // 2], steps[-1]
    return (last_step - first_step) * images_per_step / (t1 - t0) if t1 > t0 else None


def last_data_wait(events_path):
    try:
        with open(events_path) as f:
            records = [json.loads(l) for l in f if l.strip()]
        return next(r["train/data_wait"] for r in reversed(records) if "train/data_wait" in r)
    except (OSError, ValueError, StopIteration):
        return None


def misplaced_collectives(folder):
    """None, or the first collective (recorded by tests/collective_probe.py) that was not called from
    distributed.py or got a tensor off the device its backend needs (NCCL: cuda:LOCAL_RANK; gloo: cpu)."""
    records = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            records += [json.loads(line) for line in f]
    if not records:
        return "no collective was recorded"
    for r in records:
        need = f"cuda:{r['local_rank']}" if r["backend"] == "nccl" else "cpu"
        if r["caller"] != "core/distributed.py" or any(d != need for d in r["devices"]):
            return f"collective {r['op']} from {r['caller']} on {r['devices']} under {r['backend']} (expected {need})"
    return None


def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"
