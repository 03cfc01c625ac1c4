"""The ``litliger`` command: ``litliger <subcommand> [--config FILE] [--key value ...]``.

Every YAML key of a config file is also a flag (``--train.max_steps 20``); unknown keys are an error
that names them. Every failure a user can cause (a bad value, a missing or corrupt file, a bad flag) is
printed as ONE line, ``litliger: error: <what>, in <file or flag>; <what to do>``, and exits 1 (2 for
command-line parse errors, as argparse does); an interrupt exits 130. Set LITLIGER_DEBUG=1 for the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import yaml

from .engine.signals import RunInterrupted

# What a user can fix: bad values (json.JSONDecodeError and UnicodeDecodeError are ValueErrors), missing or
# unreadable files, a diverging run, corrupt YAML, corrupt pickles (upgrade_checkpoint reads old ones).
# Library-specific types are added in _user_errors.
USER_ERRORS = (ValueError, OSError, FloatingPointError, yaml.YAMLError, pickle.UnpicklingError)
PARSE_ERROR_EXIT = 2
USER_ERROR_EXIT = 1
INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


# Subcommand name -> (module, function): jsonargparse builds the flags from the function's signature. A command
# imports only its own module (``import lightning`` alone takes seconds, and serving or converting never needs it).
COMMANDS = {
    "pretrain": ("litliger.recipes.pretrain", "setup"),
    "prepare": ("litliger.recipes.prepare", "main"),
    "finetune": ("litliger.recipes.finetune", "setup"),
    "download": ("litliger.convert", "download"),
    "merge_lora": ("litliger.checkpoint.finetuned", "merge_lora_checkpoint"),
    "convert_from_hf": ("litliger.convert", "convert_from_hf"),
    "convert_to_hf": ("litliger.convert", "convert_to_hf"),
    "convert_to_gguf": ("litliger.convert", "convert_to_gguf"),
    "generate": ("litliger.inference.generate", "main"),
    "chat": ("litliger.inference.chat", "main"),
    "evaluate": ("litliger.eval.evaluate", "main"),
    "serve": ("litliger.serve.server", "main"),
    "upgrade_checkpoint": ("litliger.engine.upgrade", "upgrade_checkpoint"),
    "models": ("litliger.model.config", "list_models"),
    "plot": ("litliger.tools.plot", "main"),
    "plan": ("litliger.recipes.plan", "main"),
}


def _commands(names: list[str] | None = None) -> dict[str, Callable]:
    """Subcommand name -> the function it runs, for ``names`` (default: every command)."""
    chosen = list(COMMANDS) if names is None else names
    return {n: getattr(importlib.import_module(COMMANDS[n][0]), COMMANDS[n][1]) for n in chosen}


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus the corrupt-file errors of safetensors and torch.distributed.checkpoint.

    ``CheckpointException`` derives from BaseException, so a plain ``except Exception`` would miss it.
    """
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    return (*USER_ERRORS, SafetensorError, CheckpointException)


