"""What the up-front image check already passed, so that a restart re-reads only what changed.

The record lives in the data cache (--data_cache), one text file per data root. It knows
- each file that passed: its relative path, level (`h`: its header was read; `f`: it was decoded, which covers a
  header), size and mtime_ns;
- each folder whose listed files all passed, with its mtime_ns then.

A restart trusts a file without touching it when its folder's mtime is the recorded one (no file was added,
removed or renamed in it since) and the file passed at the level asked for or better: one `stat` per folder, not
per file, which keeps a restart near the cost of listing the folders. In a folder that changed, each file is
trusted only when its own size and mtime match. A file rewritten in place under the same name leaves its folder's
mtime alone and is not re-read at the start; if it has become unreadable, training skips it and counts it
(data/unreadable.py). Anything missing, unreadable, from another version or mangled is simply not a match, so a
bad record costs a re-check and never stops a run.

The file is sections of plain lines, so that reading it is a split and a slice, not a parse per file:
`folders N` then N lines `<level>\t<mtime_ns>\t<folder>`; for each level `names <level> N` then N relative paths,
and `stats <level> N` then N lines `<size>\t<mtime_ns>` in the same order.
"""
import hashlib
import os

from utils import replacing

HEADER = "ailab image check v2"
TAGS = {"header": "h", "full": "f"}
ACCEPTS = {"header": ("h", "f"), "full": ("f",)}  # the levels whose entries vouch for a check at this level


def cache_file(cache_dir, root):
    """The record of the data root `root` inside `cache_dir`."""
    key = hashlib.sha256(os.path.abspath(root).encode("utf-8")).hexdigest()[:24]
    return os.path.join(cache_dir, "image_check", f"{key}.txt")


class Record:
    """folders {relative folder: (level tag, mtime_ns)}; names {tag: [relative path]}; stats {tag: ["size\\tmtime"]}."""

    def __init__(self, folders=None, names=None, stats=None):
        self.folders = folders or {}
        self.names, self.stats = names or {}, stats or {}
        self._entries = None

    def folder_unchanged(self, folder, mtime_ns, level):
        tag, recorded = self.folders.get(folder, ("", None))
        return mtime_ns is not None and recorded == mtime_ns and tag in ACCEPTS[level]

    def passed_names(self, level):
        """The set of relative paths that passed at `level` or better (whatever their size and mtime now)."""
        return set().union(*(self.names.get(tag, ()) for tag in ACCEPTS[level]))

    def entries(self):
        """{relative path: (tag, "size\\tmtime")}, built on first use (only a folder that changed needs it)."""
        if self._entries is None:
            self._entries = {}
            for tag in ("h", "f"):  # f last: a decode wins over a header read of the same file
                self._entries.update((rel, (tag, stat)) for rel, stat in
                                     zip(self.names.get(tag, ()), self.stats.get(tag, ())))
        return self._entries

    def matches(self, rel, size, mtime_ns, level):
        """The file's entry when it passed at `level` or better with this size and mtime, else None."""
        entry = self.entries().get(rel)
        return entry if entry and entry[0] in ACCEPTS[level] and entry[1] == f"{size}\t{mtime_ns}" else None


_last_read = (None, None, Record())  # (path, (size, mtime_ns), Record): train and val read the same record


def read_record(path):
    """The Record at `path`; an empty one when there is no usable record there."""
    global _last_read
    try:
        st = os.stat(path)
        if _last_read[:2] == (path, (st.st_size, st.st_mtime_ns)):
            return _last_read[2]
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        record = parse(lines) if lines[0] == HEADER else Record()
    except (OSError, UnicodeDecodeError, ValueError, IndexError):  # unreadable or mangled: no record
        return Record()
    _last_read = (path, (st.st_size, st.st_mtime_ns), record)
    return record


def parse(lines):
    at, record = 1, Record()

    def section(kind, tag=None):
        nonlocal at
        head = lines[at].split(" ")
        if head[0] != kind or (tag is not None and head[1] != tag):
            raise ValueError(f"expected section {kind}")
        count = int(head[-1])
        at += 1 + count
        if at > len(lines):
            raise ValueError("record cut short")
        return lines[at - count:at]

    for line in section("folders"):
        tag, mtime, folder = line.split("\t", 2)
        record.folders[folder] = (tag, int(mtime))
    for tag in ("h", "f"):
        record.names[tag], record.stats[tag] = section("names", tag), section("stats", tag)
        if len(record.names[tag]) != len(record.stats[tag]):
            raise ValueError("names and stats differ in length")
    return record


def write_record(path, record, files, folders):
    """Write `record` updated with `files` ({relative path: (tag, "size\\tmtime")} just checked or confirmed) and
    `folders` ({relative folder: (tag, mtime_ns)} whose listed files all passed). Returns False (and changes
    nothing) when the file cannot be written: the next start then checks again."""
    merged = {rel: entry for rel, entry in {**record.entries(), **files}.items() if "\n" not in rel}  # one a line
    folders = {**record.folders, **folders}
    text = [HEADER, f"folders {len(folders)}",
            *(f"{tag}\t{mtime}\t{folder}" for folder, (tag, mtime) in sorted(folders.items()))]
    for tag in ("h", "f"):
        rels = sorted(rel for rel, (t, _) in merged.items() if t == tag)
        text += [f"names {tag} {len(rels)}", *rels, f"stats {tag} {len(rels)}", *(merged[rel][1] for rel in rels)]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(text) + "\n")
    except OSError:
        return False
    return True
