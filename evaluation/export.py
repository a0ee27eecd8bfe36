"""Turn a checkpoint's model into a deployable file: ONNX or TorchScript.

The exported graph is the eval-mode model (batch norm uses its running statistics) and maps a normalised
image batch N x 3 x H x W (float32, ImageNet mean/std) to class scores N x K x H x W. Batch and spatial size are
dynamic where the model allows; the file is checked against the PyTorch model before it replaces anything.
"""
import importlib.util
import logging
import os
import warnings

import numpy as np
import torch

from utils import UserError, first_line, replacing

log = logging.getLogger("ailab")

EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt"}
# The exporter (onnx, onnxscript) and the runtime that checks the file (onnxruntime).
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def default_path(checkpoint, fmt):
    return os.path.splitext(checkpoint)[0] + EXTENSIONS[fmt]


def check_packages(fmt):
    """UserError naming what to pip install when the format's packages are missing."""
    if fmt != "onnx":
        return
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--export onnx needs the Python package(s) {', '.join(missing)}, which are not installed; "
                        f"pip install {' '.join(missing)} (or use --export torchscript)")


def export_model(model, fmt, path, example_size):
    """Write `model` as `fmt` to `path` atomically; returns {"dynamic": bool, "max_abs_diff": float}.

    `example_size` (H, W) is the traced input size, and the fixed size if the shapes cannot be dynamic.
    """
    check_packages(fmt)
    model = model.to("cpu").eval()
    example = torch.randn(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        with warnings.catch_warnings():  # torch marks both exporters' older paths as deprecated; they still work
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            dynamic = (to_torchscript if fmt == "torchscript" else to_onnx)(model, example, tmp)
            run = load_exported(fmt, tmp)
        # A second batch size and spatial size prove the shapes really are dynamic.
        checks = [example] + ([torch.randn(2, 3, example_size[0] + 13, example_size[1] + 29)] if dynamic else [])
        with torch.no_grad():
            pairs = [(run(x), model(x).numpy()) for x in checks]
        diff = max(float(np.abs(got - want).max()) for got, want in pairs)
        # Float32 kernels differ in summation order, so the bound follows the outputs' size (logits of a trained
        # model reach the hundreds): 1e-3 of the largest output, and never under 1e-3.
        bound = 1e-3 * max(1.0, max(float(np.abs(want).max()) for _, want in pairs))
        if not diff < bound:
            raise UserError(f"exported {fmt} model differs from the PyTorch model by {diff:.3g} (max abs); "
                            f"expected < {bound:.3g} (1e-3 of its largest output, at least 1e-3), so {path} was not "
                            f"written")
    return {"dynamic": dynamic, "max_abs_diff": diff}


def to_torchscript(model, example, path):
    """Script the model (dynamic shapes by construction); a model that cannot be scripted is traced instead,
    which fixes whatever Python control flow the example input took."""
    try:
        module = torch.jit.script(model)
        dynamic = True
    except Exception as e:  # scripting rejects many Python constructs; tracing accepts them
        log.warning(f"torch.jit.script failed ({first_line(e)}); tracing at "
                    f"{tuple(example.shape)} instead")
        module = torch.jit.trace(model, example, check_trace=False)
        dynamic = False
    # Freezing inlines the weights and drops the training-mode branches: the file holds the eval model only.
    torch.jit.save(torch.jit.freeze(module.eval()), path)
    return dynamic


def to_onnx(model, example, path):
    """ONNX via torch.export with dynamic batch, height and width; static at the example size if that fails."""
    from torch.export import Dim
    dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    names = {"input_names": ["image"], "output_names": ["scores"]}
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False, **names)
        dynamic = True
    except Exception as e:  # noqa: BLE001 - any exporter failure: retry with fixed shapes
        log.warning(f"dynamic-shape ONNX export failed ({first_line(e)}); exporting with the "
                    f"fixed input size {tuple(example.shape)}")
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, **names)
        dynamic = False
    program.save(path, external_data=False)  # one self-contained file to deploy
    return dynamic


def load_exported(fmt, path):
    """A function float32 tensor N x 3 x H x W -> numpy scores, running the exported file as a deployment would."""
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch.jit is marked deprecated, but loads and runs fine
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu")

        def run(x):
            with torch.no_grad():
                return module(x).numpy()
        return run
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]
