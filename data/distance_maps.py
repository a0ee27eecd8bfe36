"""Distance maps of scribble supervision: weights near scribbles (dist_s) and far from pseudo-label boundaries
(dist_c), computed once per image (tools/make_distance_maps.py, the built-in data) and read as uint8 PNGs."""
import math

import cv2
import numpy as np

from data.readers import IGNORE_INDEX
from utils import UserError

# Distance maps fall off linearly with the Euclidean pixel distance d, at sqrt(lambda) grey levels per pixel:
# dist_s reaches 0 at d = 255 / sqrt(lambda_s) from the nearest scribble and dist_c reaches 255 at
# d = 255 / sqrt(lambda_c) from the nearest pseudo-label boundary. The defaults suit the built-in data (64-160 px,
# 128 by default): dist_s fades out 32 px from a scribble (a quarter of a 128 px side, at least the half-width of
# its objects, so a scribbled object is covered), and dist_c is full 16 px from a boundary (well past the
# few pixels by which its pseudo labels are wrong). Both distances scale with the image, so lambda scales with
# 1/side^2: for PASCAL VOC (~500x375) use --lambda_s 4 (fades out at 128 px) and --lambda_c 16 (full at 64 px).
DEFAULT_LAMBDA_S = 64.0
DEFAULT_LAMBDA_C = 256.0
VOC_LAMBDA_S = 4.0
VOC_LAMBDA_C = 16.0
# Where the maps live under --dataset_path by default (the flag defaults; the built-in data is written this way).
DEFAULT_FOLDERS = {"train_path": "scribble", "pesudo_path": "pseudo", "distancemap_s": "distancemap_s",
                   "distancemap_c": "distancemap_c"}
# The method's code (--map_style paper) gives lambda at PASCAL VOC's scale, e and e^6 (images up to 500 px), and
# truncates. For an image whose longer side is L, lambda becomes lambda_voc * (500 / L)^2: the maps then fall off
# over the same fraction of the image as on VOC.
PAPER_LAMBDA_S = math.e
PAPER_LAMBDA_C = math.e ** 6
VOC_SIDE = 500

def _check_lambda(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"--{name} {value!r} is not valid; expected a finite number >= 0")
    return math.sqrt(value)


def _distance_to(sources):
    """Euclidean distance of every pixel to the nearest True pixel of `sources` (which must have one)."""
    return cv2.distanceTransform((~sources).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def pseudo_boundary(pseudo):
    """Boolean HxW: pixels with a 4-neighbour of another pseudo label, and every IGNORE_INDEX pixel.

    Ignore regions count as boundary because a pseudo label is uncertain there: dist_c is then 0 on them and grows
    only with the distance from both class edges and uncertain regions. The image border is not a boundary.
    """
    edge = pseudo == IGNORE_INDEX
    vertical = pseudo[1:, :] != pseudo[:-1, :]
    horizontal = pseudo[:, 1:] != pseudo[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def foreground_contour(pseudo):
    """Boolean HxW: the 1-px contours (outer ones and holes, drawn as cv2.findContours traces them) of the pseudo
    label's foreground, i.e. of the pixels that are neither background 0 nor IGNORE_INDEX. An edge between two
    classes is not a contour; an object's edge along the image border is."""
    foreground = (((pseudo != 0) & (pseudo != IGNORE_INDEX)) * 255).astype(np.uint8)
    contours, _ = cv2.findContours(foreground, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    drawn = np.zeros_like(foreground)
    cv2.drawContours(drawn, contours, -1, 255, 1)
    return drawn > 0


def paper_distance_maps(scribble, pseudo, lambda_s=PAPER_LAMBDA_S, lambda_c=PAPER_LAMBDA_C):
    """(dist_s, dist_c) as the method's code defines them, uint8 HxW; lambda_s and lambda_c are at VOC's scale.

    dist_s = 255 - trunc(min(255, sqrt(ls) d)), d the distance to the nearest foreground scribble pixel (not 0,
    not 255: background strokes are no source); dist_c = trunc(min(255, sqrt(lc) d)), d the distance to
    foreground_contour(pseudo). ls, lc: the lambdas rescaled to the image, lambda * (VOC_SIDE / longer side)^2.
    No source gives the formulas' limits: dist_s 0 and dist_c 255 everywhere.
    """
    scribble, pseudo = _check_pair(scribble, pseudo)
    scale = VOC_SIDE / max(scribble.shape)
    root_s = _check_lambda("lambda_s", lambda_s) * scale
    root_c = _check_lambda("lambda_c", lambda_c) * scale
    sources = (scribble != 0) & (scribble != IGNORE_INDEX)
    dist_s = (255 - np.floor(np.minimum(255.0, root_s * _distance_to(sources))) if sources.any()
              else np.zeros(scribble.shape))
    contour = foreground_contour(pseudo)
    dist_c = (np.floor(np.minimum(255.0, root_c * _distance_to(contour))) if contour.any()
              else np.full(pseudo.shape, 255.0))
    return dist_s.astype(np.uint8), dist_c.astype(np.uint8)


def _check_pair(scribble, pseudo):
    scribble, pseudo = np.asarray(scribble), np.asarray(pseudo)
    if scribble.ndim != 2 or scribble.shape != pseudo.shape:
        raise UserError(f"distance maps: scribble {scribble.shape} and pseudo label {pseudo.shape} must be HxW "
                        "arrays of the same size")
    return scribble, pseudo


def distance_maps(scribble, pseudo, lambda_s=DEFAULT_LAMBDA_S, lambda_c=DEFAULT_LAMBDA_C):
    """(dist_s, dist_c), uint8 HxW, from an HxW scribble label and pseudo label (IGNORE_INDEX = none/uncertain).

    dist_s = 255 - min(255, sqrt(lambda_s) d), d the distance to the nearest scribble pixel (any label != 255);
    dist_c = min(255, sqrt(lambda_c) d), d the distance to the nearest pseudo_boundary() pixel.
    Values are rounded to the nearest integer. The edge cases are the limits of the formulas for d -> infinity:
    no scribble pixel at all gives dist_s = 0 everywhere (no weight), and a pseudo label without any boundary
    (one label everywhere, no ignore) gives dist_c = 255 everywhere. An all-ignore pseudo label gives dist_c = 0.
    """
    scribble, pseudo = _check_pair(scribble, pseudo)
    root_s, root_c = _check_lambda("lambda_s", lambda_s), _check_lambda("lambda_c", lambda_c)
    labelled = scribble != IGNORE_INDEX
    if labelled.any():
        dist_s = 255 - np.rint(np.minimum(255.0, root_s * _distance_to(labelled)))
    else:
        dist_s = np.zeros(scribble.shape)
    boundary = pseudo_boundary(pseudo)
    if boundary.any():
        dist_c = np.rint(np.minimum(255.0, root_c * _distance_to(boundary)))
    else:
        dist_c = np.full(pseudo.shape, 255.0)
    return dist_s.astype(np.uint8), dist_c.astype(np.uint8)


MAP_STYLES = {"suite": (distance_maps, DEFAULT_LAMBDA_S, DEFAULT_LAMBDA_C),
              "paper": (paper_distance_maps, PAPER_LAMBDA_S, PAPER_LAMBDA_C)}
