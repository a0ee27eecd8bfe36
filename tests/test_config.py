"""Config files, --set, --print_config, the saved config.toml, checkpoint defaults, registries and plugins."""
import json
import os
import re
import tomllib

import pytest

from core import config
import train
from conftest import ROOT, TINY, run, torchrun
from utils import UserError

CONTENT = {"optim": {"lr": 0.05, "scale_range": [1.0, 1.25]}, "data": {"hflip_prob": 0.2}, "epochs": 3,
           "freeze_bn": True, "layers": 34}


def write(path, text):
    path.write_text(text)
    return str(path)


def write_formats(tmp_path):
    toml = write(tmp_path / "c.toml", 'epochs = 3\nfreeze_bn = true\nlayers = 34\n[optim]\nlr = 0.05\n'
                                      'scale_range = [1.0, 1.25]\n[data]\nhflip_prob = 0.2\n')
    yaml = write(tmp_path / "c.yaml", "epochs: 3\nfreeze_bn: true\nlayers: 34\noptim:\n  lr: 0.05\n"
                                      "  scale_range: [1.0, 1.25]\ndata:\n  hflip_prob: 0.2\n")
    js = write(tmp_path / "c.json", json.dumps(CONTENT))
    return toml, yaml, js


def parse(argv):
    return config.parse_args(train.get_args_parser(), argv)


def test_each_format_sets_the_same_flags(tmp_path):
    parsed = [vars(parse(["--config", path])) for path in write_formats(tmp_path)]
    for args in parsed:
        args.pop("config")
        assert (args["lr"], args["scale_range"], args["hflip_prob"], args["epochs"], args["freeze_bn"],
                args["layers"]) == (0.05, [1.0, 1.25], 0.2, 3, True, 34)
    assert parsed[0] == parsed[1] == parsed[2]


def test_precedence_default_file_set_flag(tmp_path):
    path = write_formats(tmp_path)[0]
    default = parse([])
    assert default.lr == 0.001 and default.epochs == 8
    args = parse(["--config", path, "--set", "epochs=4", "momentum=0.8", "--epochs", "5"])
    assert args.epochs == 5            # an explicit flag beats --set and the file
    assert args.momentum == 0.8        # --set beats the default
    assert args.lr == 0.05             # the file beats the default
    assert args.weight_decay == default.weight_decay
    # explicit means typed, even when it equals the built-in default
    assert parse(["--config", path, "--lr", "0.02"]).lr == 0.02
    assert parse(["--config", path, "--set", "lr=0.07"]).lr == 0.07


def test_set_converts_like_the_file():
    args = parse(["--set", "scale_range=[0.5,2]", "freeze_bn=true", "loss=ce,ce:2", "layers=50"])
    assert args.scale_range == [0.5, 2.0] and args.freeze_bn is True and args.loss == ["ce", "ce:2"]
    assert args.layers == 50


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 0.1\n", "unknown key 'learning_rate' in {path}; did you mean 'lr'? ('learning_rate' is seed "
                              "002's 'train.optimizer.learning_rate', read as such in a file of that schema)"),
    ("[optim]\nlerning_rate = 0.1\n", "unknown key 'optim.lerning_rate' in {path}"),
    ("batch_size = 4\n", "did you mean 'batchsize'?"),
    ("layers = 20\n", "'layers' in {path}: 20 is not one of 18, 34, 50, 101, 152"),
    ("epochs = 'ten'\n", "'epochs' in {path}: 'ten' is not a valid int"),
    ("epochs = 2.5\n", "'epochs' in {path}: 2.5 is not a valid int"),
    ("freeze_bn = 1\n", "'freeze_bn' in {path}: 1 is not a boolean; expected true or false"),
    ("scale_range = [1.0]\n", "'scale_range' in {path}: [1.0] has 1 values; expected 2"),
    ("scale_range = 1.0\n", "'scale_range' in {path}: 1.0 is not a list"),
    ("lr = 0.1\n[optim]\nlr = 0.2\n", "key 'lr' appears twice in {path} (as 'lr' and 'optim.lr')"),
    ("lr = = 0.1\n", "config file {path} could not be parsed"),
    ("config = 'x.toml'\n", "'config' cannot be set in {path}"),
])
def test_config_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as e:
        parse(["--config", path])
    assert message.format(path=path) in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
    (["--config", "README.md"], "unknown extension '.md'"),
    (["--set", "lr"], "--set lr: expected KEY=VALUE"),
    (["--set", "learning_rate=0.1"], "unknown key 'learning_rate' in --set; did you mean 'lr'?"),
    (["--set", "lr=fast"], "'lr' in --set: 'fast' is not a valid float"),
    (["--set", "model_type=deeplabv3p", "lr_scaling=sqrt"], "'lr_scaling' in --set: 'sqrt' is not one of linear, none"),
])
def test_other_config_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse(argv)


