"""benchmarks/data_pipeline.py compares like with like: its torchvision v2 pipelines give samples of the suite's shapes,
dtypes and value ranges, masks hold only class ids or 255, and its checks catch a pipeline that does not."""
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from conftest import load_script

bench = load_script("benchmarks/data_pipeline.py")


def test_segmentation_pipelines_agree(tiny_data):
    datasets = {"suite": bench.suite_segmentation(tiny_data),
                "v2": bench.V2Segmentation(tiny_data, bench.v2_segmentation_transform())}
    bench.check_equivalence("segmentation", datasets, samples=6)
    assert bench.check_identity_settings("segmentation", tiny_data) < 0.1
    image, mask = datasets["v2"][0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {*range(bench.SEG["numclasses"]), 255}
    assert (mask == 255).any()  # 64 px scenes never fill a 96 px crop: the padding is ignore


def test_classification_pipelines_agree(tmp_path):
    pytest.importorskip("sklearn")
    root, datasets = bench.build_pipelines("classification", str(tmp_path))
    bench.check_equivalence("classification", datasets, samples=6)
    assert bench.check_identity_settings("classification", root) < 0.1


def _seg_transform(fill=255, crop=96, mask_dtype=torch.int64):
    return v2.Compose([
        bench.RandomScale(bench.SEG["scale_range"]),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: bench.MEAN_RGB, tv_tensors.Mask: fill}),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: mask_dtype}, scale=True),
        v2.Normalize(bench.IMAGENET_MEAN, bench.IMAGENET_STD)])


@pytest.mark.parametrize("broken, message", [(dict(fill=7), "class id 7"), (dict(crop=80), "expected float32"),
                                             (dict(mask_dtype=torch.uint8), "expected int64")])
def test_equivalence_check_catches_a_different_pipeline(tiny_data, broken, message):
    datasets = {"suite": bench.suite_segmentation(tiny_data),
                "v2": bench.V2Segmentation(tiny_data, _seg_transform(**broken))}
    with pytest.raises(AssertionError, match=message):
        bench.check_equivalence("segmentation", datasets)


def test_identity_check_catches_missing_normalisation(tiny_data, monkeypatch):
    original = bench.v2_segmentation_transform

    def unnormalised(cfg=bench.SEG):
        return v2.Compose(original(cfg).transforms[:-1])

    monkeypatch.setattr(bench, "v2_segmentation_transform", unnormalised)
    with pytest.raises(AssertionError, match="images differ"):
        bench.check_identity_settings("segmentation", tiny_data)


def test_measure_times_every_pipeline_and_the_loader_alone(tiny_data):
    datasets = {"suite": bench.suite_segmentation(tiny_data),
                "v2": bench.V2Segmentation(tiny_data, bench.v2_segmentation_transform())}
    only = bench.LoaderOnly(datasets["suite"])
    assert len(only) == len(datasets["suite"])
    for got, want in zip(only[5], datasets["suite"][0]):
        assert got.shape == want.shape and got.dtype == want.dtype
    rates = bench.measure("segmentation", tiny_data, datasets, [0], repeats=2, passes=1)
    assert {name for name, _ in rates} >= {"suite", "v2", "loader only"}
    assert all(len(r) == 2 and min(r) > 0 for r in rates.values())
    rows = {line.split(" | ")[0].strip("| "): line for line in bench.table("segmentation", rates, [0]).splitlines()}
    assert rows["loader only"].rstrip(" |").endswith("-") and rows["v2"].rstrip(" |").endswith("1.00")
