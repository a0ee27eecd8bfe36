"""Processes of gpu_check rows: a free port, and stopping a row with every process it started."""
import os
import signal
import socket
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in sessions of their own, out of reach of killpg)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_group(proc):
    """SIGTERM the row's process group and every descendant, give them 15 s, then SIGKILL what is left."""
    tree = descendants(proc.pid) if os.path.isdir("/proc") else []
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
        for target in [("group", proc.pid)] + [("pid", p) for p in tree]:
            try:
                (os.killpg if target[0] == "group" else os.kill)(target[1], sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or any(alive(p) for p in tree)):
            time.sleep(0.2)
    proc.wait()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
