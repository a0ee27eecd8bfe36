"""Models: the registry (models/registry.py), ResNet backbones, segmentation heads, classifiers and losses.

Importing the package registers the built-in models; a --plugin registers more with `register_model`.
"""
from models import deeplab, lorm, unet  # noqa: F401 - they register the built-in models
from models.registry import (MODELS, add_model_args, add_weights_arg, build_model, describe_model,  # noqa: F401
                             register_model)
from models.unet import WITHOUT_RESNET  # noqa: F401
