"""Seed 002's DDP TOML schema, read as flags (see core/schemas.py). One file serves training, testing and
prediction: each script takes the keys that concern it ([train.*] only train.py, [predict] only infer.py).

What differs from the flag names: the top-level `task` is the run's name (the run folder is
OUTPUT_DIR/TASK-RUN_ID) and `postprocess` says classification or segmentation; [transform] lists the whole
augmentation pipeline, so an operation it leaves out is off; periods in epochs may be fractions (save_period = 0.1
writes last.pth every tenth of an epoch).
"""
import glob
import os

from core.schemas import (check_task_name, known_path, loss_specs_from_tables, one, pick, read_config, relative_file,
                          unknown, walk)

IMAGENET = [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamw": "adamw"}
SCHEDULERS = {"cosine": "cosine", "poly": "poly", "step": "step", "multistep": "multistep", "constant": "constant",
              "none": "constant"}
POLICIES = {"epoch": "epoch", "iter": "iter", "step": "iter", "iteration": "iter"}
COMPUTE = {"float16": ("float16", True), "fp16": ("float16", True), "bfloat16": ("bfloat16", True),
           "bf16": ("bfloat16", True), "float32": (None, False), "fp32": (None, False)}
LOSS_NAMES = {"cross_entropy": "ce", "crossentropy": "ce", "ce": "ce", "dice": "dice", "bce": "bce",
              "binary_cross_entropy": "bce", "focal": "focal", "lovasz": "lovasz"}
# A built-in loss's `config` keys and the flags they set.
LOSS_OPTIONS = {"ce": {"label_smoothing": "label_smoothing", "weight": "class_weights"},
                "focal": {"gamma": "focal_gamma"}}

# Keys that rename to a flag in train.py (other scripts skip them: their settings come from the checkpoint).
TRAIN_RENAMES = {
    "output_dir": "output_dir", "task": "run_name", "entity": "wandb_entity", "run_id": "run_id", "classes": "classes",
    "metrics": "metrics", "model.config.n_classes": "numclasses",
    "dataset.split.random_state": "split_seed", "dataloader.num_workers": "workers", "train.batch_size": "batchsize",
    "train.epoch": "epochs", "train.save_period": "save_period", "train.save_recovery_period": "recovery_period",
    "train.grad_accumulation_steps": "accum_steps", "train.optimizer.learning_rate": "lr",
    "train.optimizer.weight_decay": "weight_decay", "train.lr_scheduler.warmup": "warmup_epochs",
    "train.lr_scheduler.warmup_lr": "warmup_lr", "train.early_stopping.patience": "early_stop_patience",
    "train.early_stopping.min_delta": "early_stop_min_delta", "private.wandb": "wandb",
    "private.log.log_file_format": "stamp_format", "private.log.log_format": "log_format",
    "output.save_interval": "save_interval",
}
# Keys every script reads the same way.
COMMON_RENAMES = {"device": "device", "seed": "seed", "ddp.enabled": "distributed", "dataset.root_dir": "dataset_path"}
# Keys read by hand below (with their checks), or accepted with the one value that has a meaning here.
HANDLED = {
    "postprocess", "model.name", "model.continue_checkpoint", "model.pretrained", "model.config.arch",
    "model.config.n_channels", "model.config.input_sizes", "model.config.dtypes", "model.config.pretrained",
    "criterion", "transform.*", "dataset.name", "dataset.config", "dataset.config.*", "dataset.ref", "dataset.split.type",
    "dataset.split.train", "dataset.split.valid", "dataset.split.test", "dataset.split.shuffle", "dataloader.shuffle",
    "dataloader.pin_memory", "dataloader.drop_last", "train.optimizer.type", "train.lr_scheduler.type",
    "train.lr_scheduler.update_policy", "train.scaler.compute_type", "test.batch_size", "predict.input",
    "predict.config.output_format", "predict.config.save_images", "private.mode", "ddp.log_level", "private.log.verbose",
    "private.log.debug", "output.save_best", "output.save_last",
}
KEYS = set(TRAIN_RENAMES) | set(COMMON_RENAMES) | HANDLED
# Keys that tell this schema from a file of flag names (which may also hold [[criterion]] and a [transform] group).
MARKERS = KEYS - {"task", "criterion", "transform.*", "dataset.config.*"} | {
    f"transform.{op}" for op in ("RESIZE", "HFLIP", "VFLIP", "ROTATION", "PIL_TO_TENSOR", "CONVERT_IMAGE_DTYPE",
                                 "NORMALIZE")}


def translate(table, m):
    """Fill the Mapping `m` from a seed-002 table."""
    train = m.entry == "train"
    for where, value in walk(table, m):
        if where in COMMON_RENAMES or where in TRAIN_RENAMES:
            if value != "" and (train or where in COMMON_RENAMES):  # "" is the schema's "not set" (run_id = "")
                m.set({**COMMON_RENAMES, **TRAIN_RENAMES}[where], value, where)
        elif known_path(where, HANDLED):
            continue  # read below, in context
        elif not m.flag_key(where.split(".")[-1], value, where) and train:
            unknown(m, where, "002", sorted(KEYS))  # test.py and infer.py skip training's flags
    get = Lookup(table)
    if train:
        task = read_task(m, get)
        read_model(m, get, task)
        read_transform(m, get, task)
        read_data(m, get)
        read_training(m, get)
        read_logging(m, get)
    read_test_and_predict(m, get, table)


class Lookup:
    """get('train.optimizer.type') -> (value, where), or (None, where) when absent."""

    def __init__(self, table):
        self.table = table

    def __call__(self, path, default=None):
        node = self.table
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default, path
            node = node[part]
        return node, path


def read_task(m, get):
    value, where = get("postprocess")
    run_name, _ = get("task")
    if value is None and run_name in ("classification", "segmentation"):
        m.fail("task", f"{run_name!r} is the run's name in seed 002's schema (read as such because of its other "
                       f"keys); to train {run_name}, set postprocess = \"{run_name}\"")
    if value is not None:
        m.set("task", check_task_name(m, value, where, "postprocess the suite has (the kind of model trained)"), where)
    elif "task" not in m.flags:  # the schema's examples are classification; postprocess (or --task) says otherwise
        m.set("task", "classification", "(seed 002's schema)")
    return m.flags["task"][0]


def read_model(m, get, task):
    name, name_at = get("model.name")
    arch, arch_at = get("model.config.arch")
    if name and arch and name != arch:
        m.fail(arch_at, f"{arch!r} contradicts model.name {name!r}; expected the same architecture or only one")
    if name or arch:
        m.set("model_type", name or arch, name_at if name else arch_at)
    for key, flag in (("model.continue_checkpoint", "resume"), ("model.pretrained", "pretrained")):
        value, where = get(key)
        if value:
            m.set(flag, value, where)
    wanted, where = get("model.config.pretrained")
    path, _ = get("model.pretrained")
    if wanted is True and not path:  # "use pretrained weights": the architecture's DEFAULT weights
        m.set("pretrained", "DEFAULT", where)
    if wanted is False and path:
        m.fail(where, f"false contradicts [model] pretrained = {path!r}; expected true or no weights file")
    channels, where = get("model.config.n_channels")
    if channels is not None and channels != 3:
        m.fail(where, f"{channels!r}: the suite's models read 3-channel RGB images (greyscale files are "
                      f"expanded); expected 3")
    for value in get("model.config.dtypes")[0] or []:
        if value != "float32":
            m.fail("model.config.dtypes", f"{value!r}: inputs are float32 tensors; mixed precision is "
                                          f"[train.scaler] compute_type; expected [\"float32\"]")
    sizes, where = get("model.config.input_sizes")
    if sizes is not None:
        if not (isinstance(sizes, list) and len(sizes) == 1 and isinstance(sizes[0], list) and len(sizes[0]) == 4
                and sizes[0][1] == 3 and sizes[0][2] == sizes[0][3]):
            m.fail(where, f"{sizes!r}: expected one square RGB size [[N, 3, S, S]] (the training input side S)")
        resize, resize_at = get("transform.RESIZE")
        if isinstance(resize, list) and resize and resize[0] != sizes[0][2]:
            m.fail(where, f"{sizes!r} contradicts {resize_at} = {resize!r}; expected the same side")
        if resize is None:  # else RESIZE sets it
            m.set("crop_size" if task == "segmentation" else "image_size", sizes[0][2], where)
    read_criterion(m, get)


def read_criterion(m, get):
    tables, where = get("criterion")
    if tables is None:
        return
    entries = [dict(t, type=LOSS_NAMES.get(str(t.get("type")).lower(), t.get("type")))
               if isinstance(t, dict) else t for t in (tables if isinstance(tables, list) else [tables])]
    plain = [{k: v for k, v in t.items() if k != "config"} if isinstance(t, dict) else t for t in entries]
    m.set("loss", loss_specs_from_tables(plain, f"'{where}' in {m.path}"), where)
    kwargs = {}
    for i, entry in enumerate(entries, 1):
        options, at = entry.get("config") or {}, f"{where}[{i}].config"
        if not isinstance(options, dict):
            m.fail(at, f"{options!r} is not a table; expected config = {{}} or the loss's options")
        if entry["type"] in LOSS_OPTIONS:
            for key, value in options.items():
                if key not in LOSS_OPTIONS[entry["type"]]:
                    m.fail(f"{at}.{key}", f"not an option of the {entry['type']} loss; expected one of "
                                          f"{', '.join(LOSS_OPTIONS[entry['type']])}")
                m.set(LOSS_OPTIONS[entry["type"]][key], value, f"{at}.{key}")
        elif options and entry["type"] in LOSS_NAMES.values():
            m.fail(at, f"the {entry['type']} loss has no options; expected config = {{}}")
        elif options:
            kwargs[entry["type"]] = options  # a loss registered with LOSSES.register_module(): its arguments
    if kwargs:
        m.set("loss_kwargs", kwargs, where)


def read_transform(m, get, task):
    """[transform] is the whole pipeline: what it lists is on, with its values, and the rest is off."""
    ops, where = get("transform")
    if ops is None:
        return
    if not isinstance(ops, dict):
        m.fail(where, "expected a table of operations such as RESIZE = [224, 224]")
    known = {"RESIZE", "HFLIP", "VFLIP", "ROTATION", "PIL_TO_TENSOR", "CONVERT_IMAGE_DTYPE", "NORMALIZE"}
    seg_only = {"HFLIP", "PIL_TO_TENSOR", "CONVERT_IMAGE_DTYPE", "NORMALIZE"}
    for key, value in ops.items():
        at = f"transform.{key}"
        if key not in known:
            if not m.flag_key(key, value, at):
                unknown(m, at, "002", sorted(f"transform.{k}" for k in known))
            continue
        if task == "segmentation" and key not in seg_only:
            m.fail(at, "segmentation trains on random scaled crops (crop_size, scale_range); expected only "
                       "HFLIP, PIL_TO_TENSOR, CONVERT_IMAGE_DTYPE and NORMALIZE for it")
        if key == "RESIZE":
            if not (isinstance(value, list) and len(value) == 2 and value[0] == value[1]):
                m.fail(at, f"{value!r}: expected a square size [S, S]")
            m.set("image_size", value[0], at)
        elif key in ("HFLIP", "VFLIP", "ROTATION"):
            m.set({"HFLIP": "hflip_prob", "VFLIP": "vflip_prob", "ROTATION": "rotation"}[key], one(m, value, at), at)
        elif key == "CONVERT_IMAGE_DTYPE" and one(m, value, at) != "float32":
            m.fail(at, f"{value!r}: images become float32 tensors; expected ['float32']")
        elif key == "NORMALIZE":
            if not (isinstance(value, list) and len(value) == 2 and all(len(v) == 3 for v in value)):
                m.fail(at, f"{value!r}: expected [[mean R, G, B], [std R, G, B]]")
            if task == "segmentation":  # its transforms normalise with ImageNet's values; --mean/--std are not its
                if value != IMAGENET:
                    m.fail(at, f"segmentation normalises with ImageNet's statistics {IMAGENET}; expected those")
                continue
            m.set("mean", value[0], at)
            m.set("std", value[1], at)
    # Left out means off. Segmentation's pipeline (scaled crops) has only the flip to turn off.
    off = {"hflip_prob": 0.0} if task == "segmentation" else {
        "hflip_prob": 0.0, "vflip_prob": 0.0, "rotation": 0.0, "color_jitter": [0.0, 0.0, 0.0, 0.0]}
    for flag, value in off.items():
        if flag not in m.flags:
            m.set(flag, value, f"{where} (left out)")
    if task != "segmentation" and "train_crop" not in m.flags:  # the schema has no random crop: RESIZE resizes
        m.set("train_crop", "resize", where)                      # the whole image unless a flag says otherwise


def read_data(m, get):
    name, where = get("dataset.name")
    if name is not None:
        m.set("dataset", name, where)
    options, where = get("dataset.config")
    ref, ref_at = get("dataset.ref")
    merged = {}
    if ref:
        merged.update(read_config(relative_file(m, ref, ref_at)))
    if options not in (None, {}):
        if not isinstance(options, dict):
            m.fail(where, f"{options!r} is not a table; expected the dataset's keyword arguments")
        merged.update(options)
    if merged:
        m.set("dataset_kwargs", merged, ref_at if ref else where)
    kind, where = get("dataset.split.type")
    if kind is not None and kind != "train_valid_test_split":
        m.fail(where, f"{kind!r}; expected \"train_valid_test_split\" (a stratified split of one image tree)")
    shares = [get(f"dataset.split.{k}")[0] for k in ("train", "valid", "test")]
    if any(s is not None for s in shares):
        if shares[0] is None or shares[1] is None:
            m.fail("dataset.split", "expected train and valid shares (and optionally test)")
        m.set("split_ratio", [s for s in shares if s is not None], "dataset.split")
    for key, reason in (("dataset.split.shuffle", "the split is always a seeded shuffle within each class "
                                                  "(random_state)"),
                        ("dataloader.shuffle", "training batches are always shuffled (per epoch, the same way on "
                                               "every process count); evaluation keeps the file order"),
                        ("dataloader.drop_last", "the last partial training batch is dropped so that every process "
                                                 "takes the same number of steps; evaluation keeps every image"),
                        ("dataloader.pin_memory", "batches are pinned whenever they go to a GPU")):
        value, where = get(key)
        if value is not None and value is not True:
            m.fail(where, f"{value!r}: {reason}; expected true")


def read_training(m, get):
    for key, table, what in (("train.optimizer.type", OPTIMIZERS, ("optimizer", "optimizer")),
                             ("train.lr_scheduler.type", SCHEDULERS, ("lr_scheduler", "LR schedule")),
                             ("train.lr_scheduler.update_policy", POLICIES, ("lr_update_policy", "update policy"))):
        value, where = get(key)
        if value is not None:
            m.set(what[0], pick(m, value, where, table, what[1]), where)
    value, where = get("train.scaler.compute_type")
    if value is not None:
        dtype, amp = pick(m, value, where, COMPUTE, "compute type")
        m.set("amp", amp, where)
        if dtype:
            m.set("amp_dtype", dtype, where)
    for key, flag in (("output.save_best", "no_save_best"), ("output.save_last", "no_save_last")):
        value, where = get(key)
        if value is not None:
            if not isinstance(value, bool):
                m.fail(where, f"{value!r} is not a boolean; expected true or false")
            m.set(flag, not value, where)
    if get("output.save_last")[0] is False and get("train.save_period")[0] is not None:
        m.fail("train.save_period", "contradicts output.save_last = false (save_period says how often last.pth "
                                    "is written); expected one of them")
    mode, where = get("private.mode")
    if mode not in (None, 0):
        m.fail(where, f"{mode!r}: the schema documents no other run mode than 0; expected 0")


def read_logging(m, get):
    """[ddp] log_level sets the level; [private.log] debug = true makes it DEBUG, verbose = false WARNING."""
    level, where = get("ddp.log_level")
    verbose, where_v = get("private.log.verbose")
    debug, where_d = get("private.log.debug")
    if debug is True:
        m.set("log_level", "DEBUG", where_d)
    elif level is not None:
        m.set("log_level", str(level).upper(), where)
    elif verbose is False:
        m.set("log_level", "WARNING", where_v)


def read_test_and_predict(m, get, table):
    batch, where = get("test.batch_size")
    if batch is not None:
        m.set("val_batchsize" if m.entry == "train" else "batchsize", batch, where)
    if m.entry == "infer":
        value, where = get("predict.input")
        if value is not None:
            m.set("input", value, where)
        fmt, where = get("predict.config.output_format")
        if fmt is not None:
            kind = pick(m, fmt, where, {"json": "json", "jsonl": "json", "csv": "csv"}, "output format")
            m.set("save_csv", kind == "csv", where)  # predictions.jsonl is always written
        value, where = get("predict.config.save_images")
        if value is not None:
            m.set("save_overlay", bool(value), where)
    if m.entry != "train" and "checkpoint" in m.actions and table.get("task"):
        m.set("checkpoint", latest_run(get("output_dir")[0] or "runs", table["task"], table.get("run_id")),
              "output_dir, task and run_id (the newest run's best.pth)")


def latest_run(output_dir, run_name, run_id):
    """best.pth of the run OUTPUT_DIR/RUN_NAME-RUN_ID, or of the newest OUTPUT_DIR/RUN_NAME-* when run_id is empty;
    the pattern itself when there is none, so that the error names what was looked for."""
    pattern = os.path.join(output_dir, f"{run_name}-{run_id or '*'}", "best.pth")
    found = [p for p in glob.glob(pattern) if not os.path.islink(os.path.dirname(p))]
    return max(found, key=os.path.getmtime) if found else pattern
