"""The ``litliger`` command: ``litliger <subcommand> [--config FILE] [--key value ...]``.

Every YAML key of a config file is also a flag (``--train.max_steps 20``); unknown keys are an error
that names them. Errors from bad input are printed as one line (set LITLIGER_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys

# What a user can fix: bad values, missing or unreadable files, a diverging run.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _commands() -> dict:
    from .convert import convert_from_hf, convert_to_hf
    from .generate import main as generate
    from .pretrain import setup as pretrain

    return {
        "pretrain": pretrain,
        "convert_from_hf": convert_from_hf,
        "convert_to_hf": convert_to_hf,
        "generate": generate,
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    try:
        CLI(_commands(), args=argv, as_positional=True)
    except USER_ERRORS as e:
        if os.environ.get("LITLIGER_DEBUG"):
            raise
        print(f"litliger: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
