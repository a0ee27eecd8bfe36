"""Test-only plugin: segmentation prediction runs out of GPU memory (torch.cuda.OutOfMemoryError) for whole images
wider than AILAB_OOM_WIDTH pixels, and also in sliding windows for images wider than AILAB_OOM_ALWAYS_WIDTH, as a
small GPU would with large photos. Used with infer.py --plugin tests/oom_plugin.py."""
import os

import torch

from tasks.segmentation import SegmentationTask

_predict = SegmentationTask.predict


def predict(model, image, options=None):
    width = image.shape[-1]
    if width > int(os.environ.get("AILAB_OOM_ALWAYS_WIDTH", "100000")) or (
            width > int(os.environ["AILAB_OOM_WIDTH"]) and not (options and options.sliding)):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (tests/oom_plugin.py, {width} px wide)")
    return _predict(model, image, options)


SegmentationTask.predict = staticmethod(predict)
