"""Model registry: `--model_type` name -> builder(args) -> nn.Module."""
import argparse

from registry import Registry, import_plugins
from utils import UserError, check_compatible, load_checkpoint, unwrap_state_dict

MODELS = Registry("model")
register_model = MODELS.register


def build_model(args):
    """Build the model named by args.model_type; builders read args.layers, numclasses, output_stride, head_channels."""
    return MODELS.get(args.model_type)(args)


def add_model_args(parser, training=True):
    """The flags that define a model. Outside training they default to the checkpoint's values."""
    g = parser.add_argument_group("model")
    default = (lambda value: value) if training else (lambda value: None)
    g.add_argument("--model_type", default=default("deeplabv3p"),
                   help="registered model name: " + ", ".join(MODELS.names()) + ", or one from a --plugin")
    g.add_argument("--layers", type=int, default=default(18), choices=[18, 34, 50, 101, 152], help="ResNet depth")
    g.add_argument("--numclasses", type=int, default=None,
                   help="classes including background; default 5 for the built-in data, 21 for a --dataset_path (VOC)"
                   if training else "default: the checkpoint's")
    g.add_argument("--output_stride", type=int, default=default(16), choices=[8, 16])
    g.add_argument("--head_channels", type=int, default=default(128),
                   help="width of the ASPP and decoder convolutions")
    return g


def load_from_checkpoint(path, device="cpu", args=None):
    """(model in eval mode on `device`, checkpoint dict) from a train.py checkpoint.

    The checkpoint's args name the model; a model flag given in `args` must agree with them.
    """
    ckpt = load_checkpoint(path)
    import_plugins(ckpt["args"].get("plugin"))  # a model from a plugin needs that plugin to be rebuilt
    if args is not None:
        check_compatible(ckpt, args, path)
    args = argparse.Namespace(**ckpt["args"])
    model = build_model(args)
    try:
        model.load_state_dict(unwrap_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit model {args.model_type} ResNet-{args.layers}: "
                        f"{str(e).splitlines()[0]}") from e
    return model.to(device).eval(), ckpt


# Imported after MODELS exists: these modules register the built-in models with it.
from models import deeplab  # noqa: E402,F401
