"""Train a segmentation or classification model: one process, or one of N under torchrun /
torch.distributed.launch / srun / mpirun.

    python train.py                                   # small segmentation model on the built-in scenes, CPU or GPU
    python train.py --task classification             # ResNet-18 on the built-in digits
    python train.py --layers 50 --model_type res50_ASPP --dataset_path data/VOC2012
    torchrun --nproc_per_node=2 train.py --distributed
"""
import functools
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import models
import tasks
import utils
from core import config, distributed
from core.entry import run_entry
from core.registry import add_plugin_arg, import_plugins
from data import components
from data.dali import add_loader_args, describe as describe_loader, loader_builders
from engine import checkpoint, faults, recipe
from engine.loop import Run, show_progress, train_one_epoch, updates_per_epoch
from engine.optim import (OPTIMIZERS, SCHEDULERS, UPDATE_POLICIES, build_optimizer, describe_optimizer,
                          load_optimizer_state, lr_at)
from engine.records import GpuMonitor, Recorder, add_monitor_args, memory_scalars, peak_memory
from evaluation.evaluate import evaluate
from evaluation.inference import PredictOptions
from models import weights as model_weights
from models.losses import FOCAL_GAMMA, LOSSES
from tasks.base import headline, record_row, record_scalars, shown_metrics


