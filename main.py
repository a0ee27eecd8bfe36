"""Seed 002's command line: one script, one config file, and --task naming the step.

    torchrun --nproc_per_node=4 main.py --config configs/ddp_example.toml --task train
    python main.py --config configs/ddp_example.toml --task test      # the newest run's best.pth, [test] batch_size
    python main.py --config configs/ddp_example.toml --task predict   # [predict] input and [predict.config]

--task train, test and predict run train.py, test.py and infer.py with the other arguments, which mean what they
mean there. Here --task is the step; the kind of model (classification or segmentation) comes from the config:
`postprocess` in seed 002's schema, `task` in a file of flag names (or --set task=classification).
"""
import sys

STEPS = {"train": "train", "test": "test", "predict": "infer"}


def split_task(argv):
    """(step, the other arguments) from --task STEP or --task=STEP."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


if __name__ == "__main__":
    step, rest = split_task(sys.argv[1:])
    if step not in STEPS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: --task {step!r} is not a step; expected --task train, test or predict" if step else
              "\nerror: expected --task train, test or predict", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"main.py --task {step}"
    __import__(STEPS[step]).cli(rest)
