"""What the up-front image check already passed, per file, so that a restart re-checks only what changed.

The record lives in the data cache (--data_cache), one text file per data root. Each line is
`<level>\t<size>\t<mtime_ns>\t<relative path>`, level `h` (the header was read) or `f` (the image was decoded).
A file counts as checked when its current size and mtime_ns match a line at its level or better. Anything that
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


def read_record(path):
    """{key: level tag} of the files that passed; {} when there is no usable record at `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if lines[0] != HEADER:
        return {}
    record = {}
    for line in lines[1:]:
        tag, _, key = line.partition("\t")
        if tag in ("h", "f") and key.count("\t") >= 2 and record.get(key) != "f":
            record[key] = tag
    return record


def passed(record, key, level):
    """True when `record` says the file behind `key` passed a check at `level` (a decode also covers a header)."""
    tag = record.get(key)
    return tag == "f" or (tag == "h" and level == "header")


def write_record(path, record, current):
    """Write `record` updated with `current` ({key: tag} of the files just checked or confirmed); lines of the
    same relative paths with another size or mtime are dropped. Returns False (and changes nothing) when the
    file cannot be written: the next start then checks again."""
    rels = {key.split("\t", 2)[2] for key in current}
    kept = {key: tag for key, tag in record.items() if key.split("\t", 2)[2] not in rels}
    kept.update(current)
    text = "\n".join([HEADER, *(f"{tag}\t{key}" for key, tag in kept.items())]) + "\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        return False
    return True
