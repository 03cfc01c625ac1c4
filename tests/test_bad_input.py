"""Every bad input a user can give ends the command at once with ONE line that says what, where and what
to do, exit status 1 (2 for command-line parse errors), nothing written.

The table is the contract: a new flag, file or check adds a row here, and every parameter of every command has
a row or an entry in UNCHECKED (``test_every_flag_has_a_row``). Every row runs ``litliger.cli.main`` in-process;
pretrain rows fail before the training session starts (a guard makes a row that got that far fail in a second
instead of training), except the rows with ``--resume`` (RESUME, FRESH), whose checks are made in the session:
for them (and for finetune) a second guard stops a row that got as far as loading data.
"""

# ruff: noqa: E501 (a row of the table reads best on one line)
from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import string
import time
from functools import cached_property
from pathlib import Path

import pytest
import torch
import yaml

import litliger.inference.generate
import litliger.recipes.finetune
import litliger.recipes.pretrain
from litliger import GPT, Config
from litliger.checkpoint import parameter_state_dict, save_checkpoint
from litliger.checkpoint.layout import CHECKSUMS_FILE, CONFIG_FILE, LOCK_FILE, MODEL_FILE
from litliger.cli import _commands, main
from litliger.data import Tokenizer
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs

PRETRAIN = ["pretrain", "--model_name", "debug-llama", "--out_dir", "{out}", "--train.max_steps", "1"]
FINETUNE = ["finetune", "--checkpoint_dir", "{ckpt}", "--out_dir", "{out}", "--train.max_steps", "1"]
RESUME = ["pretrain", "--model_config", "{tiny_yaml}", "--out_dir", "{out}", "--accelerator", "cpu",
          "--train.max_steps", "1", "--resume"]  # fmt: skip
# a fresh run that enters the training session, for the checks made there (out_dir, the tokenizer folder)
FRESH = [*RESUME, "false", "--tokenizer_dir", "{tokenizer_dir}"]
CHAT = ["chat", "{ckpt}"]
EVALUATE = ["evaluate", "{ckpt}", "--max_seq_length", "16"]
PREPARE = ["prepare", "--data", "litliger.data.Corpus", "--data.path", "{corpus}", "--out_dir", "{out}"]
DOWNLOAD = ["download", "tiny-org/tiny-model", "--checkpoint_dir", "{out}"]
USAGE = 2  # exit status of a command-line parse error (argparse's)


def flag(name: str, value: str, regex: str, code: int = 1, base: list[str] = PRETRAIN):
    return pytest.param([*base, f"--{name}", value], regex, code, id=f"{name}={value}")


def must(name: str, shown: str, condition: str) -> str:
    """The message of a value outside its range: ``<name>=<value> must be <condition>, in --<name>; <fix>``."""
    return rf"^{re.escape(name)}={shown} must be {condition}, in --{re.escape(name)}; \w"


