"""The built-in "MNIST quick test" data: scikit-learn's bundled UCI handwritten digits (1,797 images of 8x8
pixels, values 0..16, 10 classes), written once as an ImageFolder tree of greyscale PNGs. Nothing is downloaded.

Layout: root/<digit>/<index:04d>.png plus root/manifest.json. Bump DIGITS_VERSION when the written images change.
"""
import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from utils import UserError, first_line

DIGITS_VERSION = 1
DIGITS_SIZE = 32
DIGITS_COUNT = 1797
DIGITS_CLASSES = tuple(str(d) for d in range(10))
DIGITS_SOURCE = "UCI optical handwritten digits, as bundled with scikit-learn (sklearn.datasets.load_digits)"
MISSING_SKLEARN = ("the built-in digits need scikit-learn, which requirements.txt lists: pip install scikit-learn "
                   "(or pass --dataset_path to your own images)")


def _check_size(size):
    """The output side in pixels: a whole number >= 8 (the source is 8x8 and is only enlarged)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise UserError(f"digits size {size!r} is not valid; expected a whole number of pixels >= 8")
    return int(size)


def _load_digits():
    """(images float 0..16 Nx8x8, targets N) from scikit-learn, imported here so it stays optional."""
    try:
        from sklearn import datasets
    except ImportError:
        raise UserError(MISSING_SKLEARN) from None
    bunch = datasets.load_digits()
    return bunch.images, bunch.target


def _manifest(size):
    """What a complete tree of this version and size records in manifest.json."""
    return {"version": DIGITS_VERSION, "size": size, "classes": list(DIGITS_CLASSES), "images": DIGITS_COUNT,
            "source": DIGITS_SOURCE}


def make_digits(root, size=DIGITS_SIZE):
    """Write the digits as root/<digit>/<index:04d>.png, greyscale uint8 (value * 255 / 16, rounded half up),
    enlarged to size x size with INTER_LINEAR; manifest.json last. Deterministic, byte for byte."""
    size = _check_size(size)
    images, targets = _load_digits()
    if len(images) != DIGITS_COUNT:
        raise UserError(f"scikit-learn's digits have {len(images)} images; expected {DIGITS_COUNT}")
    try:
        for digit in DIGITS_CLASSES:
            os.makedirs(os.path.join(root, digit), exist_ok=True)
        for index, (image, target) in enumerate(zip(images, targets)):
            grey = np.floor(image * 255.0 / 16.0 + 0.5).astype(np.uint8)
            grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_LINEAR)
            path = os.path.join(root, str(int(target)), f"{index:04d}.png")
            if not cv2.imwrite(path, grey):
                raise OSError(f"cv2.imwrite failed for {path}")
        with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(_manifest(size), f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write the built-in digits to '{root}' ({first_line(e)}); expected a writable "
                        f"folder with a few MB free") from None
    return root


def is_complete(root, size=DIGITS_SIZE):
    """True when `root` holds a finished tree of this version and size: the manifest matches and every PNG is there."""
    try:
        with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        count = sum(1 for digit in DIGITS_CLASSES for name in os.listdir(os.path.join(root, digit))
                    if name.endswith(".png"))
    except (OSError, ValueError):
        return False
    return manifest == _manifest(size) and count == DIGITS_COUNT


def _discard(folder, cache_dir):
    """Move `folder` out of the way under a unique name, then delete it (another process may have done it first)."""
    trash = tempfile.mkdtemp(prefix=".digits-trash-", dir=cache_dir)
    try:
        os.rename(folder, os.path.join(trash, "old"))
    except OSError:  # gone already, or not movable: the rename into place will then report it
        pass
    shutil.rmtree(trash, ignore_errors=True)


def ensure_digits(cache_dir, size=DIGITS_SIZE):
    """The root of a complete digits tree under `cache_dir`, building it first when needed.

    The tree is built in a temporary sibling folder and renamed into place, so a crash never leaves a partial
    tree under the final name. When several processes build at once, the first rename wins and the others
    discard their copy (all copies are byte-identical)."""
    size = _check_size(size)
    root = os.path.join(cache_dir, f"digits-v{DIGITS_VERSION}-{size}px")
    if is_complete(root, size):
        return root
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-tmp-", dir=cache_dir)
    except OSError as e:
        raise UserError(f"cannot create the data cache '{cache_dir}' ({first_line(e)}); expected a writable "
                        f"folder (set --data_cache or AILAB_DATA)") from None
    try:
        make_digits(tmp, size)
        if os.path.lexists(root) and not is_complete(root, size):
            _discard(root, cache_dir)  # an old, damaged tree: the rename below needs the name free
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_complete(root, size):  # not "another process won": a real failure
                raise UserError(f"cannot move the built-in digits into '{root}'; expected a writable cache folder "
                                f"(delete '{root}' and retry)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
