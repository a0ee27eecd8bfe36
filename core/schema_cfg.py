"""Seed 001's `cfg` dict (config.py, or the same structure in YAML/TOML/JSON, as seed 000's configs/train.yaml),
read as flags (see core/schemas.py).

    cfg = dict(seed=42, work_dir="./work_dir", dist=dict(backend="nccl", init_method="env://"),
               model=dict(type="MyModel", num_classes=10), data=dict(train=dict(type="MyDataset", ...), ...),
               loss=dict(type="CrossEntropyLoss"), optimizer=dict(type="Adam", lr=0.001), total_epochs=100,
               hooks=dict(logger=dict(interval=10, log_dir="./logs"), ...))

`type` names a registered component. One registered with MODELS/DATASETS/LOSSES.register_module() is built with
the other keys as keyword arguments (--model_kwargs, --dataset_kwargs, --val_dataset_kwargs, --loss_kwargs); a
built-in one is configured by flags, so it takes no others.
"""
from core.schemas import known_path, pick, unknown, walk

LOSS_TYPES = {"crossentropyloss": "ce", "focalloss": "focal", "diceloss": "dice", "bcewithlogitsloss": "bce",
              "lovaszloss": "lovasz"}
OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamw": "adamw"}
SCHEDULES = {"cosineannealinglr": "cosine", "steplr": "step", "multisteplr": "multistep", "polylr": "poly",
             "constantlr": "constant"}
RENAMES = {"seed": "seed", "work_dir": "logdir", "resume_from": "resume", "total_epochs": "epochs",
           "dist.backend": "dist_backend", "dist.init_method": "dist_url", "dist.world_size": "world_size",
           "data.train_dataloader.batch_size": "batchsize", "data.train_dataloader.num_workers": "workers",
           "data.val_dataloader.batch_size": "val_batchsize", "optimizer.lr": "lr",
           "optimizer.weight_decay": "weight_decay", "optimizer.momentum": "momentum",
           "hooks.logger.interval": "log_interval", "hooks.logger.log_dir": "log_dir",
           "hooks.checkpoint.interval": "save_interval", "hooks.checkpoint.max_keep_ckpts": "keep_last",
           "hooks.tensorboard.log_dir": "tb_dir", "hooks.wandb.project": "wandb_project",
           "hooks.wandb.entity": "wandb_entity", "hooks.wandb.mode": "wandb_mode"}
# Read by hand below; hook `type`s name the hook and are checked against it.
HANDLED = {"workflow", "model.*", "data.train.*", "data.val.*", "data.train_dataloader.shuffle",
           "data.val_dataloader.num_workers", "loss.*", "optimizer.type", "hooks.lr_scheduler.*",
           "hooks.metrics.*", "hooks.logger.type", "hooks.checkpoint.type", "hooks.tensorboard.type",
           "hooks.wandb.type", "hooks.wandb", "hooks.wandb.enabled"}
KEYS = set(RENAMES) | HANDLED
# Keys that only this schema has: they tell a cfg dict in YAML/TOML/JSON from a file of flag names.
MARKERS = {"work_dir", "total_epochs", "workflow", "resume_from", "dist.*", "hooks.*", "model.type",
           "data.train.*", "data.val.*", "data.train_dataloader.*", "data.val_dataloader.*", "loss.type",
           "optimizer.type"}
HOOK_TYPES = {"logger": "LoggerHook", "checkpoint": "CheckpointHook", "tensorboard": "TensorboardHook",
              "wandb": "WandbHook"}


def handled(where):
    # an empty hook, dict() with no keys, turns the hook on as it is
    return known_path(where, HANDLED) or where in {f"hooks.{hook}" for hook in HOOK_TYPES}


def translate(cfg, m):
    """Fill the Mapping `m` from a seed-001 cfg dict (test.py and infer.py take only what they share)."""
    train = m.entry == "train"
    for where, value in walk(cfg, m):
        if where in RENAMES:
            m.set(RENAMES[where], value, where)
        elif handled(where):
            continue
        elif not m.flag_key(where.split(".")[-1], value, where) and train:
            unknown(m, where, "001", sorted(KEYS))
    if not train:
        return
    if "task" not in m.flags:  # seed 001's framework trains classifiers; a `task` key (or --task) says otherwise
        m.set("task", "classification", "(seed 001's schema)")
    read_workflow(m, cfg.get("workflow"))
    read_components(m, cfg)
    read_hooks(m, cfg.get("hooks") or {})


def read_workflow(m, workflow):
    if workflow is None:
        return
    phases = [tuple(p) if isinstance(p, list) else p for p in workflow] if isinstance(workflow, list) else None
    if phases not in ([("train", 1)], [("train", 1), ("val", 1)]):
        m.fail("workflow", f"{workflow!r}: the suite trains one epoch and then validates; expected "
                           f"[(\"train\", 1)] or [(\"train\", 1), (\"val\", 1)]")


