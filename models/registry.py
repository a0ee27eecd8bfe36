"""The model registry: `--model_type` name -> builder(args) -> nn.Module, the model flags, and rebuilding a model
from a checkpoint (tasks.load_from_checkpoint)."""
from core.config import json_table
from core.registry import Registry, check_no_kwargs

MODELS = Registry("model")
register_model = MODELS.register


def describe_model(model, args):
    """A short architecture line: name, ResNet depth and output stride where the model has them."""
    backbone = getattr(model, "backbone", None)
    parts = [args.model_type]
    if hasattr(backbone, "output_stride") and hasattr(backbone, "layer4"):
        parts.append(f"ResNet-{args.layers} OS{backbone.output_stride}")
    return " ".join(parts) + f": {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"


def build_model(args):
    """Build the model named by args.model_type; builders read args.layers, numclasses, output_stride, head_channels.
    A model registered with MODELS.register_module() is built from --model_kwargs instead."""
    kwargs = getattr(args, "model_kwargs", None) or {}
    if MODELS.takes_kwargs(args.model_type):
        return MODELS.build(args.model_type, kwargs, "--model_kwargs")
    check_no_kwargs(kwargs, "--model_kwargs", f"model {args.model_type}", allowed={"num_classes"})
    return MODELS.get(args.model_type)(args)


def add_model_args(parser, training=True):
    """The flags that define a model. Outside training they default to the checkpoint's values."""
    g = parser.add_argument_group("model")
    default = (lambda value: value) if training else (lambda value: None)
    g.add_argument("--model_type", default=default("deeplabv3p"),
                   help="registered model name: " + ", ".join(MODELS.names()) + ", or one from a --plugin")
    g.add_argument("--layers", type=int, default=default(18), choices=[18, 34, 50, 101, 152],
                   help="ResNet depth of the backbone; unet_plain has no ResNet and ignores it")
    g.add_argument("--numclasses", type=int, default=None,
                   help="classes including background; default 5 for the built-in data, 21 for a --dataset_path (VOC)"
                   if training else "default: the checkpoint's")
    g.add_argument("--output_stride", type=int, default=None, choices=[8, 16, 32],
                   help="stride of the DeepLab models' deep features: 8 or 16 dilate the ResNet (sharper, slower), 32 "
                   "keeps it as built; " + ("default 32 for deeplabv3p (its decoder adds the stride-4 features), 16 "
                   "for the others; unet and unet_plain ignore it (their encoder strides are fixed)" if training
                   else "default: the checkpoint's"))
    if training:
        g.add_argument("--model_kwargs", type=json_table, default=None, metavar="JSON",
                       help="keyword arguments of a model registered with MODELS.register_module(), e.g. "
                            "'{\"width\": 32}' (a table in a config file)")
    g.add_argument("--head_channels", type=int, default=default(128),
                   help="width of the ASPP and decoder convolutions; the UNets' decoder stages are 2x, 1x, 1/2 and "
                   "1/4 of it wide, deepest first, and unet_plain's encoder starts at 1/4 of it")
    return g


def add_weights_arg(group):
    group.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                       help="which weights of the checkpoint: auto (the EMA weights when it has them, as they are "
                            "the ones whose val mIoU train.py logged and chose best.pth by; else the raw ones), "
                            "ema, or raw")
    group.add_argument("--ema", dest="weights", action="store_const", const="ema", help="same as --weights ema")
