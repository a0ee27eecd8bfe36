"""What the up-front image check already passed, per file, so that a restart re-checks only what changed.

The record lives in the data cache (--data_cache), one text file per data root. Each line is
`<level>\t<size>\t<mtime_ns>\t<relative path>`, level `h` (the header was read) or `f` (the image was decoded).
A file counts as checked when its current size and mtime_ns match a line at its level or better (a decode
covers a header). Anything that
is missing, unreadable, from another version or mangled is simply not a match, so a bad record costs a re-check
and never stops a run.
"""
import hashlib
import os

from utils import replacing

HEADER = "ailab image check v1"
TAGS = {"header": "h", "full": "f"}


def cache_file(cache_dir, root):
    """The record of the data root `root` inside `cache_dir`."""
    key = hashlib.sha256(os.path.abspath(root).encode("utf-8")).hexdigest()[:24]
    return os.path.join(cache_dir, "image_check", f"{key}.txt")


def file_key(size, mtime_ns, rel):
    return f"{size}\t{mtime_ns}\t{rel}"


_last_read = (None, None, frozenset())  # (path, (size, mtime_ns), lines): train and val read the same record


def read_record(path):
    """The set of lines `<tag>\t<key>` of the files that passed; empty when there is no usable record at `path`."""
    global _last_read
    try:
        st = os.stat(path)
        if _last_read[:2] == (path, (st.st_size, st.st_mtime_ns)):
            return _last_read[2]
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, ValueError):
        return frozenset()
    record = frozenset(lines[1:]) if lines[0] == HEADER else frozenset()
    _last_read = (path, (st.st_size, st.st_mtime_ns), record)
    return record


def write_record(path, record, current):
    """Write `record` updated with `current` (lines of the files just checked or confirmed); lines of the same
    relative paths with another size or mtime are dropped. Returns False (and changes nothing) when the file
    cannot be written: the next start then checks again."""
    rels = {line.split("\t", 3)[-1] for line in current}
    kept = [line for line in record if line.count("\t") == 3 and line[:2] in ("h\t", "f\t")
            and line.split("\t", 3)[3] not in rels]
    text = "\n".join([HEADER, *sorted(kept), *current]) + "\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        return False
    return True