def component(m, spec, where):
    """(type, other keys) of a dict(type=..., **kwargs)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        m.fail(where, f"{spec!r}: expected dict(type=NAME, ...)")
    return spec["type"], {k: v for k, v in spec.items() if k != "type"}


def read_components(m, cfg):
    if "model" in cfg:
        name, kwargs = component(m, cfg["model"], "model")
        m.set("model_type", name, "model.type")
        if "num_classes" in kwargs:
            m.set("numclasses", kwargs["num_classes"], "model.num_classes")
        m.set("model_kwargs", kwargs, "model")
    data = cfg.get("data") or {}
    if "train" in data:
        name, kwargs = component(m, data["train"], "data.train")
        m.set("dataset", name, "data.train.type")
        if kwargs:
            m.set("dataset_kwargs", kwargs, "data.train")
        if "val" in data:
            val_name, val_kwargs = component(m, data["val"], "data.val")
            if val_name != name:
                m.fail("data.val.type", f"{val_name!r} differs from data.train's {name!r}; expected one dataset "
                                        f"type with its own arguments per split")
            if val_kwargs:
                m.set("val_dataset_kwargs", val_kwargs, "data.val")
    loaders = {k: data.get(f"{k}_dataloader") or {} for k in ("train", "val")}
    if loaders["train"].get("shuffle") is False:
        m.fail("data.train_dataloader.shuffle", "training batches are always shuffled; expected true")
    workers = [loaders[k].get("num_workers") for k in ("train", "val")]
    if None not in workers and workers[0] != workers[1]:
        m.fail("data.val_dataloader.num_workers", f"{workers[1]} differs from train_dataloader's {workers[0]}; the "
                                                  f"suite has one --workers for both, expected the same value")
    if workers[0] is None and workers[1] is not None:
        m.set("workers", workers[1], "data.val_dataloader.num_workers")
    if "loss" in cfg:
        read_loss(m, cfg["loss"])
    if "optimizer" in cfg:
        name, _ = component(m, cfg["optimizer"], "optimizer")
        m.set("optimizer", pick(m, name, "optimizer.type", OPTIMIZERS, "optimizer"), "optimizer.type")
        for key in set(cfg["optimizer"]) - {"type", "lr", "weight_decay", "momentum"}:
            m.fail(f"optimizer.{key}", "not read; expected type, lr, weight_decay and (SGD) momentum")


def read_loss(m, spec):
    name, kwargs = component(m, spec, "loss")
    builtin = LOSS_TYPES.get(name.lower())
    if builtin is None:  # a loss registered with LOSSES.register_module(): its arguments are its own
        m.set("loss", [name], "loss.type")
        if kwargs:
            m.set("loss_kwargs", {name: kwargs}, "loss")
        return
    m.set("loss", [builtin], "loss.type")
    options = {"ce": {"weight": "class_weights", "label_smoothing": "label_smoothing"},
               "focal": {"gamma": "focal_gamma"}}.get(builtin, {})
    for key, value in kwargs.items():
        if value is None:
            continue  # weight=None: not given
        if key == "reduction" and value == "mean":
            continue  # the suite's losses are means (over labelled pixels); "mean" is what they do
        if key == "ignore_index" and value == 255:
            continue
        if key not in options:
            m.fail(f"loss.{key}", f"{value!r} is not read for {name}; expected "
                                  f"{', '.join(list(options) + ['reduction (mean)', 'ignore_index (255)'])}")
        m.set(options[key], value, f"loss.{key}")


def read_hooks(m, hooks):
    for hook, expected in HOOK_TYPES.items():
        kind = (hooks.get(hook) or {}).get("type") if isinstance(hooks.get(hook), dict) else None
        if kind is not None and kind != expected:
            m.fail(f"hooks.{hook}.type", f"{kind!r}; expected {expected!r} (or no type)")
    wandb = hooks.get("wandb")
    if wandb is not None:  # wandb=dict(project=...) turns it on, unless it says enabled=False
        m.set("wandb", wandb.get("enabled", True) if isinstance(wandb, dict) else bool(wandb), "hooks.wandb")
    if "lr_scheduler" in hooks:
        name, kwargs = component(m, hooks["lr_scheduler"], "hooks.lr_scheduler")
        schedule = pick(m, name, "hooks.lr_scheduler.type", SCHEDULES, "LR schedule")
        m.set("lr_scheduler", schedule, "hooks.lr_scheduler.type")
        names = {"cosine": {"eta_min": "min_lr"}, "step": {"step_size": "step_size", "gamma": "gamma"},
                 "multistep": {"milestones": "milestones", "gamma": "gamma"}, "poly": {"power": "poly_power",
                                                                                     "eta_min": "min_lr"}}
        for key, value in kwargs.items():
            where = f"hooks.lr_scheduler.{key}"
            if key == "T_max":
                if value != m.flags.get("epochs", (value,))[0]:
                    m.fail(where, f"{value!r} differs from total_epochs; the cosine schedule spans the whole run, "
                                  f"expected T_max = total_epochs or no T_max")
            elif key in names.get(schedule, {}):
                m.set(names[schedule][key], value, where)
            else:
                m.fail(where, f"not read for {name}; expected {', '.join(names.get(schedule, {})) or 'nothing'}")
    metrics = hooks.get("metrics")
    if isinstance(metrics, dict) and "topk" in metrics:
        ks = metrics["topk"] if isinstance(metrics["topk"], list) else [metrics["topk"]]
        if not ks or not all(isinstance(k, int) for k in ks) or any(k not in (1, max(ks)) for k in ks):
            m.fail("hooks.metrics.topk", f"{metrics['topk']!r}: the suite reports top-1 and one top-k; expected "
                                         f"(1, K) such as (1, 5)")
        m.set("topk", max(ks), "hooks.metrics.topk")
    extra = set(metrics) - {"type", "topk"} if isinstance(metrics, dict) else set()
    if extra:
        m.fail(f"hooks.metrics.{sorted(extra)[0]}", "not read; expected topk = (1, K)")
