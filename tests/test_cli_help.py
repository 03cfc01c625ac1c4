"""``litliger <command> --help`` documents every flag: a function's ``Args:`` docstring section and the
docstrings under the fields of the argument groups (``TrainArgs.max_steps`` ...) become the flags' help."""

from __future__ import annotations

import argparse
import re

import pytest
from jsonargparse import CLI, capture_parser

from litliger.cli import _commands, main, show_field_docs

# command -> (flag, the start of its help) for a few representative flags: a group field, a parameter, a positional
SHOWN = {
    "pretrain": [
        ("--train.max_steps MAX_STEPS", "optimizer steps to train"),
        ("--train.global_batch_size GLOBAL_BATCH_SIZE", "sequences per optimizer step"),
        ("--eval.interval INTERVAL", "steps between validations"),
        ("--optimizer.lr LR", "the peak learning rate"),
        ("--sample.top_p TOP_P", "nucleus sampling"),
        ("--devices DEVICES", "processes (GPUs, or CPU processes) per node"),
        ("--model MODEL", "``--model.FIELD VALUE``: change fields of the"),
    ],
    "finetune": [
        ("--lora.r R", "rank of every adapter"),
        ("--lora.targets [ITEM,...]", "layers to adapt"),
        ("--train.epochs EPOCHS", "passes over the training set"),
        ("--train.max_steps MAX_STEPS", "optimizer steps to train"),
        ("--sample.max_new_tokens MAX_NEW_TOKENS", "tokens to generate at the end of the run"),
        ("--loss {sft,dpo,simpo,orpo,kd}", "the objective: sft"),
        ("--pref.beta BETA", "the preference term's strength"),
        ("--pref.reference REFERENCE", "dpo: where the reference log-probs come from"),
        ("--kd.loss LOSS", "jsd (generalised Jensen-Shannon)"),
        ("--teacher_dir TEACHER_DIR", "``--loss kd``: the teacher's checkpoint folder"),
    ],
    "prepare": [("--out_dir OUT_DIR", "a new or empty local folder"), ("--num_proc NUM_PROC", "processes on this")],
    "merge_lora": [("checkpoint_dir", "a finetuning checkpoint folder"), ("--overwrite {true,false}", "replace")],
    "download": [
        ("repo_id", "the Hugging Face model repo, ORG/NAME"),
        ("--access_token ACCESS_TOKEN", "a Hugging Face token, for gated or private repos; default: the HF_TOKEN"),
        ("--tokenizer_only {true,false}", "fetch and write only the tokenizer files"),
    ],
    "convert_from_hf": [
        ("hf_dir", "a Hugging Face model folder"),
        ("--dtype DTYPE", "cast floating-point tensors"),
        ("--base BASE", "for a PEFT adapter folder: the litliger checkpoint folder"),
    ],
    "convert_to_hf": [
        ("checkpoint_dir", "a litliger checkpoint folder"),
        ("--dtype DTYPE", "cast floating-point"),
        ("--format {full,peft}", "``full``: a model folder for transformers"),
    ],
    "convert_to_gguf": [("out_file", "the .gguf file to write"), ("--dtype DTYPE", "the type of the weight matrices")],
    "generate": [("--top_p TOP_P", "then from the most likely"), ("--max_new_tokens MAX_NEW_TOKENS", "the most")],
    "chat": [("--max_seq_length MAX_SEQ_LENGTH", "the KV cache's length")],
    "evaluate": [
        ("--batch_size BATCH_SIZE", "sequences per forward"),
        ("--tasks TASKS, --tasks+ TASKS", "lm_eval task names"),
    ],
    "serve": [("--port PORT", "the TCP port"), ("--api_key API_KEY", "when set (or the LITLIGER_API_KEY")],
    "upgrade_checkpoint": [("checkpoint_dir", "a step-XXXXXXXX/ or final/ folder")],
    "plot": [("--x {steps,tokens}", "the x axis"), ("--smooth SMOOTH", "weight of the past")],
    "models": [("--name NAME", "show only the configs whose name contains")],
    "plan": [
        ("--plan.device_memory DEVICE_MEMORY", "the memory of one device"),
        ("--train.activation_checkpointing ACTIVATION_CHECKPOINTING", "what blocks keep for backward"),
        ("--json {true,false}", "print one JSON object instead of the table"),
    ],
}


def test_every_command_is_shown():
    assert set(SHOWN) == set(_commands())


@pytest.mark.parametrize("command", list(SHOWN))
def test_help_exits_0_and_shows_the_flags_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert out.startswith("usage: ")
    for flag, help_start in SHOWN[command]:
        assert re.search(rf"(?<![\w.-]){re.escape(flag)} {re.escape(help_start)}", out), (flag, help_start)


def test_every_flag_has_a_help_line():
    """No flag or positional of any command is left with only its type and default."""
    show_field_docs()
    parser = capture_parser(lambda: CLI(_commands(), args=[], as_positional=True))
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [
        f"{command} {action.option_strings[-1] if action.option_strings else action.dest}"
        for command, subparser in subcommands.choices.items()
        for action in subparser._actions
        if not (action.help or "").strip()
    ]
    assert set(subcommands.choices) == set(_commands())
    assert undocumented == []
