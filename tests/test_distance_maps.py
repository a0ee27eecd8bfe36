"""tools/make_distance_maps.py end to end: writes, skips what exists, rewrites with --overwrite, and stops with one
line on bad input."""
import math
import os
import re

import cv2
import numpy as np
import pytest

from conftest import load_script, run
from data.readers import read_label, save_palette_png
from data.distance_maps import distance_maps

TOOL = os.path.join("tools", "make_distance_maps.py")


def load_tool():
    return load_script(TOOL)


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


def test_the_tool_writes_paper_maps_with_their_default_lambdas(folder, capsys):
    from data.distance_maps import PAPER_LAMBDA_C, PAPER_LAMBDA_S, paper_distance_maps
    tool = load_tool()
    assert tool.main(["--dataset_path", str(folder), "--map_style", "paper", "--workers", "1"]) == 0
    assert "paper maps, lambda_s=2.71828, lambda_c=403.429" in capsys.readouterr().out
    for i in range(3):
        expected = paper_distance_maps(read_label(str(folder / "scribble" / f"im{i}.png")),
                                       read_label(str(folder / "pseudo" / f"im{i}.png")), PAPER_LAMBDA_S,
                                       PAPER_LAMBDA_C)
        for sub, want in zip(("distancemap_s", "distancemap_c"), expected):
            assert (cv2.imread(str(folder / sub / f"im{i}.png"), cv2.IMREAD_UNCHANGED) == want).all()


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


# ----------------------------------------------------------------------------------------------
# --map_style paper: the method's code's definitions, checked on hand-made labels with hand-computed values

def test_paper_maps_on_a_hand_made_label():
    from data.distance_maps import paper_distance_maps
    # A 10 x 25 image: its longer side is 25, so a lambda of 1/400 at VOC scale is 1/400 * (500/25)^2 = 1 here, and
    # the maps are 255 - trunc(min(255, d)) and trunc(min(255, d)) in plain pixels.
    scribble = np.full((10, 25), 255, np.uint8)
    scribble[2, 3] = 1          # the one foreground stroke pixel
    scribble[9, 24] = 0         # a background stroke: not a source
    pseudo = np.zeros((10, 25), np.uint8)
    pseudo[2:8, 10:15] = 2      # an object ...
    pseudo[2:8, 15:18] = 3      # ... touching an object of another class: no contour between them
    pseudo[4:6, 11:13] = 255    # uncertain inside the object: background for the contour, so a hole
    pseudo[0:3, 22:25] = 1      # an object in the corner: its pixels along the image border are contour
    dist_s, dist_c = paper_distance_maps(scribble, pseudo, lambda_s=1 / 400, lambda_c=1 / 400)

    # By hand: the contour is every foreground pixel with a 4-neighbour outside the foreground or the image.
    fg = np.pad((pseudo != 0) & (pseudo != 255), 1)
    inner = fg[1:-1, 1:-1] & fg[:-2, 1:-1] & fg[2:, 1:-1] & fg[1:-1, :-2] & fg[1:-1, 2:]
    contour = [(y, x) for y in range(10) for x in range(25) if fg[y + 1, x + 1] and not inner[y, x]]
    assert (4, 15) not in contour and (4, 14) not in contour and (4, 11) not in contour and (1, 23) not in contour
    assert {(3, 11), (4, 13), (0, 24), (2, 22)} <= set(contour)
    for y in range(10):
        for x in range(25):
            d_c = min(math.hypot(y - cy, x - cx) for cy, cx in contour)
            assert dist_c[y, x] == math.floor(min(255, d_c)), (y, x)
            assert dist_s[y, x] == 255 - math.floor(min(255, math.hypot(y - 2, x - 3))), (y, x)
    assert dist_s[0, 0] == 252  # d = sqrt(13) = 3.61, truncated as the code does (rounding would give 251)
    assert dist_c[4, 15] == 2   # the class 2 | class 3 edge: 2 px from the nearest contour, not 0


def test_paper_maps_scale_lambda_with_the_image_and_have_limits():
    from data.distance_maps import paper_distance_maps
    scribble = np.full((50, 100), 255, np.uint8)
    scribble[25, 50] = 1
    small, _ = paper_distance_maps(scribble, np.zeros((50, 100), np.uint8), lambda_s=1.0, lambda_c=1.0)
    large = np.full((100, 200), 255, np.uint8)
    large[50, 100] = 1
    big, _ = paper_distance_maps(large, np.zeros((100, 200), np.uint8), lambda_s=1.0, lambda_c=1.0)
    assert small[25, 60] == 255 - 50 and big[50, 120] == 255 - 50  # 10 px at 100 wide = 20 px at 200 wide
    background_only = np.where(scribble == 1, 0, 255).astype(np.uint8)
    no_s, no_c = paper_distance_maps(background_only, np.zeros((50, 100), np.uint8))
    assert not no_s.any() and (no_c == 255).all()  # no foreground stroke, no foreground contour
