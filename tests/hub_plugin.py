"""Test-only plugin: torch's hub downloads without the network. Each download is recorded in the file that
AILAB_DOWNLOAD_LOG names; it copies the file AILAB_FAKE_SERVER names (a stand-in for the server) to the destination,
or, without it, fails as on a machine without network. Used with --plugin tests/hub_plugin.py."""
import os
import shutil
import time
import urllib.error

import torch.hub


def download(url, dst, *args, **kwargs):
    with open(os.environ["AILAB_DOWNLOAD_LOG"], "a") as log:
        log.write(url + "\n")
    source = os.environ.get("AILAB_FAKE_SERVER")
    if not source:
        raise urllib.error.URLError(f"no network for {url} (tests/hub_plugin.py)")
    time.sleep(3)  # a download takes a while: processes that do not wait for it would start their own
    shutil.copyfile(source, dst + ".partial")  # torch's own download also renames a finished temporary file
    os.replace(dst + ".partial", dst)


torch.hub.download_url_to_file = download
