"""The VOC-layout segmentation dataset, its checks, and the segmentation dataset registry."""
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from torch.utils.data import Dataset

from core.registry import Registry
from data.readers import read_image, read_label
from data.transforms import EvalTransform, TrainTransform
from utils import UserError

VOC_LAYOUT = "a VOC-layout folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"

# ---------------------------------------------------------------------------------------------
# VOC-layout dataset and its checks.

def _sample_paths(root, image_id):
    return (os.path.join(root, "JPEGImages", image_id + ".jpg"),
            os.path.join(root, "SegmentationClass", image_id + ".png"))


def _read_list(root, split):
    """Ids listed in ImageSets/Segmentation/<split>.txt, after checking that the folder and list exist."""
    if not os.path.isdir(root):
        raise UserError(f"dataset path '{root}' does not exist; expected {VOC_LAYOUT}")
    list_dir = os.path.join(root, "ImageSets", "Segmentation")
    list_path = os.path.join(list_dir, split + ".txt")
    if not os.path.isfile(list_path):
        found = sorted(n[:-4] for n in os.listdir(list_dir) if n.endswith(".txt")) if os.path.isdir(list_dir) else []
        raise UserError(f"split list '{list_path}' does not exist; expected one image id per line "
                        f"(splits found: {', '.join(found) or 'none'})")
    with open(list_path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"split list '{list_path}' is empty; expected one image id per line")
    return ids



def _map_paths(root, image_id, maps):
    """{key: path} of an id's per-pixel maps; `maps` is {key: folder under root} (PNG files named <id>.png)."""
    return {key: os.path.join(root, folder, image_id + ".png") for key, folder in (maps or {}).items()}


def _read_pair(root, image_id, numclasses, maps=None, weight_maps=()):
    """(image, label), or with `maps` (image, {key: map}): the label PNG is replaced by the listed maps.

    Maps named in `weight_maps` hold weights 0..255 and skip the class-index check.
    """
    image_path, label_path = _sample_paths(root, image_id)
    image = read_image(image_path)
    paths = _map_paths(root, image_id, maps) if maps else {"label": label_path}
    labels = {key: read_label(path, None if key in weight_maps else numclasses) for key, path in paths.items()}
    for key, label in labels.items():
        if image.shape[:2] != label.shape:
            raise UserError(f"image and {'label' if key == 'label' else key + ' map'} of id '{image_id}' differ in size: '{image_path}' is "
                            f"{image.shape[1]}x{image.shape[0]}, '{paths[key]}' is {label.shape[1]}x{label.shape[0]} "
                            f"(WxH); expected the same size")
    return image, (labels if maps else labels["label"])


def check_dataset(root, split, numclasses, full=True, maps=None, weight_maps=()):
    """Check the split before training; raise UserError with one line on the first problem; return its ids.

    Always checks the layout and that every listed id has an image and a label file. With full=True it
    also reads every file (in threads: cv2 and PIL release the GIL) and checks sizes and label values.
    """
    ids = _read_list(root, split)
    for image_id in ids:
        paths = _map_paths(root, image_id, maps).values() if maps else _sample_paths(root, image_id)[1:]
        for path in (_sample_paths(root, image_id)[0], *paths):
            if not os.path.isfile(path):
                raise UserError(f"id '{image_id}' in split '{split}' has no file '{path}'; expected {VOC_LAYOUT}")
    if full:
        def problem(image_id):
            try:
                _read_pair(root, image_id, numclasses, maps, weight_maps)
            except UserError as e:
                return str(e)
            return None

        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
            problems = [p for p in pool.map(problem, ids) if p]
        if problems:
            more = f" (and {len(problems) - 1} more problem(s) in split '{split}')" if len(problems) > 1 else ""
            raise UserError(problems[0] + more)
    return ids


class SegmentationDataset(Dataset):
    """VOC-layout split: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt.

    The constructor checks the layout and that all files exist; check_dataset(..., full=True) checks contents.
    Items are transform(image RGB uint8 HxWx3, label uint8 HxW); without a transform, EvalTransform().
    With `maps` ({key: folder}, e.g. scribbles and pseudo labels) the label is a dict of those maps instead;
    `weight_maps` names the ones that hold weights rather than class indices.
    """

    def __init__(self, root, split, transform=None, numclasses=None, check_contents=False, maps=None,
                 weight_maps=()):
        self.root, self.split, self.numclasses = root, split, numclasses
        self.maps, self.weight_maps = maps, tuple(weight_maps)
        self.ids = check_dataset(root, split, numclasses, check_contents, maps, self.weight_maps)
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.transform(*_read_pair(self.root, self.ids[index], self.numclasses, self.maps, self.weight_maps))

    def image_size(self, index):
        """(height, width) of a sample, read from the label's header only."""
        with Image.open(_sample_paths(self.root, self.ids[index])[1]) as im:
            return im.height, im.width


DATASETS = Registry("dataset")
register_dataset = DATASETS.register


@register_dataset("voc")
def build_voc(args, root, split, train):
    """VOC layout. Every file is read once up front, so a broken dataset stops before the first step."""
    transform = TrainTransform(args.crop_size, args.scale_range, args.hflip_prob) if train else EvalTransform()
    return SegmentationDataset(root, split, transform, args.numclasses, check_contents=True)
