"""Write a classification dataset of object crops from synthetic scenes, for pretraining a backbone.

    python tools/make_object_crops.py --out data/object_crops
    python train.py --task classification --dataset_path data/object_crops --stem imagenet --image_size 64 ...

The scenes are drawn like the built-in segmentation data (same shapes, textures, clutter and noise) but from their
own random stream, so no crop comes from an image of the built-in training or validation split: the crops play the
part ImageNet plays for VOC, a separate image-level dataset. Each visible object gives one square crop around its
bounding box (with some of the scene around it, as a photo would have), labelled with its class; each scene also
gives one crop of plain background, labelled `background`. The layout is an ImageFolder tree, OUT/<class>/<id>.png.
"""
import argparse
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.synthetic import SYNTHETIC_CLASSES, _synthetic_sample  # noqa: E402

CROP_STREAM = 11        # default_rng([seed, index, CROP_STREAM]): never one of the segmentation data's streams
SCENE_SIZE = 128
MARGIN = 0.15           # the square crop extends the bounding box's longer side by this fraction on each side
MIN_PIXELS = 64         # an object with fewer visible pixels (mostly hidden behind later ones) gives no crop
BACKGROUND_TRIES = 20   # random squares tried per scene for a crop with at most BACKGROUND_OBJECT of objects
BACKGROUND_OBJECT = 0.05


def square_crop(image, x0, y0, x1, y1, size):
    """The square around box [x0, x1) x [y0, y1), widened by MARGIN, moved inside the image, resized to size."""
    side = min(int(round(max(x1 - x0, y1 - y0) * (1 + 2 * MARGIN))), image.shape[0], image.shape[1])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(np.clip(round(cx - side / 2), 0, image.shape[1] - side))
    top = int(np.clip(round(cy - side / 2), 0, image.shape[0] - side))
    crop = image[top:top + side, left:left + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def scene_crops(rng, size):
    """[(class name, crop)] of one scene: each visible object, then one background square if one is found."""
    image, _, objects, classes = _synthetic_sample(rng, SCENE_SIZE, 0)
    crops = []
    for k in range(1, len(classes)):
        ys, xs = np.nonzero(objects == k)
        if len(xs) >= MIN_PIXELS:
            crops.append((SYNTHETIC_CLASSES[classes[k]],
                          square_crop(image, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, size)))
    for _ in range(BACKGROUND_TRIES):
        side = int(rng.integers(SCENE_SIZE // 4, SCENE_SIZE // 2 + 1))
        x, y = rng.integers(0, SCENE_SIZE - side + 1, 2)
        if (objects[y:y + side, x:x + side] > 0).mean() <= BACKGROUND_OBJECT:
            crops.append(("background", square_crop(image, x, y, x + side, y + side, size)))
            break
    return crops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write OUT/<class>/<id>.png into (created)")
    p.add_argument("--scenes", type=int, default=2000, help="number of scenes to crop from")
    p.add_argument("--size", type=int, default=64, help="side of the written crops, in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.scenes < 1 or args.size < 8:
        sys.exit(f"--scenes {args.scenes} / --size {args.size}: expected at least 1 scene and a size of at least 8")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"--out {args.out} is not empty; expected a new or empty folder (nothing is overwritten)")
    for name in SYNTHETIC_CLASSES:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
    counts = dict.fromkeys(SYNTHETIC_CLASSES, 0)
    for i in range(args.scenes):
        for j, (name, crop) in enumerate(scene_crops(np.random.default_rng([args.seed, i, CROP_STREAM]), args.size)):
            cv2.imwrite(os.path.join(args.out, name, f"scene{i:06d}_{j}.png"), crop)
            counts[name] += 1
    print(f"wrote {sum(counts.values())} crops to {args.out}: "
          + ", ".join(f"{name} {n}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
