"""The wrapper of every entry script: parse the flags, run main, and turn a RunError into one line and an exit code."""
import os
import sys

from core import config, distributed
from utils import RunError


def run_entry(main, parser, argv=None, saved_settings=None, task_defaults=None, cfg=None):
    """Parse flags (config file, --set, command line) and run `main(args)`.

    A RunError (UserError: exit code 2) becomes one line on stderr and its exit code.
    """
    try:
        args = config.parse_args(parser, argv, saved_settings, task_defaults, cfg)
        if args.print_config:
            print(config.render(args, parser, args.print_config), end="")
            return
        main(args)
    except RunError as e:
        rank = os.environ.get("RANK")
        tag = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{tag}error: {e}", file=sys.stderr, flush=True)
        distributed.cleanup_distributed()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
