"""tools/make_distance_maps.py end to end: writes, skips what exists, rewrites with --overwrite, and stops with one
line on bad input."""
import importlib.util
import os
import re

import cv2
import numpy as np
import pytest

from conftest import ROOT, run
from data.readers import read_label, save_palette_png
from data.distance_maps import distance_maps

TOOL = os.path.join("tools", "make_distance_maps.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("make_distance_maps", os.path.join(ROOT, TOOL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path):
    """Three 6x8 scribble labels with pseudo labels; non-square, so a transposed map would show."""
    rng = np.random.default_rng(0)
    for sub in ("scribble", "pseudo"):
        os.makedirs(tmp_path / sub)
    for i in range(3):
        scribble = np.full((6, 8), 255, np.uint8)
        scribble[rng.integers(0, 6, 3), rng.integers(0, 8, 3)] = rng.integers(0, 3, 3)
        pseudo = np.zeros((6, 8), np.uint8)
        pseudo[:, 4 + i:] = 1
        save_palette_png(str(tmp_path / "scribble" / f"im{i}.png"), scribble)
        save_palette_png(str(tmp_path / "pseudo" / f"im{i}.png"), pseudo)
    return tmp_path


def outputs(root):
    return sorted(os.path.join(sub, n) for sub in ("distancemap_s", "distancemap_c")
                  for n in os.listdir(os.path.join(root, sub)))


def test_writes_the_maps_of_every_scribble_then_skips_them(folder, capsys):
    proc = run([TOOL, "--dataset_path", str(folder), "--lambda_s", "400", "--lambda_c", "900", "--workers", "2"])
    assert "distance maps: 3 written, 0 skipped" in proc.stdout
    assert outputs(folder) == [f"{sub}/im{i}.png" for sub in ("distancemap_c", "distancemap_s") for i in range(3)]
    for i in range(3):
        expected = distance_maps(read_label(str(folder / "scribble" / f"im{i}.png")),
                                 read_label(str(folder / "pseudo" / f"im{i}.png")), 400, 900)
        for sub, want in zip(("distancemap_s", "distancemap_c"), expected):
            got = cv2.imread(str(folder / sub / f"im{i}.png"), cv2.IMREAD_UNCHANGED)
            assert got.dtype == np.uint8 and got.shape == (6, 8) and (got == want).all()

    tool = load_tool()
    kept = folder / "distancemap_s" / "im1.png"
    os.utime(kept, (1, 1))
    assert tool.main(["--dataset_path", str(folder), "--lambda_s", "400", "--lambda_c", "900"]) == 0
    assert "0 written, 3 skipped" in capsys.readouterr().out and os.path.getmtime(kept) == 1

    assert tool.main(["--dataset_path", str(folder), "--overwrite", "--lambda_s", "1", "--workers", "1"]) == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out and os.path.getmtime(kept) != 1
    assert cv2.imread(str(kept), cv2.IMREAD_UNCHANGED).min() > 200  # lambda_s 1: slow fall-off
    assert len(outputs(folder)) == 6  # no temporary files left behind


def test_a_missing_pseudo_label_stops_with_one_line(folder):
    os.remove(folder / "pseudo" / "im1.png")
    proc = run([TOOL, "--dataset_path", str(folder)], check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: '{folder / 'pseudo' / 'im1.png'}' does not exist; expected a pseudo label PNG for image id 'im1'"]
    assert not os.path.exists(folder / "distancemap_s")  # checked before anything is written


def test_list_and_bad_inputs(folder, capsys):
    tool = load_tool()
    with open(folder / "some.txt", "w") as f:
        f.write("im2 extra\nim0\n")
    assert tool.main(["--dataset_path", str(folder), "--list", "some.txt", "--pseudo_path", "pseudo"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert outputs(folder) == [f"{sub}/im{i}.png" for sub in ("distancemap_c", "distancemap_s") for i in (0, 2)]

    save_palette_png(str(folder / "pseudo" / "im0.png"), np.zeros((8, 6), np.uint8))
    for argv, message in (
            (["--overwrite"], "'.*im0.png' is 8x6 but '.*im0.png' is 6x8; expected a scribble and its pseudo label"),
            (["--pesudo_path", "cams"], "--pesudo_path folder '.*cams' does not exist"),
            (["--list", "nothing.txt"], "--list 'nothing.txt' does not exist"),
            (["--lambda_s", "-4"], "--lambda_s -4.0 is not valid")):
        assert tool.main(["--dataset_path", str(folder), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(message, err[0]), err[0]