def test_bad_config_exits_2_before_anything_runs(tmp_path):
    path = write(tmp_path / "bad.yaml", "learning_rate: 0.1\n")
    proc = run(["train.py", "--config", path, "--logdir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: unknown key 'learning_rate' in {path}; did you mean 'lr'?")
    assert not os.path.exists(tmp_path / "run")


def test_print_config_is_toml_of_the_resolved_flags(tmp_path):
    path = write_formats(tmp_path)[0]
    proc = run(["train.py", "--config", path, "--lr", "0.3", "--print_config"])
    printed = tomllib.loads(proc.stdout)
    assert printed["optimisation"]["lr"] == 0.3 and printed["model"]["layers"] == 34
    assert printed["segmentation"]["scale_range"] == [1.0, 1.25]
    assert "print_config" not in proc.stdout and not re.search(r"^(config|set) =", proc.stdout, re.M)


def test_saved_config_reproduces_the_run(trained):
    logdir, _ = trained
    import torch
    saved = torch.load(os.path.join(logdir, "last.pth"), weights_only=True)["args"]
    again = vars(parse(["--config", os.path.join(logdir, "config.toml")]))
    for key in config.NOT_SAVED:
        saved.pop(key, None)
        again.pop(key, None)
    assert again == saved


def test_checkpoint_supplies_model_flags_and_refuses_contradictions(tmp_path, trained, tiny_data):
    logdir, _ = trained
    ckpt = os.path.join(logdir, "best.pth")
    ok = run(["test.py", "--checkpoint", ckpt, "--layers", "18", "--save_path", str(tmp_path / "a"), "--workers", "0"])
    assert "mIoU" in ok.stdout
    proc = run(["test.py", "--checkpoint", ckpt, "--layers", "50", "--save_path", str(tmp_path / "b")], check=False)
    assert proc.returncode == 2
    assert f"checkpoint {ckpt} was trained with --layers 18, but this run asks for --layers 50" in proc.stderr
    proc = run(["infer.py", "--checkpoint", ckpt, "--numclasses", "21", "--input", os.path.join(tiny_data, "JPEGImages"),
                "--output", str(tmp_path / "c")], check=False)
    assert proc.returncode == 2 and "--numclasses 5" in proc.stderr


SHIPPED = ["seg_example.toml", "ddp_segmentation.toml", "ddp_large_model.toml", "quick_test.yaml", "quick_test.json",
           "scribble_res50_lorm.toml", "scribble_quick.toml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_parses_and_runs_a_step(tmp_path, tiny_data, name):
    path = os.path.join(ROOT, "configs", name)
    args = parse(["--config", path])
    assert args.model_type and args.layers
    # The recipe's own model; small images and one step so it fits a CPU test.
    # The built-in data's folder names, for a VOC scribble config's own.
    folders = ["--train_path", "scribble", "--pesudo_path", "pseudo"] if name.startswith("scribble") else []
    if args.layers > 18:  # a GPU recipe: every setting but the depth, so one step fits a CPU test
        folders += ["--layers", "18"]
    run(["train.py", "--config", path, "--dataset_path", tiny_data, "--numclasses", "5", "--crop_size", "64",
         "--batchsize", "2", "--epochs", "1", "--limit_batches", "1", "--workers", "0", *folders,
         "--logdir", str(tmp_path / "run")], timeout=300)
    assert os.path.exists(tmp_path / "run" / "last.pth")


def test_quick_test_config_runs_under_torchrun(tmp_path, tiny_data):
    proc = torchrun(2, ["train.py", "--config", "configs/seg_quick_test.toml", "--dataset_path", tiny_data,
                        "--numclasses", "5", "--logdir", str(tmp_path / "run")])
    assert "2 process(es)" in proc.stdout and "[2/2]" in proc.stdout
    assert os.path.exists(tmp_path / "run" / "last.pth")


def readme_plugin():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(# my_components\.py\n.*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(python train\.py --plugin my_components\.py[^\n]*)\n```", text).group(1)
    return code, command.split()[2:]


def test_readme_plugin_example_trains(tmp_path, tiny_data):
    code, flags = readme_plugin()
    assert len(code.splitlines()) <= 22
    plugin = tmp_path / "my_components.py"
    plugin.write_text(code)
    flags = [str(plugin) if f == "my_components.py" else f for f in flags]
    logdir = tmp_path / "run"
    run(["train.py", *flags, *TINY, "--dataset_path", tiny_data, "--numclasses", "5", "--logdir", str(logdir)])
    import torch
    ckpt = torch.load(logdir / "last.pth", weights_only=True)
    assert ckpt["args"]["model_type"] == "tiny_fcn" and ckpt["args"]["loss"] == ["ce", "smooth_ce:0.5"]
    assert any(k.startswith("0.") for k in ckpt["model"])  # the plugin's Sequential, not a built-in model
    # test.py rebuilds the plugin's model from the checkpoint alone
    proc = run(["test.py", "--checkpoint", str(logdir / "last.pth"), "--workers", "0",
                "--save_path", str(tmp_path / "eval")])
    assert "mIoU" in proc.stdout


@pytest.mark.parametrize("source, message", [
    ("from models import register_model\n@register_model('deeplabv3p')\ndef clash(args):\n    pass\n",
     "model name 'deeplabv3p' is registered twice"),
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError"),
    ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
])
def test_plugin_errors(tmp_path, source, message):
    plugin = write(tmp_path / "bad_plugin.py", source)
    proc = run(["train.py", "--plugin", plugin, *TINY, "--logdir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_names_list_the_known_ones(tmp_path, tiny_data):
    proc = run(["train.py", *TINY, "--model_type", "deeplab_v3p", "--dataset_path", tiny_data, "--numclasses", "5",
                "--logdir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert "unknown model 'deeplab_v3p'; did you mean 'deeplabv3p'?" in proc.stderr and "res50_ASPP" in proc.stderr
    proc = run(["train.py", *TINY, "--loss", "dicee", "--dataset_path", tiny_data, "--numclasses", "5",
                "--logdir", str(tmp_path / "run2")], check=False)
    assert proc.returncode == 2 and "unknown loss 'dicee'; did you mean 'dice'?" in proc.stderr
    assert "known: bce, ce, dice, focal, lovasz" in proc.stderr