ROWS = [
    # --train.*
    flag("train.global_batch_size", "0", must("train.global_batch_size", "0", ">= 1")),
    flag("train.global_batch_size", "-8", must("train.global_batch_size", "-8", ">= 1")),
    flag("train.global_batch_size", "6", must("train.global_batch_size", "6", r"a multiple of train\.micro_batch_size=4")),
    flag("train.micro_batch_size", "0", must("train.micro_batch_size", "0", ">= 1")),
    flag("train.micro_batch_size", "abc", r"^got abc, expected int, in --train\.micro_batch_size; see `litliger pretrain --help`$", USAGE),
    flag("train.max_seq_length", "0", must("train.max_seq_length", "0", ">= 1")),
    flag("train.max_seq_length", "100000", r"^train\.max_seq_length=100000 exceeds the model's block_size=\d+, in --train\.max_seq_length; "),
    flag("train.max_steps", "-1", must("train.max_steps", "-1", ">= 0")),
    flag("train.max_tokens", "0", must("train.max_tokens", "0", ">= 1")),
    flag("train.lr_warmup_steps", "-1", must("train.lr_warmup_steps", "-1", ">= 0")),
    flag("train.min_lr", "-0.001", must("train.min_lr", r"-0\.001", ">= 0")),
    flag("train.max_norm", "0", must("train.max_norm", r"0\.0", "> 0")),
    flag("train.max_norm", "-1", must("train.max_norm", r"-1\.0", "> 0")),
    flag("train.save_interval", "0", must("train.save_interval", "0", ">= 1")),
    flag("train.save_interval_minutes", "0", must("train.save_interval_minutes", r"0\.0", "> 0")),
    flag("train.save_interval_minutes", "-0.5", must("train.save_interval_minutes", r"-0\.5", "> 0")),
    flag("train.keep_last", "0", must("train.keep_last", "0", ">= 1")),
    flag("train.log_interval", "0", must("train.log_interval", "0", ">= 1")),
    flag("train.activation_checkpointing", "selective:0", r"^activation checkpointing 'selective:0' is not a mode, in --train\.activation_checkpointing; use none, full, "),
    flag("train.offload", "disk", must("train.offload", "'disk'", "one of none, activations, params, optimizer")),
    # --plan.*
    flag("plan.device_memory", "lots", r"^'lots' is not an amount of memory, in --plan\.device_memory; write e\.g\. 80GB"),
    flag("plan.strict", "maybe", r"^got maybe, expected bool, in --plan\.strict; ", USAGE),
    # --eval.*
    flag("eval.interval", "0", must("eval.interval", "0", ">= 1")),
    flag("eval.max_iters", "0", must("eval.max_iters", "0", ">= 1")),
    flag("eval.initial_validation", "maybe", r"^got maybe, expected bool, in --eval\.initial_validation; ", USAGE),
    flag("eval.final_validation", "maybe", r"^got maybe, expected bool, in --eval\.final_validation; ", USAGE),
    # --optimizer.*
    flag("optimizer.name", "Adamw", must("optimizer.name", "'Adamw'", "one of AdamW, Adam, SGD")),
    flag("optimizer.lr", "0", must("optimizer.lr", r"0\.0", "> 0")),
    flag("optimizer.lr", "nan", r"^got nan, expected float, in --optimizer\.lr; ", USAGE),
    flag("optimizer.lr", "inf", r"^got inf, expected float, in --optimizer\.lr; ", USAGE),
    flag("optimizer.weight_decay", "-0.1", must("optimizer.weight_decay", r"-0\.1", ">= 0")),
    flag("optimizer.betas", "[0.9,1.0]", must("optimizer.betas", r"1\.0", r"in \[0, 1\)")),
    flag("optimizer.betas", "[-0.1,0.9]", must("optimizer.betas", r"-0\.1", r"in \[0, 1\)")),
    flag("optimizer.betas", "[0.9]", r"^got \[0\.9\], expected tuple.*, in --optimizer\.betas; see", USAGE),
    flag("optimizer.eps", "0", must("optimizer.eps", r"0\.0", "> 0")),
    flag("optimizer.momentum", "1", must("optimizer.momentum", r"1\.0", r"in \[0, 1\)")),
    # --sample.* (pretrain's end-of-run sample)
    flag("sample.max_new_tokens", "-1", must("sample.max_new_tokens", "-1", ">= 0")),
    flag("sample.temperature", "-0.5", must("sample.temperature", r"-0\.5", ">= 0")),
    flag("sample.top_k", "0", must("sample.top_k", "0", ">= 1")),
    flag("sample.top_p", "0", must("sample.top_p", r"0\.0", r"in \(0, 1\]")),
    flag("sample.top_p", "1.5", must("sample.top_p", r"1\.5", r"in \(0, 1\]")),
    # pretrain's own flags
    flag("devices", "0", r"^devices=0 must be an integer >= 1, in --devices"),
    flag("num_nodes", "0", r"^num_nodes=0 must be an integer >= 1, in --num_nodes"),
    flag("accelerator", "tpu", r"^got tpu, expected one of 'auto', 'cpu', 'cuda', 'gpu', in --accelerator; ", USAGE),
    flag("model_name", "llama-9000", r"^unknown model name 'llama-9000', in --model_name; "),
    flag("compile", "maybe", r"^got maybe, expected bool, in --compile; see `litliger pretrain --help`$", USAGE),
    flag("compile", "maybe", r"^got maybe, expected bool, in --compile; see `litliger finetune --help`$", USAGE, FINETUNE),
    flag("precision", "fp16", r"^got fp16, expected one of 'bf16-mixed', 'bf16-true', '16-true', '32-true', in --precision; see `litliger pretrain --help`$", USAGE),
    flag("precision", "16-true", r"^precision=16-true cannot train: .*, in --precision; use bf16-mixed, bf16-true or 32-true$"),
    flag("strategy", "deepspeed", r"^got deepspeed, expected one of 'auto', 'ddp', 'fsdp', in --strategy; ", USAGE),
    flag("logger", "mlflow", r"^got mlflow, expected one of 'csv', 'tensorboard', 'wandb', in --logger; ", USAGE),
    flag("seed", "abc", r"^got abc, expected int, in --seed; see `litliger pretrain --help`$", USAGE),
    pytest.param([*PRETRAIN, "--seed", "-1"], must("seed", "-1", r"in \[0, 4294967295\]"), 1, id="seed=-1"),
    flag("initial_checkpoint_dir", "{missing}", r"/missing is not a litliger checkpoint folder: model_config\.yaml is missing \(convert "),
    flag("out_dir", "{ckpt}", r"^out_dir .*/ckpt holds files that are not a litliger run \(.*\), in --out_dir; choose a new or empty folder", base=FRESH),
    flag("out_dir", "{tiny_yaml}", r"^out_dir .*/tiny\.yaml is an existing file, in --out_dir; choose a folder path$", base=FRESH),
    flag("tokenizer_dir", "{missing}", r"^tokenizer_dir .*/missing holds no tokenizer\.json, in --tokenizer_dir; name a folder", base=FRESH),
    pytest.param([*RESUME, "{missing}"], r"^--resume .*/missing: no such checkpoint folder; name a step-XXXXXXXX/ or final/ folder", 1, id="resume=missing"),
    pytest.param([*RESUME, "{ckpt}"], r"/ckpt is not a training checkpoint: training_state/state\.json is missing \(to start from a model checkpoint without its training state, use --initial_checkpoint_dir\)$", 1, id="resume=model-folder"),
    pytest.param([*PRETRAIN, "--model_config", "{tiny_yaml}"], r"^give either model_name or model_config, not both; to change fields of a named config, use --model\.FIELD ", 1, id="model_config=and-model_name"),
    pytest.param([*PRETRAIN, "--model.n_layr", "2"], r"^unknown model field n_layr, in --model; did you mean n_layer\? the fields are name, hf_config, ", 1, id="model=n_layr"),
    pytest.param([*PRETRAIN, "--model.n_layer", "0"], r"^Config 'debug-llama': n_layer=0 must be an integer >= 1, in --model\.n_layer; ", 1, id="model=n_layer-0"),
    pytest.param(["pretrain", "--model.n_layer", "2", "--out_dir", "{out}"], r"^--model\.\* changes fields of a named config but none is named, in --model\.n_layer; add --model_name NAME", 1, id="model=no-model_name"),
    pytest.param(["pretrain", "--model_config.n_layer", "2", "--out_dir", "{out}"], r"^--model_config\.n_layer changes a field of Config's defaults \(.*\), in --model_config\.n_layer; name a base config and change its fields: --model_name debug-llama --model\.n_layer VALUE", 1, id="model_config.n_layer=2"),
    # litliger plan (a run config; its own flags)
    flag("model_name", "llama-9000", r"^unknown model name 'llama-9000', in --model_name; ", 1, ["plan"]),
    pytest.param(["plan", "--model_name", "debug-llama", "--model_config", "{tiny_yaml}"], r"^give either model_name or model_config, not both", 1, id="model_config=and-model_name"),
    pytest.param(["plan", "--model_name", "debug-llama", "--model.n_layr", "2"], r"^unknown model field n_layr, in --model; ", 1, id="model=n_layr"),
    flag("checkpoint_dir", "{missing}", r"/missing is not a litliger checkpoint folder: model_config\.yaml is missing", 1, ["plan"]),
    flag("method", "qlora", r"^got qlora, expected one of 'lora', 'full', in --method; ", USAGE, ["plan", "--model_name", "debug-llama"]),
    flag("precision", "16-true", r"^got 16-true, expected one of 'bf16-mixed', 'bf16-true', '32-true', in --precision; ", USAGE, ["plan", "--model_name", "debug-llama"]),
    flag("devices", "0", must("devices", "0", ">= 1"), 1, ["plan", "--model_name", "debug-llama"]),
    flag("loss", "ppo", r"^got ppo, expected one of 'sft', 'dpo', 'simpo', 'orpo', 'kd', in --loss; ", USAGE, ["plan", "--model_name", "debug-llama"]),
    flag("num_nodes", "0", must("num_nodes", "0", ">= 1"), 1, ["plan", "--model_name", "debug-llama"]),
    flag("strategy", "zero3", r"^got zero3, expected one of 'auto', 'ddp', 'fsdp', in --strategy; ", USAGE, ["plan", "--model_name", "debug-llama"]),
    flag("json", "maybe", r"^got maybe, expected bool, in --json; ", USAGE, ["plan", "--model_name", "debug-llama"]),
    flag("initial_checkpoint_dir", "{missing}", r"/missing holds no model_config\.yaml, in --initial_checkpoint_dir; ", 1, ["plan"]),
    pytest.param(["plan", "--model_name", "debug-llama", "--plan.device_memory", "1KB", "--plan.strict", "true"], r"^the memory plan does not fit: a peak of .* per device against 1\.0 KiB|^the memory plan does not fit", 1, id="plan.strict=true"),
    pytest.param(["models", "--name", "nope"], r"^no model name contains 'nope', in --name; run `litliger models`", 1, id="name=nope"),
    pytest.param(
        ["pretrain", "--model_name", "debug-llama", "--out_dir", "{out}"],
        r"^how long to train is not set, in --train\.max_steps / --train\.max_tokens; ",
        1,
        id="no-duration",
    ),
    # unknown flags, keys and commands
    flag("train.max_stepz", "3", r"^unknown flag --train\.max_stepz, in the command line; see `litliger pretrain --help`$", USAGE),
    pytest.param(["pretrian"], r"^unknown command 'pretrian' \(choose from .*'pretrain'.*\), in the command line; ", USAGE, id="unknown-command"),
    pytest.param([*PRETRAIN, "extra"], r"^unexpected argument 'extra', in the command line; ", USAGE, id="stray-argument"),
    flag("train", '{{"max_stepz": 1}}', r"^unknown key 'train\.max_stepz', in the command line; ", USAGE),
    flag("data", "litliger.data.Nope", r"^litliger\.data\.Nope: module 'litliger\.data' has no attribute 'Nope', in --data; ", USAGE),
    pytest.param([*PRETRAIN, "--data", "litliger.data.TextFiles", "--data.foo", "1"], r"^litliger\.data\.TextFiles: unknown key 'foo', in --data; ", USAGE, id="data.foo=1"),
    # config files
    flag("config", "{missing}/run.yaml", r"^File does not exist: '.*/missing/run\.yaml', in --config; ", USAGE),
    flag("config", "{bad_yaml}", r"^invalid YAML \(.* at line 3, column 1\), in --config .*/bad\.yaml; fix the file$"),
    flag("config", "{unknown_key_yaml}", r"^unknown key 'train\.max_stepz', in --config .*/unknown_key\.yaml; ", USAGE),
    flag("model_config", "{bad_yaml}", r"^invalid YAML \(.*\), in --model_config .*/bad\.yaml; fix the file$"),
    flag("model_config", "{model_unknown_field}", r"^unknown Config fields \['n_layerz'\], in .*/model_unknown_field\.yaml; did you mean n_layer\?$"),
    flag("model_config", "{model_wrong_type}", r"^Config field n_embd='abc' must be of type int, in .*/model_wrong_type\.yaml; "),
    flag("model_config", "{model_bad_value}", r"^Config 'bad': n_embd=30 is not divisible by n_head=4, in .*/model_bad_value\.yaml; "),
    # finetune: the base, the method, LoRA and the trainable set
    pytest.param(["finetune", "--out_dir", "{out}"], r"^no base checkpoint given, in --checkpoint_dir; ", 1, id="checkpoint_dir=none"),
    pytest.param(["finetune", "--checkpoint_dir", "{missing}", "--out_dir", "{out}"], r"/missing is not a checkpoint folder \(model\.safetensors missing\), in --checkpoint_dir; ", 1, id="checkpoint_dir=missing"),
    flag("method", "qlora", r"^got qlora, expected .*, in --method; ", USAGE, base=FINETUNE),
    flag("lora.r", "0", r"^lora\.r=0 must be >= 1, in --lora\.r; ", base=FINETUNE),
    flag("lora.alpha", "0", r"^lora\.alpha=0\.0 must be > 0, in --lora\.alpha; ", base=FINETUNE),
    flag("lora.dropout", "1", r"^lora\.dropout=1\.0 must be in \[0, 1\), in --lora\.dropout; ", base=FINETUNE),
    flag("lora.targets", "[attn]", r"^lora\.targets has unknown \['attn'\], in --lora\.targets; ", base=FINETUNE),
    flag("lora.targets", "[]", r"^lora\.targets is empty, in --lora\.targets; choose some of ", base=FINETUNE),
    flag("train.epochs", "0", must("train.epochs", "0", ">= 1"), base=FINETUNE),
    flag("train.trainable", "[nothing.*]", r"^train\.trainable pattern 'nothing\.\*' matches no parameter of tiny, in --train\.trainable; ", base=FINETUNE),
    pytest.param([*FINETUNE, "--data", "litliger.data.Instructions", "--data.json_path", "{missing}"], r"/missing does not exist, in --data\.json_path; ", 1, id="data.json_path=missing"),
    pytest.param([*FINETUNE, "--loss", "dpo", "--data", "litliger.data.TextFiles", "--data.train_data_path", "{tokenizer_dir}"], r"^--loss dpo trains on preference pairs, got TextFiles, in --data; use litliger\.data\.Preferences ", 1, id="data=TextFiles-with-dpo"),
    pytest.param([*FINETUNE, "--data", "litliger.data.Preferences", "--data.json_path", "{pairs}"], r"^Preferences holds preference pairs, which --loss sft does not train on, in --data; use --loss dpo, simpo or orpo", 1, id="data=Preferences-with-sft"),
    pytest.param([*FINETUNE, "--loss", "dpo", "--data", "litliger.data.Preferences", "--data.json_path", "{pairs}", "--data.packing", "true"], r"^packing=True is not supported for preference pairs: .*, in --data\.packing; leave it false$", 1, id="data.packing=true-pairs"),
    flag("out_dir", "{ckpt}", r"^out_dir .*/ckpt holds files that are not a litliger run \(.*\), in --out_dir; ", base=FINETUNE),
    flag("precision", "16-true", r"^precision=16-true cannot train: .*, in --precision; ", base=FINETUNE),
    flag("precision", "fp16", r"^got fp16, expected one of .*, in --precision; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    flag("resume", "{missing}", r"^--resume .*/missing: no such checkpoint folder; name a step-XXXXXXXX/ or final/ folder", base=FINETUNE),
    flag("devices", "0", r"^devices=0 must be an integer >= 1, in --devices", base=FINETUNE),
    flag("num_nodes", "0", r"^num_nodes=0 must be an integer >= 1, in --num_nodes", base=FINETUNE),
    flag("accelerator", "tpu", r"^got tpu, expected one of .*, in --accelerator; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    flag("strategy", "deepspeed", r"^got deepspeed, expected one of .*, in --strategy; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    flag("logger", "mlflow", r"^got mlflow, expected one of .*, in --logger; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    flag("seed", "abc", r"^got abc, expected int, in --seed; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    # finetune: the objective (--loss), its settings (--pref.*, --kd.*) and the teacher
    flag("loss", "ppo", r"^got ppo, expected one of 'sft', 'dpo', 'simpo', 'orpo', 'kd', in --loss; see `litliger finetune --help`$", USAGE, base=FINETUNE),
    flag("pref.beta", "0", must("pref.beta", r"0\.0", "> 0"), base=[*FINETUNE, "--loss", "dpo"]),
    flag("pref.beta", "-0.1", must("pref.beta", r"-0\.1", "> 0"), base=[*FINETUNE, "--loss", "simpo"]),
    flag("pref.loss_type", "hinge", must("pref.loss_type", "'hinge'", "one of sigmoid, ipo"), base=[*FINETUNE, "--loss", "dpo"]),
    flag("pref.label_smoothing", "0.5", must("pref.label_smoothing", r"0\.5", r"in \[0, 0\.5\)"), base=[*FINETUNE, "--loss", "dpo"]),
    flag("pref.label_smoothing", "0.1", must("pref.label_smoothing", r"0\.1", "0 with pref.loss_type ipo"), base=[*FINETUNE, "--loss", "dpo", "--pref.loss_type", "ipo"]),
    flag("pref.gamma", "inf", r"^got inf, expected float, in --pref\.gamma; see `litliger finetune --help`$", USAGE, base=[*FINETUNE, "--loss", "simpo"]),
    flag("pref.reference", "ref", must("pref.reference", "'ref'", "one of auto, adapters, precomputed"), base=[*FINETUNE, "--loss", "dpo"]),
    flag("pref.reference", "adapters", r"^pref\.reference='adapters' switches LoRA adapters off, but --method full has none, in --pref\.reference; use precomputed \(or auto\)$", base=[*FINETUNE, "--loss", "dpo", "--method", "full"]),
    flag("pref.reference", "adapters", r"^pref\.reference='adapters' cannot form the reference with train\.trainable=\['transformer\.ln_f\.weight'\]: .*, in --pref\.reference; use precomputed", base=[*FINETUNE, "--loss", "dpo", "--train.trainable", "[transformer.ln_f.weight]"]),
    flag("kd.loss", "kl", must("kd.loss", "'kl'", "one of jsd, forward_kl, reverse_kl"), base=[*FINETUNE, "--loss", "kd"]),
    flag("kd.beta", "1", must("kd.beta", r"1\.0", r"in \(0, 1\)"), base=[*FINETUNE, "--loss", "kd"]),
    flag("kd.beta", "0", must("kd.beta", r"0\.0", r"in \(0, 1\)"), base=[*FINETUNE, "--loss", "kd"]),
    flag("kd.temperature", "0", must("kd.temperature", r"0\.0", "> 0"), base=[*FINETUNE, "--loss", "kd"]),
    flag("kd.hard_weight", "-1", must("kd.hard_weight", r"-1\.0", ">= 0"), base=[*FINETUNE, "--loss", "kd"]),
    pytest.param([*FINETUNE, "--loss", "kd"], r"^--loss kd needs a teacher, in --teacher_dir; name the teacher's checkpoint folder$", 1, id="teacher_dir=none"),
    flag("teacher_dir", "{ckpt}", r"^--teacher_dir is for --loss kd, but this run's loss is sft; drop --teacher_dir$", base=FINETUNE),
    flag("teacher_dir", "{missing}", r"/missing is not a checkpoint folder \(model\.safetensors missing\), in --teacher_dir; name the teacher's checkpoint folder$", base=[*FINETUNE, "--loss", "kd"]),
    flag("teacher_dir", "{teacher_other_vocab}", r"^the teacher .*/teacher_other_vocab has vocab_size 384, the student 320: .*, in --teacher_dir; use a teacher with the student's tokenizer$", base=[*FINETUNE, "--loss", "kd"]),
    flag("teacher_dir", "{teacher_other_tokenizer}", r"^the teacher .*/teacher_other_tokenizer has another tokenizer than the student \(fingerprint \w+ vs \w+\), in --teacher_dir; use a teacher with the student's tokenizer$", base=[*FINETUNE, "--loss", "kd"]),
    # merge_lora, convert_from_hf, convert_to_hf, upgrade_checkpoint: the folders, --dtype, --overwrite
    pytest.param(["merge_lora", "{ckpt}", "{out}"], r"/ckpt is not a finetuning checkpoint: finetune\.yaml is missing$", 1, id="checkpoint_dir=not-a-finetune"),
    pytest.param(["merge_lora", "{finetune_record}", "{finetune_record}"], r"^output folder .*/finetune_record is the input folder; choose another folder$", 1, id="out_dir=input"),
    flag("overwrite", "maybe", r"^got maybe, expected bool, in --overwrite; see `litliger merge_lora --help`$", USAGE, base=["merge_lora", "{ckpt}", "{out}"]),
    # download: every check is made before anything is fetched (no network here)
    pytest.param([*DOWNLOAD[:1], "gpt2", *DOWNLOAD[2:]], r"^got 'gpt2', not a Hugging Face repo id, in REPO_ID; give the organisation and the name as the Hub shows them, ORG/NAME \(e\.g\. Qwen/Qwen2\.5-0\.5B\)$", 1, id="repo_id=no-org"),
    flag("checkpoint_dir", "{tiny_yaml}", r"/tiny\.yaml is an existing file, in --checkpoint_dir; choose a folder path$", base=DOWNLOAD[:2]),
    flag("revision", "", r"^revision '' is empty or padded, in --revision; give a branch, tag or commit$", base=DOWNLOAD),
    flag("access_token", " ", r"^the token is empty, in --access_token; give a token, or leave the flag out to use HF_TOKEN$", base=DOWNLOAD),
    flag("tokenizer_only", "maybe", r"^got maybe, expected bool, in --tokenizer_only; see `litliger download --help`$", USAGE, base=DOWNLOAD),
    flag("dtype", "int8", r"^got int8, not a floating-point dtype, in --dtype; use one of bfloat16, float16, float32", base=DOWNLOAD),
    flag("overwrite", "maybe", r"^got maybe, expected bool, in --overwrite; see `litliger download --help`$", USAGE, base=DOWNLOAD),
    pytest.param([*DOWNLOAD, "--tokenizer_only", "true", "--dtype", "bfloat16"], r"^--dtype casts weights, and --tokenizer_only true fetches none, in --dtype; drop one of them$", 1, id="tokenizer_only=with-dtype"),
    pytest.param(["convert_from_hf", "{missing}", "{out}"], r"/missing is not a Hugging Face model folder: config\.json is missing$", 1, id="hf_dir=missing"),
    pytest.param(["convert_from_hf", "{missing}", "{tokenizer_dir}"], r"^output folder .*/tokenizer is not empty \(.*\); choose an empty or new folder, or pass --overwrite true", 1, id="out_dir=not-empty"),
    flag("dtype", "int8", r"^got int8, not a floating-point dtype, in --dtype; use one of bfloat16, float16, float32 \(or torch\.<name> of another floating-point dtype\)$", 1, base=["convert_from_hf", "{missing}", "{out}"]),
    flag("overwrite", "maybe", r"^got maybe, expected bool, in --overwrite; see `litliger convert_from_hf --help`$", USAGE, base=["convert_from_hf", "{missing}", "{out}"]),
    pytest.param(["convert_from_hf", "{peft_adapter}", "{out}"], r"/peft_adapter is a PEFT adapter \(adapter_config\.json\), in --base; name the litliger checkpoint folder of the model it adapts", 1, id="base=none"),
    flag("base", "{missing}", r"/missing is not a litliger checkpoint folder: model_config\.yaml is missing", 1, base=["convert_from_hf", "{peft_adapter}", "{out}"]),
    flag("base", "{ckpt}", r"/missing is not a PEFT adapter folder \(no adapter_config\.json\), in --base; --base is for adapters: drop it to convert a full model$", 1, base=["convert_from_hf", "{missing}", "{out}"]),
    pytest.param(["convert_to_hf", "{missing}", "{out}"], r"/missing is not a litliger checkpoint folder: model_config\.yaml is missing", 1, id="checkpoint_dir=missing"),
    pytest.param(["convert_to_hf", "{ckpt}", "{ckpt}"], r"^output folder .*/ckpt is the input folder; choose another folder$", 1, id="out_dir=input"),
    flag("dtype", "torch.nope", r"^got torch\.nope, not a floating-point dtype, in --dtype; use one of bfloat16, float16, float32 \(or torch\.<name> of another floating-point dtype\)$", 1, base=["convert_to_hf", "{ckpt}", "{out}"]),
    flag("overwrite", "maybe", r"^got maybe, expected bool, in --overwrite; see `litliger convert_to_hf --help`$", USAGE, base=["convert_to_hf", "{ckpt}", "{out}"]),
    flag("format", "lora", r"^got lora, expected one of 'full', 'peft', in --format; see `litliger convert_to_hf --help`$", USAGE, base=["convert_to_hf", "{ckpt}", "{out}"]),
    flag("format", "peft", r"/ckpt is not a finetune checkpoint \(finetune\.yaml missing\), in --format peft; give a step folder of a LoRA finetune, or use --format full for a model$", 1, base=["convert_to_hf", "{ckpt}", "{out}"]),
    # convert_to_gguf: the output is one file; the gguf package is imported only by this command
    pytest.param(["convert_to_gguf", "{missing}", "{out}"], r"/missing is not a litliger checkpoint folder: model_config\.yaml is missing", 1, id="checkpoint_dir=missing"),
    pytest.param(["convert_to_gguf", "{ckpt}", "{ckpt}/model.gguf"], r"^output file .*/ckpt/model\.gguf is inside the input .*/ckpt; choose a path outside it$", 1, id="out_file=inside-input"),
    pytest.param(["convert_to_gguf", "{ckpt}", "{tiny_yaml}"], r"^output file .*/tiny\.yaml exists; choose a new file, or pass --overwrite true to replace it$", 1, id="out_file=exists"),
    flag("dtype", "q4_0", r"^got q4_0, not a GGUF type litliger writes, in --dtype; use one of f32, f16, bf16, q8_0$", 1, base=["convert_to_gguf", "{ckpt}", "{out}"]),
    flag("overwrite", "maybe", r"^got maybe, expected bool, in --overwrite; see `litliger convert_to_gguf --help`$", USAGE, base=["convert_to_gguf", "{ckpt}", "{out}"]),
    pytest.param(["upgrade_checkpoint", "{ckpt}"], r"/ckpt holds no training state of an earlier litliger \(training_state/rank00000\.pt\), in upgrade_checkpoint; nothing to convert$", 1, id="checkpoint_dir=not-legacy"),
    # generate: sampling arguments (checked before the checkpoint is read)
    flag("max_new_tokens", "-1", must("max_new_tokens", "-1", ">= 0"), base=["generate", "{ckpt}"]),
    flag("temperature", "-1", must("temperature", r"-1\.0", ">= 0"), base=["generate", "{ckpt}"]),
    flag("top_k", "0", must("top_k", "0", ">= 1"), base=["generate", "{ckpt}"]),
    flag("top_p", "0", must("top_p", r"0\.0", r"in \(0, 1\]"), base=["generate", "{ckpt}"]),
    flag("top_p", "1.01", must("top_p", r"1\.01", r"in \(0, 1\]"), base=["generate", "{ckpt}"]),
    flag("device", "tpu", r"^device='tpu' is not a device, in --device; ", base=["generate", "{ckpt}"]),
    flag("precision", "bf16-mixed", r"^got bf16-mixed, expected one of 'auto', '32-true', 'bf16-true', '16-true', in --precision; ", USAGE, base=["generate", "{ckpt}"]),
    flag("prompt", "", r"^the prompt is empty, in --prompt; ", base=["generate", "{ckpt}"]),
    flag("seed", "abc", r"^got abc, expected int, in --seed; see `litliger generate --help`$", USAGE, base=["generate", "{ckpt}"]),
    flag("raw", "maybe", r"^got maybe, expected bool, in --raw; see `litliger generate --help`$", USAGE, base=["generate", "{ckpt}"]),
    pytest.param(["generate", "{ckpt}", "--prompt", "alpha beta " * 40], r"^the prompt is \d+ tokens, longer than the model's max_seq_length=32, in --prompt; shorten it$", 1, id="prompt=too-long"),
    pytest.param(["generate", "{no_tokenizer}", "--prompt", "a"], r"^No tokenizer\.json in .*/no_tokenizer: the checkpoint has no tokenizer, in CHECKPOINT_DIR; copy ", 1, id="checkpoint_dir=no-tokenizer"),
    # generate: checkpoint folders with a missing or corrupt file name the file
    pytest.param(["generate", "{missing}"], r"^No tokenizer\.json in .*/missing: ", 1, id="checkpoint_dir=missing"),
    pytest.param(["generate", "{corrupt_model_config}"], rf"^invalid YAML \(.*\), in .*/corrupt_model_config/{CONFIG_FILE}; ", 1, id="corrupt-model_config.yaml"),
    pytest.param(["generate", "{corrupt_tokenizer}"], r"^unreadable tokenizer \(.*\), in .*/corrupt_tokenizer/tokenizer\.json; ", 1, id="corrupt-tokenizer.json"),
    pytest.param(["generate", "{corrupt_tokenizer_config}"], r"^invalid JSON \(.*\), in .*/corrupt_tokenizer_config/tokenizer_config\.json; ", 1, id="corrupt-tokenizer_config.json"),
    pytest.param(["generate", "{corrupt_config_json}"], r"^invalid JSON \(.*\), in .*/corrupt_config_json/config\.json; ", 1, id="corrupt-config.json"),
    pytest.param(["generate", "{corrupt_generation_config}"], r"^not a JSON object, in .*/corrupt_generation_config/generation_config\.json; ", 1, id="corrupt-generation_config.json"),
    pytest.param(["generate", "{truncated_weights}"], rf"^.*/truncated_weights/{MODEL_FILE} is not a readable safetensors file .*; the checkpoint is corrupt", 1, id="truncated-model.safetensors"),
    # chat: sampling arguments and the cache's length
    flag("max_new_tokens", "-1", must("max_new_tokens", "-1", ">= 0"), base=CHAT),
    flag("temperature", "-0.1", must("temperature", r"-0\.1", ">= 0"), base=CHAT),
    flag("top_k", "0", must("top_k", "0", ">= 1"), base=CHAT),
    flag("top_p", "2", must("top_p", r"2\.0", r"in \(0, 1\]"), base=CHAT),
    flag("max_seq_length", "0", must("max_seq_length", "0", ">= 1"), base=CHAT),
    flag("max_seq_length", "33", r"^max_seq_length=33 exceeds the model's block_size=32, in --max_seq_length; use at most 32$", base=CHAT),
    flag("precision", "64-true", r"^got 64-true, expected one of .*, in --precision; ", USAGE, base=CHAT),
    flag("device", "cuda:x", r"^device='cuda:x' is not a device, in --device; ", base=CHAT),
    flag("seed", "abc", r"^got abc, expected int, in --seed; see `litliger chat --help`$", USAGE, base=CHAT),
    pytest.param(["chat", "{no_tokenizer}"], r"^No tokenizer\.json in .*/no_tokenizer: the checkpoint has no tokenizer, in CHECKPOINT_DIR; ", 1, id="checkpoint_dir=no-tokenizer"),
    # evaluate
    flag("batch_size", "0", must("batch_size", "0", ">= 1"), base=EVALUATE),
    flag("max_seq_length", "0", must("max_seq_length", "0", ">= 1"), base=EVALUATE),
    flag("max_seq_length", "64", r"^max_seq_length=64 exceeds the model's block_size=32, in --max_seq_length; ", base=EVALUATE),
    flag("max_batches", "0", must("max_batches", "0", ">= 1"), base=EVALUATE),
    flag("precision", "fp32", r"^got fp32, expected one of .*, in --precision; ", USAGE, base=EVALUATE),
    flag("device", "tpu", r"^device='tpu' is not a device, in --device; ", base=EVALUATE),
    flag("out_file", "{ckpt}", r"/ckpt is a folder, in --out_file; give the path of a file to write the JSON to$", base=EVALUATE),
    flag("out_file", "{tiny_yaml}/eval.json", r"/tiny\.yaml is a file, not a folder, in --out_file .*/tiny\.yaml/eval\.json; ", base=EVALUATE),
    flag("data", "litliger.data.Nope", r"^litliger\.data\.Nope: module 'litliger\.data' has no attribute 'Nope', in --data; ", USAGE, base=EVALUATE),
    flag("tasks", "{missing}.yaml", r"/missing\.yaml does not exist, in --tasks; give an existing YAML file$", base=["evaluate", "{ckpt}"]),
    flag("tasks", "x", r"^--tasks evaluates lm_eval tasks; --data, --max_seq_length and --max_batches are for the perplexity ", base=EVALUATE),
    flag("limit", "3", r"^--limit and --num_fewshot are for lm_eval tasks; add --tasks, or leave them out$", base=["evaluate", "{ckpt}"]),
    flag("limit", "0", must("limit", "0", ">= 1"), base=["evaluate", "{ckpt}", "--tasks", "x"]),
    # serve: everything is checked before the model loads
    flag("port", "70000", r"^port=70000 is not a TCP port, in --port; use 1\.\.65535, or 0 for any free port$", base=["serve", "{ckpt}"]),
    flag("max_batch_size", "0", must("max_batch_size", "0", ">= 1"), base=["serve", "{ckpt}"]),
    flag("max_seq_length", "0", must("max_seq_length", "0", ">= 1"), base=["serve", "{ckpt}"]),
    flag("api_key", " ", r"^the API key is empty or padded with spaces, in --api_key; ", base=["serve", "{ckpt}"]),
    flag("model_name", " ", r"^model_name is empty, in --model_name; ", base=["serve", "{ckpt}"]),
    flag("device", "tpu", r"^device='tpu' is not a device, in --device; ", base=["serve", "{ckpt}"]),
    flag("precision", "fp32", r"^got fp32, expected one of .*, in --precision; ", USAGE, base=["serve", "{ckpt}"]),
    flag("max_body_bytes", "0", must("max_body_bytes", "0", ">= 1"), base=["serve", "{ckpt}"]),
    pytest.param(["serve", "{missing}", "--port", "0"], r"^No tokenizer\.json in .*/missing: the checkpoint has no tokenizer, in CHECKPOINT_DIR; ", 1, id="checkpoint_dir=missing"),
    flag("num_fewshot", "-1", must("num_fewshot", "-1", ">= 0"), base=["evaluate", "{ckpt}", "--tasks", "x"]),
    flag("host", "no.such.host.invalid", r"^cannot listen on no\.such\.host\.invalid:8000 \(.*\), in --host/--port; ", base=["serve", "{ckpt}"]),
    # prepare
    pytest.param(["prepare", "--out_dir", "{out}"], r"^no data, in --data; name a corpus, e\.g\. --data litliger\.data\.Corpus", 1, id="data=none"),
    pytest.param(["prepare", "--data", "litliger.data.Corpus", "--data.path", "{corpus}"], r"^no output, in --out_dir; give a new or empty folder", 1, id="out_dir=none"),
    pytest.param(["prepare", "--data", "litliger.data.TokenShards", "--data.path", "{corpus}", "--out_dir", "{out}"], r"^litliger prepare reads a corpus .* got TokenShards, in --data$", 1, id="data=TokenShards"),
    pytest.param([*PREPARE, "--tokenizer_dir", "{corpus}"], r"holds no tokenizer\.json, in --tokenizer_dir; name a tokenizer folder$", 1, id="tokenizer_dir=corpus"),
    pytest.param(PREPARE, r"^no tokenizer, in --tokenizer_dir; name a tokenizer folder, or give --vocab_size", 1, id="tokenizer_dir=none"),
    pytest.param([*PREPARE, "--vocab_size", "100"], must("vocab_size", "100", ">= 257"), 1, id="vocab_size=100"),
    pytest.param([*PREPARE, "--num_proc", "0"], must("num_proc", "0", ">= 1"), 1, id="num_proc=0"),
    pytest.param([*PREPARE, "--num_nodes", "0"], must("num_nodes", "0", ">= 1"), 1, id="num_nodes=0"),
    pytest.param(["prepare", "--data", "litliger.data.Corpus", "--data.path", "{corpus}", "--out_dir", "s3://nowhere/x", "--storage_options", '{{"endpoint_url": "https://127.0.0.1:1"}}'], r"^cannot reach s3://nowhere/x at endpoint https://127\.0\.0\.1:1 \(.*\); check the endpoint_url in --storage_options / AWS_ENDPOINT_URL, the credentials, and that the bucket 'nowhere' exists$", 1, id="storage_options=unreachable"),
    pytest.param([*PREPARE, "--num_nodes", "2", "--node_rank", "2"], r"^node_rank=2 is not in \[0, 2\), in --node_rank; ", 1, id="node_rank=2"),
    pytest.param([*EVALUATE, "--data", "litliger.data.TextFiles", "--data.train_data_path", "{corpus}", "--data.val_split_fraction", "0"], r"^TextFiles has no validation split, in --data; set --data\.val_split_fraction above 0$", 1, id="data=no-val-split"),
    pytest.param(["evaluate", "{no_tokenizer}"], r"^No tokenizer\.json in .*/no_tokenizer: the checkpoint has no tokenizer, in CHECKPOINT_DIR; ", 1, id="checkpoint_dir=no-tokenizer"),
    # resume: a training checkpoint with a corrupt training state names the file
    # plot
    pytest.param(["plot", "{missing}"], r"/missing does not exist, in OUT_DIRS; give the out_dir of a training run", 1, id="out_dirs=missing"),
    pytest.param(["plot", "{corpus}"], r"/corpus holds no metrics\.jsonl, in OUT_DIRS; give the out_dir of a training run", 1, id="out_dirs=no-metrics"),
    pytest.param(["plot", "{corpus}", "--smooth", "1.5"], must("smooth", r"1\.5", r"in \[0\.0, 1\.0\)"), 1, id="smooth=1.5"),
    pytest.param(["plot", "{corpus}", "--x", "epochs"], r"^got epochs, expected one of 'steps', 'tokens', in --x; ", USAGE, id="x=epochs"),
    pytest.param(["plot", "{corpus}", "--out_file", "{corpus}"], r"/corpus is a folder, in --out_file; give the path of the PNG file to write$", 1, id="out_file=folder"),
    pytest.param([*RESUME, "{corrupt_state}"], r"/corrupt_state/training_state/state\.json is corrupt \(.*\); resume from another", 1, id="corrupt-state.json"),
    pytest.param([*RESUME, "{corrupt_rank_state}"], r"/corrupt_rank_state/training_state/rank0+\.json has \d+ bytes but was written with \d+: the file is corrupt or incomplete", 1, id="corrupt-rank-state"),
]  # fmt: skip


class Files:
    """The inputs the rows name, each built on first use (``{name}`` in a row's argv)."""

    def __init__(self, root: Path):
        self.root = root

    def _write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    @cached_property
    def missing(self) -> Path:
        return self.root / "missing"

    @cached_property
    def bad_yaml(self) -> Path:
        return self._write("bad.yaml", "train:\n  max_steps: [1\n")

    @cached_property
    def unknown_key_yaml(self) -> Path:
        return self._write("unknown_key.yaml", "model_name: debug-llama\ntrain:\n  max_stepz: 1\n")

    @cached_property
    def model_unknown_field(self) -> Path:
        return self._write("model_unknown_field.yaml", "name: bad\nn_layerz: 2\n")

    @cached_property
    def model_wrong_type(self) -> Path:
        return self._write("model_wrong_type.yaml", "name: bad\nn_embd: abc\n")

    @cached_property
    def model_bad_value(self) -> Path:
        return self._write("model_bad_value.yaml", "name: bad\nn_embd: 30\nn_head: 4\n")

    @cached_property
    def config(self) -> Config:
        return Config(name="tiny", block_size=32, vocab_size=320, padding_multiple=64, n_layer=1, n_embd=32,
                      n_head=2, n_query_groups=1, intermediate_size=64, norm_class="RMSNorm", mlp_class="SwiGLUMLP",
                      bias=False)  # fmt: skip

    @cached_property
    def tiny_yaml(self) -> Path:
        path = self.root / "tiny.yaml"
        self.config.save(path)
        return path

    @cached_property
    def tokenizer(self) -> Tokenizer:
        corpus = self.root / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text("alpha beta gamma delta epsilon zeta eta theta\n" * 20)
        return Tokenizer.train_bpe([corpus / "a.txt"], vocab_size=270, cache_dir=self.root / "bpe")

    @cached_property
    def tokenizer_dir(self) -> Path:
        self.tokenizer.save(self.root / "tokenizer")
        return self.root / "tokenizer"

    @cached_property
    def ckpt(self) -> Path:
        torch.manual_seed(0)
        weights = parameter_state_dict(GPT(self.config))
        return save_checkpoint(self.root / "ckpt", weights, self.config, save_tokenizer=self.tokenizer.save)

    def _broken_copy(self, name: str, source: Path, file: str, content: bytes | None = None) -> Path:
        """A copy of ``source`` whose ``file`` holds ``content`` (default: its first 100 bytes). A model folder's
        copy records no checksums (as a hand-made folder), so the reader of ``file`` itself must name the problem
        (with checksums, the verification names it first: tests/test_trust.py); a training checkpoint keeps them."""
        copy = self.root / name
        shutil.copytree(source, copy)
        if not (copy / "training_state").is_dir():
            (copy / CHECKSUMS_FILE).unlink()
        data = (copy / file).read_bytes()
        (copy / file).write_bytes(data[:100] if content is None else content)
        return copy

    def _teacher(self, name: str, config: Config, tokenizer: Tokenizer) -> Path:
        """A checkpoint of ``config`` (random weights) with ``tokenizer``: a --teacher_dir for ``ckpt``."""
        torch.manual_seed(1)
        weights = parameter_state_dict(GPT(config))
        return save_checkpoint(self.root / name, weights, config, save_tokenizer=tokenizer.save)

    @cached_property
    def teacher_other_vocab(self) -> Path:
        return self._teacher(
            "teacher_other_vocab",
            dataclasses.replace(self.config, vocab_size=384, padded_vocab_size=None),
            self.tokenizer,
        )

    @cached_property
    def teacher_other_tokenizer(self) -> Path:
        """ckpt's config and vocabulary size, with a tokenizer trained on another text."""
        text = self.root / "other.txt"
        text.write_text("omega psi chi phi upsilon tau\n" * 20)
        other = Tokenizer.train_bpe([text], vocab_size=270, cache_dir=self.root / "bpe-other")
        return self._teacher("teacher_other_tokenizer", self.config, other)

    @cached_property
    def pairs(self) -> Path:
        return self._write("pairs.jsonl", '{"prompt": "alpha", "chosen": "beta", "rejected": "gamma"}\n' * 4)

    @cached_property
    def finetune_record(self) -> Path:
        """A folder with only a finetune.yaml naming ``ckpt`` as its base: merge_lora checks its output folder
        before it reads anything else."""
        folder = self.root / "finetune_record"
        folder.mkdir()
        base = {"checkpoint_dir": str(self.ckpt), "tensors_sha256": "0" * 64}
        (folder / "finetune.yaml").write_text(yaml.safe_dump({"method": "lora", "trainable": [], "base": base}))
        return folder

    @cached_property
    def peft_adapter(self) -> Path:
        """A PEFT LoRA folder's adapter_config.json (no weights: the rows fail before they are read)."""
        folder = self.root / "peft_adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
        return folder

    @cached_property
    def corpus(self) -> Path:
        assert self.tokenizer is not None  # writes the corpus
        return self.root / "corpus"

    @cached_property
    def no_tokenizer(self) -> Path:
        copy = self.root / "no_tokenizer"
        shutil.copytree(self.ckpt, copy)
        (copy / "tokenizer.json").unlink()
        (copy / CHECKSUMS_FILE).unlink()
        return copy

    @cached_property
    def corrupt_model_config(self) -> Path:
        return self._broken_copy("corrupt_model_config", self.ckpt, CONFIG_FILE, b"n_layer: [1\n")

    @cached_property
    def corrupt_tokenizer(self) -> Path:
        return self._broken_copy("corrupt_tokenizer", self.ckpt, "tokenizer.json")

    @cached_property
    def corrupt_tokenizer_config(self) -> Path:
        return self._broken_copy("corrupt_tokenizer_config", self.ckpt, "tokenizer_config.json", b'{"eos_token": ')

    @cached_property
    def corrupt_config_json(self) -> Path:
        copy = self._broken_copy("corrupt_config_json", self.ckpt, "tokenizer_config.json")
        (copy / "tokenizer_config.json").write_bytes((self.ckpt / "tokenizer_config.json").read_bytes())
        (copy / "config.json").write_bytes(b"\xff\xfe not json")
        return copy

    @cached_property
    def corrupt_generation_config(self) -> Path:
        copy = self._broken_copy("corrupt_generation_config", self.ckpt, "tokenizer_config.json")
        (copy / "tokenizer_config.json").write_bytes((self.ckpt / "tokenizer_config.json").read_bytes())
        (copy / "generation_config.json").write_text("[1, 2]")
        return copy

    @cached_property
    def truncated_weights(self) -> Path:
        return self._broken_copy("truncated_weights", self.ckpt, MODEL_FILE)

    @cached_property
    def training_ckpt(self) -> Path:
        """A real training checkpoint: a 0-step run writes final/ with the optimizer and RNG state."""
        out = self.root / "run"
        return litliger.recipes.pretrain.setup(
            model_config=self.config,
            out_dir=out,
            accelerator="cpu",
            tokenizer_dir=self.tokenizer_dir,
            train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_steps=0, lr_warmup_steps=0),
            eval=EvalArgs(interval=None, final_validation=False),
            optimizer=OptimizerArgs(),
        )

    @cached_property
    def corrupt_state(self) -> Path:
        return self._broken_copy("corrupt_state", self.training_ckpt, "training_state/state.json", b'{"step": ')

    @cached_property
    def corrupt_rank_state(self) -> Path:
        return self._broken_copy("corrupt_rank_state", self.training_ckpt, "training_state/rank00000.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LITLIGER_DEBUG", raising=False)


def _no_training(*args, **kwargs):
    raise RuntimeError("the bad input was not refused before the training session")


# Flags with no value to refuse (any text is valid), with the reason; for every command that has the flag.
UNCHECKED = {
    "sample.prompt": "free text: any string is a prompt (empty: the pretrain sample starts from nothing)",
}


def command_flags() -> dict[str, set[str]]:
    """Command -> the names of its flags and positionals: every parameter of the function it runs, an argument
    group (a dataclass default, ``train: TrainArgs = TrainArgs()``) as its fields (``train.max_steps``)."""
    flags = {}
    for command, function in _commands().items():
        names = set()
        for name, parameter in inspect.signature(function).parameters.items():
            if dataclasses.is_dataclass(parameter.default):
                names |= {f"{name}.{field.name}" for field in dataclasses.fields(parameter.default)}
            else:
                names.add(name)
        flags[command] = names
    return flags


def test_every_flag_has_a_row():
    """A new parameter of any command, or a new field of an argument group, must come with its check and a row
    (or an UNCHECKED entry saying why there is nothing to refuse).

    A row covers the flag its id names (``<flag>=<value>``) for the command it runs; a group field's check
    lives in its dataclass, so one row covers it for every command that takes the group."""
    flags = command_flags()
    assert set(flags) == {*_commands()} and all(flags.values())
    covered = {(row.values[0][0], row.id.split("=", 1)[0]) for row in ROWS}
    covered_anywhere = {name for _, name in covered}
    missing = []
    for command, names in flags.items():
        for name in sorted(names - set(UNCHECKED)):
            group_field = "." in name
            if (command, name) not in covered and not (group_field and name in covered_anywhere):
                missing.append(f"{command} --{name}")
    assert missing == []
    assert set(UNCHECKED) <= set().union(*flags.values()), "an UNCHECKED entry names no flag of any command"


@pytest.mark.parametrize(("argv", "expected", "code"), ROWS)
def test_bad_input_is_one_line(argv, expected, code, files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    names = {field for arg in argv for _, field, _, _ in string.Formatter().parse(arg) if field}
    values = {name: getattr(files, name) for name in names - {"out"}}
    argv = [arg.format(out=out, **values) for arg in argv]
    if "--resume" not in argv:
        monkeypatch.setattr(litliger.recipes.pretrain, "training_session", _no_training)
    for recipe in (litliger.recipes.pretrain, litliger.recipes.finetune):
        monkeypatch.setattr(recipe, "data_loaders", _no_training)  # a row in the session goes no further
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("litliger: error: "), err
    assert re.search(expected, lines[0].removeprefix("litliger: error: ")), lines[0]
    assert exit_info.value.code == code, err
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written in ([], [LOCK_FILE]), written  # a resume reads the checkpoint under the run lock (left empty)
    assert elapsed < 30, f"took {elapsed:.1f} s: a bad input must be refused before any real work"


def test_interrupt_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(checkpoint_dir: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(litliger.inference.generate, "main", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ckpt"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "litliger: interrupted\n"


def test_checkpoint_exception_is_one_line(capsys, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    # what torch.distributed.checkpoint raises (a BaseException, not an Exception) for a bad shard
    def broken(checkpoint_dir: Path) -> None:
        raise CheckpointException("load failed", {0: (FileNotFoundError("__0_0.distcp: no such file"), None)})

    monkeypatch.setattr(litliger.inference.generate, "main", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ckpt"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "litliger: error: a distributed checkpoint could not be read or written "
        "(rank 0: __0_0.distcp: no such file); resume from another checkpoint\n"
    )


def test_debug_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("LITLIGER_DEBUG", "1")
    with pytest.raises(ValueError, match=r"^top_k=0 must be >= 1, in --top_k; "):
        main(["generate", "ckpt", "--top_k", "0"])


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bugs_are_not_disguised_as_user_errors(monkeypatch):
    def bug(checkpoint_dir: Path) -> None:
        raise TypeError("a programming error keeps its traceback")

    monkeypatch.setattr(litliger.inference.generate, "main", bug)
    with pytest.raises(TypeError):
        main(["generate", "ckpt"])


# --- what the checked sampling values do ----------------------------------------------------------------


def test_top_p_keeps_the_most_likely_tokens_up_to_the_first_that_reaches_p():
    from litliger.inference.sampling import _top_p_filter

    logits = torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25]))
    for top_p, kept in [(0.4, [1]), (0.7, [1, 3]), (0.8, [1, 2, 3]), (1.0, [0, 1, 2, 3])]:
        filtered = _top_p_filter(logits, top_p)
        assert torch.isfinite(filtered).nonzero().flatten().tolist() == kept, top_p
        assert torch.equal(filtered[kept], logits[kept])  # kept logits are unchanged


def test_tiny_top_p_samples_greedily():
    from litliger.inference.generate import generate

    class Fixed(torch.nn.Module):  # the same next-token distribution everywhere, most likely token 3
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = torch.tensor([0.0, 1.0, 2.0, 2.5, 0.5])
            return logits.expand(idx.shape[0], idx.shape[1], 5)

    out = generate(Fixed(), torch.zeros(1, 1, dtype=torch.long), 20, max_seq_length=8, temperature=1.5, top_p=0.01,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out[0, 1:].tolist() == [3] * 20
    sampled = generate(Fixed(), torch.zeros(1, 1, dtype=torch.long), 20, max_seq_length=8, temperature=1.5,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert set(sampled[0, 1:].tolist()) != {3}  # without top_p the same seed samples other tokens too
