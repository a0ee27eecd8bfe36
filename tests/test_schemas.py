"""The source documents' config formats: seed 002's DDP TOML schema (with main.py --task train|test|predict),
seed 001's cfg dict (config.py, register_module() components, ailab_train) and seed 000's configs/train.yaml."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import tasks
import train
from conftest import ROOT, free_port, run, torchrun
from core import config
from core.registry import Registry
from engine import checkpoint
from test_classification import cls_data  # noqa: F401 - the fixture
from utils import UserError

SCHEMAS = os.path.join(ROOT, "tests", "schemas")


def entry(name):
    """test.py or infer.py as a module (the name `test` is also the standard library's test package)."""
    spec = importlib.util.spec_from_file_location(f"ailab_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

SEED002 = os.path.join(SCHEMAS, "seed002_full.toml")


def parse(argv, script=train):
    return config.parse_args(script.get_args_parser(), argv,
                             task_defaults=tasks.task_defaults if script is train else None)


def seed002_example(tmp_path, pretrained_line="pretrained = false"):
    """Seed 002's fragments (tests/schemas/seed002_full.toml), with the dataset's `ref` file next to them; its
    `pretrained = true` (the DEFAULT weights, test_weights.py) becomes `pretrained_line`."""
    text = open(SEED002).read().replace("pretrained = true ", pretrained_line + " ")
    (tmp_path / "custom.yaml").write_text("num_samples: 100\n")
    path = tmp_path / "seed002.toml"
    path.write_text(text)
    return str(path)


def test_seed002_every_key_resolves_to_its_documented_meaning(tmp_path):
    a = parse(["--config", seed002_example(tmp_path)])
    assert (a.output_dir, a.run_name, a.wandb_entity, a.run_id, a.device, a.seed) == (
        "./runs", "DDP_Training", "Lab", None, "cuda", 42)
    assert (a.classes, a.metrics, a.task) == (["class_0", "class_1"], ["accuracy", "precision"], "classification")
    assert (a.distributed, a.log_level, a.model_type, a.resume, a.pretrained) == (True, "INFO", "resnet18", None, None)
    assert (a.numclasses, a.image_size, a.loss) == (10, 224, ["ce:1.0"])
    # [transform] is the pipeline: RESIZE resizes the whole image, and what it lists is on with its values
    assert (a.train_crop, a.hflip_prob, a.vflip_prob, a.rotation, a.color_jitter) == (
        "resize", 0.5, 0.1, 10.0, [0.0, 0.0, 0.0, 0.0])
    assert (a.mean, a.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (a.dataset, a.dataset_path, a.dataset_kwargs) == ("CustomDataset", "./data", {"num_samples": 100})
    assert (a.split_ratio, a.split_seed, a.workers) == ([0.8, 0.1, 0.1], 42, 4)
    assert (a.batchsize, a.epochs, a.save_period, a.recovery_period, a.accum_steps) == (32, 100, 0.1, 0.1, 1)
    assert (a.optimizer, a.lr, a.weight_decay) == ("adamw", 1e-3, 1e-4)
    assert (a.lr_scheduler, a.warmup_epochs, a.warmup_lr, a.lr_update_policy) == ("cosine", 10, 1e-5, "epoch")
    assert (a.amp, a.amp_dtype, a.early_stop_patience, a.early_stop_min_delta) == (True, "float16", 10, 0.001)
    assert (a.val_batchsize, a.wandb, a.stamp_format) == (32, False, "%Y-%m-%d %H_%M_%S")
    assert a.log_format == "%(asctime)s %(levelname)s | %(name)s | %(message)s"
    assert (a.save_interval, a.no_save_best, a.no_save_last) == (10, False, False)
    assert config.given_as(a, "epochs") == f"'train.epoch' in {tmp_path / 'seed002.toml'} (--epochs 100)"


def test_seed002_trains_a_classifier_unless_postprocess_says_otherwise(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nbatch_size = 8\n')
    assert parse(["--config", str(path)]).task == "classification"
    path.write_text('postprocess = "segmentation"\n[train]\nbatch_size = 8\n[transform]\nHFLIP = [0.25]\n')
    a = parse(["--config", str(path)])
    assert (a.task, a.hflip_prob, a.batchsize) == ("segmentation", 0.25, 8)
    assert parse(["--config", str(path), "--task", "classification"]).task == "classification"  # the flag wins


def test_seed002_test_and_predict_take_their_sections_and_skip_training(tmp_path):
    path = seed002_example(tmp_path)
    t = parse(["--config", path, "--checkpoint", "x.pth"], entry("test"))
    assert (t.batchsize, t.dataset_path, t.device) == (32, "./data", "cuda")
    p = parse(["--config", path, "--checkpoint", "x.pth"], entry("infer"))
    assert (p.input, p.save_overlay, p.save_csv) == ("data/test", True, False)


@pytest.mark.parametrize("text, message", [
    ('task = "x"\n[train]\nepoch = 3\nepochs = 4\n', "key 'epochs' appears twice in {path} (as 'train.epoch' and "
                                                      "'train.epochs')"),
    ('[train]\nbatch_size = 8\nepoc = 3\n', "unknown key 'train.epoc' in {path} (read as seed 002's schema); "
                                             "did you mean 'train.epoch'"),
    ('[train]\nepoc = 3\n', "unknown key 'train.epoc' in {path}; did you mean 'epochs'? (or, in seed 002's schema, "
                            "'train.epoch'"),
    ('[train]\nepoch = "ten"\n', "'train.epoch' in {path}: 'ten' is not a valid int"),
    ('[model]\nname = "resnet18"\n[model.config]\narch = "resnet50"\n',
     "'model.config.arch' in {path}: 'resnet50' contradicts model.name 'resnet18'"),
    ('[train]\nsave_period = 0.5\n[output]\nsave_last = false\n',
     "'train.save_period' in {path}: contradicts output.save_last = false"),
    ('[dataloader]\nshuffle = false\n', "'dataloader.shuffle' in {path}: False: training batches are always shuffled"),
    ('[train.scaler]\ncompute_type = "int8"\n', "'train.scaler.compute_type' in {path}: 'int8' is not a known "
                                                "compute type"),
    ('postprocess = "classification"\n[transform]\nHFLIP = [0.5, 0.2]\n',
     "'transform.HFLIP' in {path}: [0.5, 0.2] has 2 values; expected one"),
    ('postprocess = "segmentation"\n[transform]\nROTATION = [10]\n',
     "'transform.ROTATION' in {path}: segmentation trains on random scaled crops"),
    ('task = "classification"\n[train]\nbatch_size = 8\n', "'task' in {path}: 'classification' is the run's name in "
                                                           "seed 002's schema"),
    ('[model.config]\nn_channels = 1\n', "'model.config.n_channels' in {path}: 1: the suite's models read 3-channel"),
    ('postprocess = "detection"\n', "'postprocess' in {path}: 'detection' is not a postprocess the suite has"),
    ('total_epochs = 3\n[train]\nbatch_size = 8\n', "the keys mix seed 001's schema ('total_epochs') and seed 002's "
                                                    "('train.batch_size')"),
    ('[dataset]\nref = "missing.yaml"\n', "'dataset.ref' in {path}: missing.yaml does not exist"),
])
def test_seed002_bad_keys_get_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = run(["train.py", "--config", str(path)], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: " + message.format(path=path)), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


SHIPPED = sorted(os.listdir(os.path.join(ROOT, "configs")))


def comparable(args):
    out = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    out["loss"] = [s if ":" in s else f"{s}:1.0" for s in out["loss"]]
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_print_config_002_reads_back_as_the_same_flags(tmp_path, capsys, name):
    path = os.path.join(ROOT, "configs", name)
    train.cli(["--config", path, "--print_config", "002"])
    printed = capsys.readouterr().out
    table = tomllib.loads(printed)
    assert "postprocess" in table and "train" in table and "criterion" in table
    (tmp_path / "p.toml").write_text(printed)
    assert comparable(parse(["--config", str(tmp_path / "p.toml")])) == comparable(parse(["--config", path]))


def test_the_four_ddp_configs_are_in_seed_002s_schema():
    for name in ("ddp_example.toml", "ddp_segmentation.toml", "ddp_large_model.toml", "ddp_quick_test.toml"):
        table = tomllib.load(open(os.path.join(ROOT, "configs", name), "rb"))
        assert {"postprocess", "ddp", "model", "train"} <= set(table) and "config" in table["model"], name
        assert config.detect(table, config.flag_actions(train.get_args_parser()),
                             {k: v.MARKERS for k, v in config.SCHEMAS.items()}) == "002"


def test_main_py_runs_seed_002s_commands_train_test_predict(tmp_path, cls_data):  # noqa: F811
    path = tmp_path / "run.toml"
    path.write_text(f'''output_dir = "{tmp_path / 'runs'}"
task = "shapes"
run_id = ""
device = "cpu"
postprocess = "classification"
[ddp]
enabled = true
[model]
name = "resnet18"
[model.config]
n_classes = 4
input_sizes = [[1, 3, 32, 32]]
[transform]
HFLIP = [0.5]
NORMALIZE = [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
[dataset]
name = "folder"
root_dir = "{cls_data}"
[dataset.split]
type = "train_valid_test_split"
train = 0.6
valid = 0.2
test = 0.2
[dataloader]
num_workers = 0
[train]
batch_size = 4
epoch = 1
save_recovery_period = 0.5
[train.optimizer]
type = "sgd"
learning_rate = 0.01
[test]
batch_size = 8
[predict]
input = "{os.path.join(cls_data, 'circle')}"
[predict.config]
output_format = "csv"
save_images = false
[ailab]
limit_batches = 2
''')
    proc = torchrun(2, ["main.py", "--config", str(path), "--task", "train"], tmp_path=tmp_path)
    assert "2 process(es)" in proc.stdout and "val top-1" in proc.stdout
    (rundir,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("shapes-")]  # OUTPUT_DIR/TASK-RUN_ID
    assert {"best.pth", "last.pth", "recovery.pth", "split.json"} <= set(os.listdir(tmp_path / "runs" / rundir))
    proc = run(["main.py", "--config", str(path), "--task", "test"], tmp_path)
    metrics = json.load(open(tmp_path / "runs" / rundir / "test-val" / "metrics.json"))
    assert metrics["samples"] == 8 and "top1" in metrics  # the newest run's best.pth, on its saved split
    proc = run(["main.py", "--config", str(path), "--task", "predict", "--output", str(tmp_path / "out")], tmp_path)
    assert len(open(tmp_path / "out" / "predictions.jsonl").read().splitlines()) == 9
    assert os.path.exists(tmp_path / "out" / "predictions.csv")  # output_format = "csv"
    proc = run(["main.py", "--config", str(path), "--task", "deploy"], tmp_path, check=False)
    assert proc.returncode == 2 and "--task 'deploy' is not a step" in proc.stderr
    proc = run(["train.py", "--config", str(path), "--task", "train"], tmp_path, check=False)
    assert proc.returncode == 2 and "'train' is an action of main.py" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Seed 001: a cfg dict, register_module() and ailab_train
# ----------------------------------------------------------------------------------------------

def test_seed001_config_py_resolves_to_flags():
    a = parse(["--config", os.path.join(SCHEMAS, "seed001_config.py")])
    assert (a.seed, a.logdir, a.dist_backend, a.dist_url, a.task) == (42, "./work_dir", "nccl", "env://",
                                                                      "classification")
    assert (a.model_type, a.numclasses, a.model_kwargs) == ("MyModel", 3, {"num_classes": 3, "width": 8})
    assert (a.dataset, a.dataset_kwargs, a.val_dataset_kwargs) == ("MyDataset", {"size": 192, "seed": 0},
                                                                   {"size": 48, "seed": 1})
    assert (a.batchsize, a.val_batchsize, a.workers) == (16, 16, 1)
    assert (a.loss, a.loss_kwargs, a.optimizer, a.lr, a.epochs) == (["MyLoss"], {"MyLoss": {"scale": 1.0}}, "adam",
                                                                    0.01, 5)
    assert (a.log_interval, a.log_dir) == (2, "./logs")


def test_seed001_hooks_and_builtin_components(tmp_path):
    path = tmp_path / "config.py"
    path.write_text('''"""A cfg with every hook."""
epochs = 12
cfg = dict(
    total_epochs=epochs, workflow=[("train", 1), ("val", 1)], resume_from="runs/a/last.pth",
    model=dict(type="resnet50", num_classes=100),
    loss=dict(type="CrossEntropyLoss", weight=None, reduction="mean", label_smoothing=0.1),
    optimizer=dict(type="SGD", lr=0.1 / 4, momentum=0.9, weight_decay=1e-4),
    hooks=dict(logger=dict(type="LoggerHook", interval=50), checkpoint=dict(interval=2, max_keep_ckpts=3),
               tensorboard=dict(log_dir="tb_logs"), wandb=dict(project="p", entity="lab", mode="offline"),
               lr_scheduler=dict(type="CosineAnnealingLR", T_max=epochs, eta_min=1e-5),
               metrics=dict(topk=(1, 5))),
)
''')
    a = parse(["--config", str(path)])
    assert (a.epochs, a.resume, a.model_type, a.numclasses, a.loss, a.label_smoothing) == (
        12, "runs/a/last.pth", "resnet50", 100, ["ce"], 0.1)
    assert (a.optimizer, a.lr, a.momentum, a.weight_decay) == ("sgd", 0.025, 0.9, 1e-4)
    assert (a.log_interval, a.save_interval, a.keep_last, a.tb_dir) == (50, 2, 3, "tb_logs")
    assert (a.wandb, a.wandb_project, a.wandb_entity, a.wandb_mode) == (True, "p", "lab", "offline")
    assert (a.lr_scheduler, a.min_lr, a.topk) == ("cosine", 1e-5, 5)
    path.write_text(path.read_text().replace("T_max=epochs", "T_max=10"))
    with pytest.raises(UserError, match="'hooks.lr_scheduler.T_max' in .*: 10 differs from total_epochs"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("text, message", [
    ("import os\ncfg = dict(work_dir=os.getcwd())\n", "line 1: a Import statement; expected only assignments"),
    ("cfg = dict(work_dir=open('x').read())\n", "line 1: a Call expression cannot be read"),
    ("cfg = dict(seed=base)\n", "line 1: the name 'base' (not assigned above) cannot be read"),
    ("config = dict(seed=1)\n", "assigns no cfg dict; expected cfg = dict(...)"),
    ("cfg = dict(workflow=[('train', 2)])\n", "'workflow' in {path}: [['train', 2]]: the suite trains one epoch"),
    ("cfg = dict(data=dict(train=dict(type='A'), val=dict(type='B')))\n", "'data.val.type' in {path}: 'B' differs"),
    ("cfg = dict(optimizer=dict(type='Lion', lr=1e-4))\n", "'optimizer.type' in {path}: 'Lion' is not a known"),
    ("cfg = dict(loss=dict(type='CrossEntropyLoss', reduction='sum'))\n",
     "'loss.reduction' in {path}: 'sum' is not read for CrossEntropyLoss"),
    ("cfg = dict(hooks=dict(profiler=dict()))\n", "unknown key 'hooks.profiler' in {path} (read as seed 001's"),
])
def test_python_configs_are_read_not_run(tmp_path, text, message):
    path = tmp_path / "config.py"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        parse(["--config", str(path)])
    assert message.format(path=path) in str(e.value) and str(path) in str(e.value)


def test_register_module_names_classes_and_checks_their_arguments():
    registry = Registry("widget")

    @registry.register_module()
    class Widget:
        def __init__(self, size, colour="red"):
            self.size, self.colour = size, colour

    @registry.register_module(name="other")
    class Gadget(Widget):
        pass

    assert registry.takes_kwargs("Widget") and registry.takes_kwargs("other") and "Gadget" not in registry
    built = registry.build("Widget", {"size": 3}, "--model_kwargs")
    assert (built.size, built.colour) == (3, "red")
    with pytest.raises(UserError, match=r"--model_kwargs: widget Widget does not take \{'colour': 'blue'\}"):
        registry.build("Widget", {"colour": "blue"}, "--model_kwargs")  # size is missing
    with pytest.raises(UserError, match="widget name 'Widget' is registered twice"):
        registry.register_module()(Widget)


def test_seed001_example_trains_under_torchrun_with_its_own_model_dataset_and_loss(tmp_path):
    """The document's user script, named train.py as it names it, and its config.py."""
    shutil.copy(os.path.join(SCHEMAS, "seed001_train.py"), tmp_path / "train.py")
    shutil.copy(os.path.join(SCHEMAS, "seed001_config.py"), tmp_path / "config.py")
    env = {"PYTHONPATH": ROOT, "AILAB_DATA": str(tmp_path / "cache")}
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(tmp_path / "train.py"), "--dist_backend", "gloo", "--device", "cpu"]
    proc = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout and "model MyModel" in proc.stdout
    summary = open(tmp_path / "work_dir" / "summary.csv").read().splitlines()
    header, last = summary[0].split(","), dict(zip(summary[0].split(","), summary[-1].split(",")))
    assert "train_loss_MyLoss" in header and len(summary) == 1 + 5  # its loss, logged; total_epochs = 5
    assert float(last["val_top1"]) > 0.9  # the classes are learnable: MyModel, MyDataset and MyLoss all took part
    assert "val_f1_green" in header  # class names from MyDataset.classes
    assert os.path.exists(tmp_path / "logs" / "train.log")  # hooks.logger.log_dir


# ----------------------------------------------------------------------------------------------
# Seed 000: configs/train.yaml and dist
# ----------------------------------------------------------------------------------------------

def test_seed000_dist_fragment_resolves(tmp_path):
    path = tmp_path / "train.yaml"  # the document's dist table, with its example values
    path.write_text("dist:\n  backend: nccl\n  world_size: 1\n  init_method: env://\n")
    a = parse(["--config", str(path)])
    assert (a.dist_backend, a.world_size, a.dist_url) == ("nccl", 1, "env://")
    path.write_text("dist:\n  backend: nccl\n  world_size: one\n")
    with pytest.raises(UserError, match=f"'dist.world_size' in {path}: 'one' is not a valid int"):
        parse(["--config", str(path)])


def test_seed000_dist_world_size_must_match_and_tcp_init_works(tmp_path, cls_data):  # noqa: F811
    text = open(os.path.join(ROOT, "configs", "train.yaml")).read()
    flags = ["--dataset_path", cls_data, "--split_ratio", "0.6", "0.2", "0.2", "--numclasses", "4", "--workers", "0",
             "--limit_batches", "2", "--epochs", "1", "--logdir", str(tmp_path / "run"), "--batchsize", "4"]
    bad = tmp_path / "three.yaml"
    bad.write_text(text.replace("# world_size: 8 ", "world_size: 3 "))
    proc = torchrun(2, ["train.py", "--config", str(bad), *flags], tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"error: 'dist.world_size' in {bad} (--world_size 3) does not match the 2 process(es)" in proc.stderr
    good = tmp_path / "tcp.yaml"
    good.write_text(text.replace("# world_size: 8 ", "world_size: 2 ").replace(
        "init_method: env://", f"init_method: tcp://127.0.0.1:{free_port()}"))
    proc = torchrun(2, ["train.py", "--config", str(good), *flags], tmp_path=tmp_path)
    assert "2 process(es)" in proc.stdout and "val top-1" in proc.stdout


def test_save_periods_in_epochs():
    assert checkpoint.steps_every(0.1, 50) == 5 and checkpoint.steps_every(0.01, 20) == 1
    args = parse(["--save_period", "2", "--save_interval", "3"])
    assert [checkpoint.saved_at_epoch_end(args, e, 5) for e in (1, 2, 3, 5)] == [
        [], ["last.pth"], ["epoch_003.pth"], ["last.pth"]]  # the last epoch always writes last.pth
    with pytest.raises(UserError, match="--save_period 1.5: expected a fraction of an epoch"):
        checkpoint.check_save_args(parse(["--save_period", "1.5"]))
