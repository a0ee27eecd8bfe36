"""Test-only plugin: every image header the up-front check reads is recorded, with the reading process's rank, in
the file AILAB_CHECK_LOG names. Used with --plugin tests/count_checks_plugin.py."""
import os

from data import folder

_read_header = folder._header_problem


def counted(path):
    with open(os.environ["AILAB_CHECK_LOG"], "a") as log:
        log.write(f"{os.environ.get('RANK', '0')} {path}\n")
    return _read_header(path)


folder._header_problem = counted