def show_field_docs() -> None:
    """Make jsonargparse read the docstring under each dataclass field (``TrainArgs.max_steps`` ...) as that
    flag's help, as it reads a function's ``Args:`` section; needs ``docstring-parser`` (jsonargparse[signatures]).
    """
    import jsonargparse

    try:  # newer jsonargparse; older ones lack this setting (or the function) and newer ones deprecate the other
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (AttributeError, TypeError):
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = bare_switches(join_list_positional(sys.argv[1:] if argv is None else list(argv)))
    show_field_docs()
    debug = bool(os.environ.get("LITLIGER_DEBUG"))
    try:
        check_config_files(argv)
        # the named command only; without one (``litliger --help``, a typo) every command, to list them
        named = [argv[0]] if argv and argv[0] in COMMANDS else None
        CLI(_commands(named), args=plan_config(argv), as_positional=True, exit_on_error=False)
        close_process_group()
    except RunInterrupted as e:
        # a signal before there was training progress to save (after it, the run saves and returns normally)
        print(f"litliger: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("litliger: interrupted", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
    except argparse.ArgumentError as e:
        if debug:
            raise
        _fail(parse_error_line(str(e), argv, tuple(COMMANDS)), PARSE_ERROR_EXIT)
    except BaseException as e:
        # tokenizers (Rust) raises a bare Exception for a malformed file: never a bug's type, so a user error
        if debug or not (isinstance(e, _user_errors()) or type(e) is Exception):
            raise
        _fail(error_line(e), USER_ERROR_EXIT)


# Commands whose positional is a list of paths (`litliger plot A B`): jsonargparse reads a list positional as one
# JSON list, so their positional words are given to it as one.
LIST_POSITIONALS = ("plot",)


def join_list_positional(argv: list[str]) -> list[str]:
    """``plot A B --x tokens`` -> ``plot '["A", "B"]' --x tokens`` (one word that is a JSON list stays as it is)."""
    if not argv or argv[0] not in LIST_POSITIONALS:
        return argv
    words, flags, i = [], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg != "-":
            takes_value = "=" not in arg and arg not in ("-h", "--help") and i + 1 < len(argv)
            flags.extend(argv[i : i + 2] if takes_value else [arg])
            i += 2 if takes_value else 1
        else:
            words.append(arg)
            i += 1
    if not words or (len(words) == 1 and words[0].lstrip().startswith("[")):
        return argv
    return [argv[0], json.dumps(words), *flags]


# Switches written alone (`litliger plan --json`): jsonargparse's bool flags take a value, so a bare one gets true.
BARE_SWITCHES = {"plan": ("--json",)}


def bare_switches(argv: list[str]) -> list[str]:
    """``plan --config F --json`` -> ``plan --config F --json true`` (a value after the switch is kept)."""
    switches = BARE_SWITCHES.get(argv[0], ()) if argv else ()
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in switches and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("true")
    return out


def plan_config(argv: list[str]) -> list[str]:
    """``plan --config run.yaml``: the run config without the keys a plan does not take (data, eval, out_dir, ...),
    given inline (jsonargparse reads YAML text as well as a path), so one config file serves the run and its plan."""
    if not argv or argv[0] != "plan" or "--config" not in argv[:-1]:
        return argv
    import inspect

    from .recipes.plan import main as plan

    at = argv.index("--config") + 1
    path = Path(argv[at])
    if not path.is_file():
        return argv  # jsonargparse reports the missing file
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(settings, dict):
        return argv
    taken = set(inspect.signature(plan).parameters)
    kept = {k: v for k, v in settings.items() if k in taken}
    return [*argv[:at], json.dumps(kept), *argv[at + 1 :]]


def close_process_group() -> None:
    """Destroy the process group of a finished distributed run while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they reference and the
    process aborts ("terminate called without an active exception", exit -6) after a run that succeeded.
    Only on the success path: after an error a peer may still wait in a collective, and a clean exit
    matters less than not hanging there.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fail(line: str, code: int) -> NoReturn:
    print(f"litliger: error: {line}", file=sys.stderr)
    sys.exit(code)


def error_line(e: BaseException) -> str:
    """The exception as one line: its lines joined by "; " (a CheckpointException: each rank's cause)."""
    while str(e).startswith("Does not validate against any of the Union subtypes") and e.__cause__ is not None:
        e = e.__cause__  # jsonargparse wraps the error of e.g. Config.__post_init__ in a report of every type tried
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:  # torch.distributed.checkpoint: str() holds tracebacks
        causes = "; ".join(f"rank {rank}: {one_line(exc)}" for rank, (exc, _) in sorted(failures.items()))
        return f"a distributed checkpoint could not be read or written ({causes}); resume from another checkpoint"
    return one_line(e)


def one_line(e: BaseException | str) -> str:
    """The message with its lines joined by "; " (blank lines dropped): the report stays one line."""
    text = e if isinstance(e, str) else str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of the command line, for both ``--flag value`` and ``--flag=value``."""
    pairs = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((arg, argv[i + 1]))
    return pairs


def _read_model_config(path: Path) -> None:
    from .model.config import Config

    Config.from_file(path)


# Files that a flag names and that litliger can check better than jsonargparse (its reports of a bad
# model_config.yaml are many lines and do not say which file).
FILE_CHECKS: dict[str, Callable[[Path], None]] = {"--model_config": _read_model_config}


def check_config_files(argv: list[str]) -> None:
    """Read every YAML file named on the command line (``--config``, ``--model_config`` ...) before
    jsonargparse does, so that a broken one is reported in one line naming the file and the flag."""
    for arg in argv if argv[:1] == ["pretrain"] else ():
        if arg.startswith("--model_config."):  # jsonargparse would build the rest of the Config from its defaults
            flag = arg.split("=", 1)[0]
            raise ValueError(
                f"{flag} changes a field of Config's defaults (a LayerNorm/GELU model with block_size 4096), in "
                f"{flag}; name a base config and change its fields: --model_name debug-llama "
                f"--model.{flag.removeprefix('--model_config.')} VALUE (`litliger models` lists the names)"
            )
    for flag, value in flag_values(argv):
        path = Path(value)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue  # jsonargparse reports a missing file (and accepts inline YAML) itself
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"invalid YAML ({yaml_problem(e)}), in {flag} {path}; fix the file") from e
        if flag in FILE_CHECKS:
            FILE_CHECKS[flag](path)


def yaml_problem(e: BaseException) -> str:
    """A YAML error's problem and position without the multi-line context it prints."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or one_line(e)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


# Lines of jsonargparse's union-type reports that say nothing about what is wrong.
_NOISE = re.compile(
    r"^(- )?(Subtypes:|Errors:|Given value( type)?:|Does not validate against any of the Union subtypes|"
    r"Expected a <class 'NoneType'>|Unexpected import path format)"
)


def _readable(text: str, given: str | None = None) -> str:
    """``Expected a <class 'int'>. Got value: abc`` -> ``got abc, expected int``, and the like; ``given`` is
    the value a union-type report names once for all its lines (``Expected a Literal[...]`` alone)."""
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "")
    text = re.sub(r"Literal\[(.*?)\]", r"one of \1", text)
    text = re.sub(r"^Option '([^']+)' is not accepted$", r"unknown key '\1'", text)
    text = re.sub(r"^Expected an? (.+?)\. Got value: (.*)$", r"got \2, expected \1", text)
    if given is not None and (match := re.match(r"^Expected an? (.+)$", text)):
        text = f"got {given}, expected {match[1].removesuffix(f': {given}')}"
    return text.replace("expected dot import path string", "expected an import path (module.name)")


def _details(lines: list[str]) -> str:
    """The informative part of a report on one flag's value, as one line."""
    given = next((line.split(": ", 1)[1] for line in lines if line.startswith("Given value: ")), None)
    details = [line.removeprefix("- ") for line in lines if line and not _NOISE.match(line)]
    sub_config = next((i for i, line in enumerate(details) if "sub-config file" in line), None)
    if sub_config is not None:  # a file given to the flag is broken: that is the news
        details = details[sub_config:]
    if len(details) > 1:  # "not a path" only matters when nothing better was said
        details = [line for line in details if not line.startswith("Expected a path but")]
    text = "; ".join(_readable(line, given) for line in details)
    # nested reports: "Problem with given class_path 'X':; Parser key "k":; <why>" -> "X: k: <why>"
    text = re.sub(r"Problem with given class_path '([^']+)':; ", r"\1: ", text)
    return re.sub(r'Parser key "([^"]+)":;? ', r"\1: ", text) or "invalid value"


def parse_error_line(message: str, argv: list[str], commands: tuple[str, ...] = ()) -> str:
    """jsonargparse's (often multi-line) report as ``<what>, in <flag or config file>; <what to do>``."""
    command = argv[0] if argv and argv[0] in commands else None
    hint = f"see `litliger {command} --help`" if command else "see `litliger --help`"
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["invalid arguments"]
    first = lines[0]
    if match := re.match(r"unrecognized arguments: (.*)", first):
        words = match[1].split()
        flag = next((w.split("=", 1)[0] for w in words if w.startswith("-")), None)
        what = f"unknown flag {flag}" if flag else f"unexpected argument {words[0]!r}"
        return f"{what}, in the command line; {hint}"
    if match := re.search(r"(?:Group '([^']+)' )?does not accept option '([^']+)'|Option '([^']+)' is not", first):
        key = f"{match[1]}.{match[2]}" if match[1] else match[2] or match[3]
        files = [value for flag, value in flag_values(argv) if flag == "--config"]
        where = f"--config {', '.join(files)}" if files else "the command line"
        return f"unknown key {key!r}, in {where}; {hint}"
    if match := re.match(r"argument subcommand: invalid choice: '([^']*)' \((.*)\)", first):
        return f"unknown command {match[1]!r} ({match[2]}), in the command line; {hint}"
    if match := re.match(r'Parser key "([^"]+)":\s*(.*)', first):
        return f"{_details([match[2], *lines[1:]])}, in --{match[1]}; {hint}"
    return f"{'; '.join(lines)}; {hint}"


if __name__ == "__main__":
    main()
