"""Resolved flags written back in seed 002's schema (`train.py --print_config 002`); read back with --config, the
file resolves to the same flags. Flags the schema has no key for go to an [ailab] table (flag names may appear in
any table of a schema file)."""
from core.schema_toml import COMMON_RENAMES, LOSS_OPTIONS, TRAIN_RENAMES


def from_flags(flags):
    """{flag: value} (training's resolved flags) -> a seed-002 table."""
    flags, doc = dict(flags), {}

    def put(path, value):
        node = doc
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def take(flag, default=None):
        return flags.pop(flag, default)

    task = take("task")
    put("postprocess", task)
    put("model.name", take("model_type"))
    for flag, path in (("resume", "model.continue_checkpoint"), ("pretrained", "model.pretrained"),
                       ("dataset_kwargs", "dataset.config"), ("val_batchsize", "test.batch_size"),
                       ("optimizer", "train.optimizer.type"), ("lr_scheduler", "train.lr_scheduler.type"),
                       ("lr_update_policy", "train.lr_scheduler.update_policy"), ("log_level", "ddp.log_level")):
        if flag in flags:
            put(path, take(flag))
    put("criterion", criterion_tables(flags))
    amp, dtype = take("amp"), take("amp_dtype")
    put("train.scaler.compute_type", dtype if amp else "float32")
    put("output.save_best", not take("no_save_best", False))
    put("output.save_last", not take("no_save_last", False))
    ratio = take("split_ratio")
    if ratio:
        put("dataset.split.type", "train_valid_test_split")
        for name, share in zip(("train", "valid", "test"), ratio):
            put(f"dataset.split.{name}", share)
    put_transform(flags, put, task)
    for path, flag in {**COMMON_RENAMES, **TRAIN_RENAMES}.items():
        if flag in flags:
            put(path, take(flag))
    if flags:
        doc["ailab"] = flags  # the suite's own flags
    return doc


def criterion_tables(flags):
    """[[criterion]] from --loss NAME:WEIGHT, with each built-in loss's options and a registered loss's kwargs."""
    tables, kwargs = [], flags.pop("loss_kwargs", None) or {}
    for spec in flags.pop("loss", []):
        name, _, weight = spec.partition(":")
        options = {key: flags.pop(flag) for key, flag in LOSS_OPTIONS.get(name, {}).items() if flag in flags}
        tables.append({"type": name, "weight": float(weight or 1.0), "config": options or kwargs.get(name, {})})
    return tables


def put_transform(flags, put, task):
    """[transform]: the listed operations; the crop flags the schema has no key for stay in the table as flags."""
    hflip = flags.pop("hflip_prob", 0.0)
    if hflip:
        put("transform.HFLIP", [hflip])
    if task == "segmentation":
        put("transform.PIL_TO_TENSOR", [])
        return
    size = flags.pop("image_size", None)
    if size:
        put("transform.RESIZE", [size, size])
    for flag, op in (("vflip_prob", "VFLIP"), ("rotation", "ROTATION")):
        value = flags.pop(flag, 0.0)
        if value:
            put(f"transform.{op}", [value])
    put("transform.CONVERT_IMAGE_DTYPE", ["float32"])
    if "mean" in flags:
        put("transform.NORMALIZE", [flags.pop("mean"), flags.pop("std")])
    for flag in ("train_crop", "rrc_scale", "rrc_ratio", "color_jitter", "val_resize"):
        if flag in flags:
            put(f"transform.{flag}", flags.pop(flag))
