"""The suite as a library, the way seed 001 uses it: register your own classes and train from a cfg dict.

    from ailab import ailab_train
    from ailab.registry import MODELS, DATASETS, LOSSES

    @MODELS.register_module()
    class MyModel(nn.Module): ...

    if __name__ == "__main__":
        ailab_train(cfg)      # torchrun --nproc_per_node=2 my_train.py [flags that override cfg]

The repository's root must be importable (run from it, or PYTHONPATH=/path/to/ailab). Classes registered with
register_module() are built with the keyword arguments their cfg entry gives (see core/schema_cfg.py).
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ailab_train(cfg, argv=None):
    """Run train.py with `cfg` (a seed-001 dict, or a dict of flag names) as its config; the command line
    (sys.argv, or `argv`) still wins over it, as it wins over a --config file."""
    # train.py is loaded from its path, not imported by name: the caller's own script may be a train.py too.
    spec = importlib.util.spec_from_file_location("ailab_train_entry", os.path.join(ROOT, "train.py"))
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.cli(sys.argv[1:] if argv is None else list(argv), cfg=cfg)
