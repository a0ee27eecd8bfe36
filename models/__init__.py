"""Model registry: `--model_type` name -> builder(args) -> nn.Module."""
import argparse

from registry import Registry
from utils import UserError, load_checkpoint, unwrap_state_dict

MODELS = Registry("model")
register_model = MODELS.register


def build_model(args):
    """Build the model named by args.model_type; builders read args.layers, numclasses, output_stride, head_channels."""
    return MODELS.get(args.model_type)(args)


def load_from_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) from a train.py checkpoint, whose args name the model."""
    ckpt = load_checkpoint(path)
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