def get_args_parser():
    p = config.make_parser(__doc__, entry="train")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="voc",
                   help="registered dataset name; segmentation: " + ", ".join(tasks.SegmentationTask.datasets.names())
                        + "; classification: " + ", ".join(tasks.ClassificationTask.datasets.names()))
    g.add_argument("--dataset_path", default=None,
                   help="segmentation: a VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/); "
                        "classification: an image folder (root/<class>/<image>), train/ and val/ folders, or "
                        "train.txt and val.txt lists; default: the task's built-in data, generated on first use")
    g.add_argument("--data_cache", default=os.environ.get("AILAB_DATA", os.path.expanduser("~/.cache/ailab")),
                   help="where the built-in data is generated (env AILAB_DATA)")
    g.add_argument("--train_split", default="train", help="segmentation: list file ImageSets/Segmentation/<split>.txt; "
                                                          "classification: the split's name")
    g.add_argument("--val_split", default="val")
    g.add_argument("--hflip_prob", type=float, default=0.5)
    g.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    add_loader_args(g)
    g.add_argument("--dataset_kwargs", type=config.json_table, default=None, metavar="JSON",
                   help="keyword arguments of a dataset registered with DATASETS.register_module()")
    g.add_argument("--val_dataset_kwargs", type=config.json_table, default=None, metavar="JSON",
                   help="the same for the validation split; default: --dataset_kwargs")
    g.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="the class names in label order; the run stops if the data's differ")
    tasks.add_task_args(p)

    g = models.add_model_args(p)
    g.add_argument("--freeze_bn", action="store_true", help="keep batch-norm layers in eval mode while training")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=8)
    g.add_argument("--batchsize", type=int, default=8, help="images per process per step")
    g.add_argument("--val_batchsize", type=int, default=None,
                   help="validation images per process per step (>1 needs images of one size); default: 8 for the "
                        "built-in data, whose images share one size, else 1")
    g.add_argument("--lr", type=float, default=0.001, help="base LR for one process; scaled by --lr_scaling")
    g.add_argument("--lr_scaling", default="linear", choices=["linear", "none"],
                   help="linear: effective LR = --lr x number of processes")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw learns the built-in data from scratch faster than sgd (README: Performance); "
                        "classification's default is sgd")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="L2 for sgd and adam, decoupled for adamw")
    g.add_argument("--no_decay_norm_bias", action="store_true",
                   help="no weight decay for normalisation-layer parameters and biases")
    g.add_argument("--backbone_lr_mult", type=float, default=1.0,
                   help="LR multiplier for the parameters under model.backbone")
    g.add_argument("--lr_scheduler", default="poly", choices=SCHEDULERS,
                   help="LR after warmup: poly and cosine decay to --min_lr at the end of the run, step and "
                        "multistep multiply by --gamma at epochs, constant keeps it")
    g.add_argument("--lr_update_policy", default="iter", choices=UPDATE_POLICIES,
                   help="iter: the LR changes every step; epoch: it changes only when an epoch starts")
    g.add_argument("--warmup_epochs", type=float, default=0.5, help="linear warmup length (may be fractional)")
    g.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="warmup starts at this fraction of the LR (unless --warmup_lr is given)")
    g.add_argument("--warmup_lr", type=float, default=None,
                   help="absolute LR at the start of warmup, not scaled by --lr_scaling")
    g.add_argument("--min_lr", type=float, default=0.0, help="the LR poly and cosine decay to (absolute)")
    g.add_argument("--poly_power", type=float, default=0.9)
    g.add_argument("--step_size", type=int, default=None, help="step: multiply the LR by --gamma every N epochs")
    g.add_argument("--milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                   help="multistep: multiply the LR by --gamma at each of these epochs")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor of step and multistep")
    g.add_argument("--loss", nargs="+", default=["ce", "dice"], metavar="NAME[:WEIGHT]",
                   help="weighted sum of registered losses: " + ", ".join(LOSSES.names()))
    g.add_argument("--loss_kwargs", type=config.json_table, default=None, metavar="JSON",
                   help="{loss name: keyword arguments} for losses registered with LOSSES.register_module()")
    g.add_argument("--focal_gamma", type=float, default=FOCAL_GAMMA,
                   help="focusing exponent of the focal loss (0: cross-entropy)")
    g.add_argument("--best_metric", default=None,
                   help="the val metric that picks best.pth and drives early stopping (higher is better); "
                        "default: the task's (segmentation miou, classification top1)")
    g.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="the val metrics the epoch log line shows (accuracy, precision, recall, f1 or any metric "
                        "name); every metric is still recorded; default: the task's")

    g = p.add_argument_group("run")
    g.add_argument("--logdir", default=None,
                   help="the run folder; default OUTPUT_DIR/RUN_NAME-RUN_ID, or the --resume checkpoint's folder")
    g.add_argument("--output_dir", default="runs", help="where new run folders are made")
    g.add_argument("--run_name", default=None, help="first part of a new run folder's name; default MODEL-rLAYERS")
    g.add_argument("--run_id", default=None, help="second part; default the start time (--stamp_format)")
    g.add_argument("--stamp_format", default="%Y%m%d-%H%M%S", help="strftime format of that start time")
    g.add_argument("--log_dir", default=None, help="folder of train.log; default the run folder")
    g.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="level of rank 0's log (other ranks log warnings and errors)")
    g.add_argument("--log_format", default=None,
                   help="logging format of rank 0's lines, e.g. '%%(asctime)s %%(levelname)s | %%(message)s'")
    checkpoint.add_checkpoint_args(g)
    faults.add_fault_args(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log_interval", type=int, default=10, help="log a training line every N steps (0: never)")
    add_plugin_arg(g)
    g.add_argument("--limit_batches", type=int, default=None,
                   help="at most N training and N validation batches per epoch (smoke tests)")
    recipe.add_recipe_args(p)
    add_monitor_args(p)
    distributed.add_dist_args(p)
    return p


def main(args):
    started = time.time()
    import_plugins(args.plugin)
    ctx = distributed.init_distributed(args)
    named_logdir = args.logdir is not None
    if not named_logdir:
        # train_torchrun.sh exports one stamp, so a worker group restarted by torchrun finds the same folder.
        stamp = args.run_id or os.environ.get("AILAB_RUN_STAMP") or time.strftime(args.stamp_format)
        args.logdir = (checkpoint.resume_logdir(args.resume, args.logdir) or os.path.join(
            args.output_dir, f"{args.run_name or f'{args.model_type}-r{args.layers}'}-{stamp}"))
        args.logdir = distributed.broadcast_object(args.logdir)  # rank 0's clock names the folder
    # A checkpoint to resume is read and checked before anything is written, so a bad one changes nothing.
    # Its settings are already this run's defaults (checkpoint.saved_settings, at parse time).
    resume_path, ckpt = checkpoint.find_resume(args.resume, args.logdir)
    checkpoint.agree_on_resume(args.resume, resume_path, ckpt)  # a machine without the checkpoint stops all
    changed = checkpoint.check_settings(ckpt, args, resume_path) if ckpt is not None else []
    recipe.check_recipe_args(args)
    checkpoint.check_save_args(args)
    build_train_loader, build_eval_loader = loader_builders(args, ctx, args.task)  # --loader dali: is DALI there?
    log = utils.setup_logging(ctx, os.path.join(args.log_dir or args.logdir, "train.log") if ctx.is_main else None,
                              args.log_level, args.log_format)
    if changed:
        log.warning(f"resuming {resume_path} with settings changed from the checkpoint's: {'; '.join(changed)}")
    lr = utils.scaled_lr(args, ctx.world_size)
    log.info(f"{ctx.world_size} process(es) on {ctx.device} (backend {ctx.backend or 'none'}); logdir {args.logdir}")
    log.info(f"lr {args.lr:g} × {ctx.world_size} processes = {lr:g}" if args.lr_scaling == "linear"
             else f"lr {lr:g} (not scaled by the {ctx.world_size} processes)")
    log.info(f"batch {args.batchsize} per process × {ctx.world_size} = {args.batchsize * ctx.world_size} per step")

    # Published weights by name come before the data, whose normalisation follows them; a machine fetches them once.
    task = tasks.get_task(args.task)
    weights = pretrained_state = None
    if args.pretrained and ckpt is None and model_weights.is_weights_name(args.pretrained):
        weights = model_weights.resolve(args.pretrained, task.weights_arch(args), args.model_type)
        pretrained_state = model_weights.fetch(weights, ctx)
    normalisation = task.resolve_normalisation(args, weights)
    if normalisation:
        log.info(normalisation)

    # Data: the built-in set is generated once per machine by local rank 0 while the others wait.
    if args.classes and args.numclasses is None:
        args.numclasses = len(args.classes)
    if components.is_component(args.dataset):  # a class registered with DATASETS.register_module() (seed 001)
        (train_set, val_set), class_names = components.prepare(args)
        root = f"{args.dataset}({args.dataset_kwargs or {}})"
    else:
        root, class_names = task.prepare_data(args, ctx)
        train_set, val_set = task.build_datasets(args, root)
    check_classes(args.classes, class_names)
    best_name = check_best_metric(args, task)
    best_label = task.labels.get(best_name, best_name)
    shown = shown_metrics(args.metrics, task, args)  # what the epoch line reports
    train_loader, train_sampler = build_train_loader(train_set, args.batchsize, args.workers, ctx.rank,
                                                     ctx.world_size, args.seed, collate_fn=task.train_collate(args))
    if args.val_batchsize is None:  # padding to a batch's largest image would change a segmentation's predictions
        args.val_batchsize = 8 if args.dataset_path is None and not components.is_component(args.dataset) else 1
    val_loader = build_eval_loader(val_set, args.val_batchsize, args.workers, ctx.rank, ctx.world_size,
                                   collate_fn=task.eval_collate)
    log.info(f"{task.name} data {root}: {len(train_set)} train / {len(val_set)} val images, "
             f"{args.numclasses} classes; {len(train_loader)} steps per epoch")
    log.info(describe_loader(args, ctx))

    # Model: the same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
    # Weights: a resumed checkpoint (below) wins over --pretrained, which wins over random init.
    recipe.setup_determinism(args.deterministic, ctx.device)
    utils.seed_everything(args.seed)
    model = task.build_model(args)
    criterion = task.build_criterion(args, model).to(ctx.device)  # a registered loss may hold tensors
    if args.pretrained and ckpt is None:
        source = model_weights.weights_label(weights) if weights else args.pretrained
        log.info(task.load_pretrained(model, source, args.strict_load, pretrained_state))
        pretrained_state = None  # the model holds the weights now
    if args.freeze:
        tensors, elements = recipe.freeze(model, args.freeze)
        log.info(f"froze {tensors} parameter tensors ({elements / 1e6:.2f} M values) matching {' '.join(args.freeze)}")
    if args.sync_bn:
        model = recipe.convert_sync_bn(model, ctx)
    model = model.to(ctx.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    model_without_ddp = model
    ema = recipe.build_ema(model, args.ema_decay) if args.ema_decay else None
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if args.compile:
        model = recipe.CompileFallback(model)
    amp = recipe.setup_amp(args, ctx.device)
    optimizer = build_optimizer(args, model_without_ddp, lr)
    log.info(describe_optimizer(optimizer))
    log.info(f"model {task.describe_model(model_without_ddp, args)}; {amp.describe()}"
             + (f"; EMA decay {args.ema_decay:g}" if ema else ""))
    steps_per_epoch = updates_per_epoch(min(len(train_loader), args.limit_batches or len(train_loader)),
                                        args.accum_steps)

    def lr_fn(step):
        return lr_at(step, steps_per_epoch, args, lr)

    # Resume: weights, optimizer, scaler, EMA and counters; the position inside the epoch; each rank's RNG.
    start_epoch, first_batch, step, best_score, best_epoch, nan_skips = 0, 0, 0, -1.0, 0, 0
    stopper = recipe.EarlyStopping(args.early_stop_patience, args.early_stop_min_delta)
    if ckpt is not None:
        model_without_ddp.load_state_dict(utils.unwrap_state_dict(ckpt["model"]))
        load_optimizer_state(optimizer, ckpt, resume_path)
        if amp.scaler.is_enabled() and ckpt.get("scaler"):
            amp.scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            recipe.load_ema(ema, ckpt["ema"] if "ema" in ckpt else model_without_ddp.state_dict())
        if "early_stop" in ckpt:
            stopper.load_state_dict(ckpt["early_stop"])
        start_epoch, first_batch, step, exact = checkpoint.plan_resume(ckpt, resume_path, args, ctx,
                                                                       steps_per_epoch, args.resume_strict)
        best_score, best_epoch = ckpt.get("best_score", ckpt.get("best_miou")), ckpt.get("best_epoch", 0)
        nan_skips = ckpt.get("nan_skips", 0)
        log.info(f"resumed from {resume_path}: epoch {start_epoch + 1}, batch {first_batch}, step {step}"
                 f"{'' if exact else ' (approximate position)'}; best {best_label} {best_score:.4f}")
    config_text = config.to_toml(args, get_args_parser())
    log.info("resolved configuration:\n" + config_text.rstrip())
    if ctx.is_main:
        os.makedirs(args.logdir, exist_ok=True)  # (train.log may be elsewhere: --log_dir)
        config.write_config(config_text, os.path.join(args.logdir, "config.toml"))
        if not named_logdir:
            utils.link_latest(args.logdir)
    recorder = Recorder(args, ctx, config_text)
    gpu_monitor = GpuMonitor(args, ctx)
    utils.seed_everything(args.seed + ctx.rank)  # augmentation is seeded per sample; this is for the rest
    if ckpt is not None and exact and len(ckpt.get("rng", [])) == ctx.world_size:
        checkpoint.set_rng_state(ckpt["rng"][ctx.rank], ctx.device)
    guard = faults.Guard(args, nan_skips)

    def save(names, epoch, batch, step, done_epoch, val=None):
        """Every rank gathers its RNG state; rank 0 writes the training state to each name in --logdir."""
        rng = checkpoint.gather_rng_states(ctx.device)
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": done_epoch, "resume_at": {"epoch": epoch, "batch": batch, "step": step},
                 "best_score": best_score, "best_metric": best_name, "best_epoch": best_epoch, "val": val, "args": vars(args),
                 "world_size": ctx.world_size, "class_names": class_names, "early_stop": stopper.state_dict(),
                 "nan_skips": guard.nan_skips, "rng": rng,
                 **({"scaler": amp.scaler.state_dict()} if amp.scaler.is_enabled() else {}),
                 **({"ema": recipe.ema_state(ema)} if ema else {})}
        checkpoint.save_on_rank0(ctx, state, [os.path.join(args.logdir, name) for name in names])

    recovery_every = args.recovery_interval or checkpoint.steps_every(args.recovery_period, steps_per_epoch)
    last_every = checkpoint.steps_every(args.save_period, steps_per_epoch) if (args.save_period or 1) < 1 else None

    def on_update(step, batches_done):
        if ema is not None:
            ema.update_parameters(model_without_ddp)
        names = ([checkpoint.RECOVERY] if recovery_every and step % recovery_every == 0 else []) + (
            [checkpoint.LAST] if last_every and step % last_every == 0 else [])
        if names:
            save(names, epoch, batches_done, step, epoch - 1)

    run = Run(model, criterion, optimizer, amp, guard, recorder, ctx, args, lr_fn, on_update)
    rates, val = [], None
    try:
        for epoch in range(start_epoch, args.epochs):
            train_sampler.set_epoch(epoch, first_batch)
            train, step = train_one_epoch(run, train_loader, epoch, step, first_batch)
            first_batch = 0
            # Without SyncBN each rank's batch-norm statistics differ after its last step: every rank scores
            # rank 0's, the ones the checkpoint saves (DDP copies them again before the next training step).
            distributed.broadcast_tensors([*model_without_ddp.buffers(), *(ema.module.buffers() if ema else ())])
            predict = functools.partial(task.predict, options=PredictOptions(amp_dtype=amp.dtype))

            def validate(net):
                return evaluate(net, val_loader, task.new_metric(args.numclasses, ctx.device, args), predict,
                                limit=args.limit_batches, progress=show_progress(ctx, args))

            val = validate(model_without_ddp)
            if ema is not None:  # the EMA weights are the ones kept, so they pick best.pth and early stopping
                val = {**validate(ema.module), f"raw_{best_name}": val[best_name]}
            improved = val[best_name] > best_score
            best_score, best_epoch = (val[best_name], epoch + 1) if improved else (best_score, best_epoch)
            stop = distributed.broadcast_object(stopper.update(val[best_name], epoch + 1))  # all ranks stop together
            rates.append(train["images_per_s"])
            log.info(f"epoch {epoch + 1}/{args.epochs}: train loss {train['loss']:.4f}, val "
                     + headline(val, shown) + (" (EMA weights)" if ema else "")
                     + f", {train['images_per_s']:.1f} img/s" + (" (best)" if improved else "")
                     + (f"; skipped {train['skipped_images']} unreadable images" if train["skipped_images"] else ""))
            record_epoch(recorder, epoch + 1, step, train, val, class_names)
            if ctx.is_main and args.vis_interval and (epoch + 1) % args.vis_interval == 0:
                recorder.image("val/predictions", task.prediction_grid(ema.module if ema else model_without_ddp,
                                                                        val_set, args.vis_images, ctx.device,
                                                                        class_names), epoch + 1)
            save(checkpoint.saved_at_epoch_end(args, epoch + 1, args.epochs)
                 + ([checkpoint.BEST] if improved and not args.no_save_best else []), epoch + 1, 0, step, epoch, val)
            if ctx.is_main and args.keep_last:
                checkpoint.prune_periodic(args.logdir, args.keep_last)
            if stop:
                log.info(stopper.reason(f"val {best_label}") + f"; stopped after epoch {epoch + 1} of {args.epochs}")
                break
    except faults.Stop as stop:
        # A signal stops right after an update, a non-finite loss right before its group's update (the group
        # dropped, batch-norm statistics rolled back): either way the state is exactly the one at `stop.step`.
        save([checkpoint.RECOVERY], stop.epoch, stop.batch, stop.step, stop.epoch - 1)
        where = os.path.join(args.logdir, checkpoint.RECOVERY)
        message = f"{stop}; wrote {where}; continue with --resume auto --logdir {args.logdir}"
        if stop.exit_code == 2:
            raise utils.UserError(message) from None
        log.error(message if ctx.is_main else str(stop))  # every rank says why it stops
        distributed.cleanup_distributed()
        sys.exit(stop.exit_code)
    else:
        recorder.close(hparams=vars(args), metrics={f"hparams/best_{best_name}": best_score})
    finally:  # on every way out (a signal, a non-finite loss, an error) the records reach the disk
        guard.restore()
        gpu_monitor.stop()
        recorder.close()

    rss, gpu = peak_memory()
    log.info(f"done in {time.time() - started:.0f} s: best val {best_label} {best_score:.4f} at epoch {best_epoch}"
             + (f"; last epoch val {headline(val, shown)}" if rates else "")
             + (f"; mean {sum(rates) / len(rates):.1f} img/s" if rates else "")
             + f"; peak memory {rss:.0f} MiB RSS" + (f", {gpu:.0f} MiB GPU" if gpu else "")
             + f"; checkpoints {os.path.join(args.logdir, 'best.pth')} and {os.path.join(args.logdir, 'last.pth')}")
    distributed.cleanup_distributed()


def check_best_metric(args, task):
    """The name of the metric that picks best.pth, checked against the task's metrics before any training."""
    name = args.best_metric or task.primary
    known = list(task.metric_names(args))
    if name not in known:
        raise utils.UserError(f"--best_metric {name!r} is not a {task.name} metric; expected one of {', '.join(known)}")
    return name


def check_classes(expected, found):
    """--classes (seed 002's `classes`) declares the class names in label order; the data must have exactly those."""
    if expected and list(expected) != list(found):
        raise utils.UserError(f"--classes {' '.join(expected)}: the data's classes are {' '.join(found)}; expected "
                              f"the same names in the same (label) order")


def record_epoch(recorder, epoch, step, train, val, class_names):
    """One epoch's numbers to TensorBoard/W&B, events.jsonl and a row of summary.csv, all derived from the
    metrics dict."""
    memory = memory_scalars()
    scalars = {"epoch/train_loss": train["loss"], **{f"epoch/train_loss_{k}": v for k, v in train["terms"].items()},
               "epoch/lr": train["lr"], "epoch/images_per_s": train["images_per_s"],
               "epoch/data_wait": train["data_wait"], **record_scalars(val, class_names), **memory,
               **({"epoch/skipped_images": train["skipped_images"]} if train.get("skipped_images") else {})}
    recorder.scalars(scalars, epoch)
    recorder.event({"epoch": epoch, "step": step, "time": time.time(), **scalars})
    recorder.epoch_row({"epoch": epoch, "lr": f"{train['lr']:.6g}", "train_loss": f"{train['loss']:.6f}",
                        **{f"train_loss_{k}": f"{v:.6f}" for k, v in train["terms"].items()},
                        **record_row(val, class_names), "epoch_time": f"{train['time']:.2f}",
                        "images_per_s": f"{train['images_per_s']:.2f}", "data_wait": f"{train['data_wait']:.3f}",
                        **{name.split("/")[1]: f"{v:.1f}" for name, v in memory.items()}})


def cli(argv=None, cfg=None):
    """The command line (main.py runs it too; ailab.ailab_train gives a cfg dict in place of --config)."""
    run_entry(main, get_args_parser(), argv, saved_settings=checkpoint.saved_settings, task_defaults=tasks.task_defaults,
              cfg=cfg)


if __name__ == "__main__":
    cli()
