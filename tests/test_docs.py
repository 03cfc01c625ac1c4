"""The documentation's commands run: every ```bash / ```sh / ```python block of README.md and tutorials/*.md.

Blocks are read from the Markdown at collection time. A bash block is cut into its commands (continuation
lines joined; comment and blank lines dropped), each one test; a python block is one test. Test ids are
``file:line`` of the command's (block's) first line.

How they run:

- the commands of one file run in document order in one temporary working folder of that file, holding a link
  to the repository's ``config_hub/`` (commands say ``config_hub/...``), with ``LITLIGER_CACHE`` in a temporary
  folder of the session, ``litliger`` and ``python`` on PATH (this interpreter), and no network to reach;
- a bash command runs through ``bash -e -c``, a python block through ``python -c``, both with the working folder
  as cwd;
- paths a command names but nothing before it wrote (``out/pretrain/debug/final`` of the quickstart, a user's
  ``my_records.jsonl``, ...) are made just before it by FIXTURES: short runs of the documented commands,
  made once per session and copied in, or tiny generated stand-ins of user data;
- a command that takes longer than a minute on a 2-core CPU runs with the extra flags of SHORTEN appended (and
  nothing else changed);
- a command that runs until stopped (``litliger serve``) is in BACKGROUND: it is started and waited for until it
  prints the line given there, the commands after it talk to it, and the session stops it with SIGTERM at its
  end (it must exit 0);
- a command is left out only through SKIP (never runs here) or GPU (runs only where CUDA is), each with its
  reason. Keys are ``"<file>: <first line of the command, without its trailing comment>"`` (of a python block: its
  first line that is not an import), so they survive
  edits elsewhere in the file; ``test_tables_name_existing_commands`` fails on an entry that matches nothing.
"""

# ruff: noqa: E501 (a table row reads best on one line)

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hf_hub import add_to_cache

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"tutorials/{p.name}" for p in (ROOT / "tutorials").glob("*.md"))]
LANGS = {"bash", "sh", "python"}
TIMEOUT_S = 300

# Left out everywhere, with the reason. Keep this short: prefer FIXTURES stand-ins and SHORTEN.
SKIP = {
    "README.md: pip install -e . && litliger pretrain --config config_hub/pretrain/debug.yaml": "installs the package (network); the same pretrain command runs from tutorials/pretrain.md",
    'README.md: pip install -e ".[test]" && python -m pytest': "installs packages and runs the whole test suite",
    "README.md: litliger pretrain --model_name Qwen2.5-0.5B --data litliger.data.Corpus --data.path "
    '"fineweb/*.parquet" \\': "a 0.5B model on 8 devices",
    'README.md: litliger prepare --data litliger.data.Corpus --data.path "slimpajama/**/*.jsonl.zst" \\': "writes to an s3:// bucket",
    "README.md: litliger pretrain --model_name Qwen2.5-0.5B --data litliger.data.TokenShards --data.path "
    "s3://bucket/slimpajama": "a 0.5B model, reads an s3:// bucket",
    'tutorials/generate.md: lm_eval.simple_evaluate(model=LitligerLM(checkpoint_dir="out/pretrain/debug/final"), '
    'tasks=["hellaswag"])': "downloads the hellaswag dataset",
    "README.md: litliger finetune --config config_hub/finetune/debug-dpo.yaml": "the same command runs from tutorials/align.md",
    'tutorials/generate.md: pip install -e ".[eval]"': "installs a package (network)",
    'tutorials/generate.md: pip install -e ".[serve]"': "installs a package (network)",
    "tutorials/generate.md: litliger evaluate out/pretrain/debug/final --tasks hellaswag,arc_easy --limit 100 "
    "--num_fewshot 0": "downloads the hellaswag and arc_easy datasets",
    "tutorials/generate.md: litliger serve out/finetune/debug/final --port 8080 --api_key "
    '"$(openssl rand -hex 16)" --max_batch_size 16': "the same server with other flags; tests/test_serve.py starts it with --api_key and --max_batch_size",
    "tutorials/generate.md: LITLIGER_API_KEY=secret litliger serve out/pretrain/debug/final --host 0.0.0.0": "listens on every interface; tests/test_serve.py checks the key",
    "README.md: litliger download Qwen/Qwen2.5-0.5B": "the same command runs from tutorials/convert.md",
    "README.md: litliger convert_to_hf out/finetune/debug/step-00000100 hf_export/debug-lora --format peft": "the same command runs from tutorials/convert.md",
    "README.md: litliger convert_from_hf hf_export/debug-lora checkpoints/debug-lora --base out/pretrain/debug/final": "the same command runs from tutorials/convert.md",
    "README.md: litliger convert_to_gguf out/pretrain/debug/final out/debug-q8_0.gguf --dtype q8_0": "the same command runs from tutorials/convert.md",
    "README.md: litliger evaluate out/finetune/debug/final --tasks my_tasks/quiz.yaml --out_file quiz.json": "the same command runs from tutorials/generate.md",
    "README.md: litliger serve out/pretrain/debug/final": "runs until stopped; the same server and requests run from tutorials/generate.md",
    'README.md: curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\': "needs the server; the same request runs from tutorials/generate.md",
    "README.md: litliger finetune --config config_hub/finetune/debug.yaml": "the same command runs from tutorials/finetune.md",
    'tutorials/convert.md: llama-completion -m out/debug-q8_0.gguf -no-cnv -p "def " -n 64 --temp 0': "needs llama.cpp's programs (not installed); tests/test_gguf.py runs the file in llama.cpp through llama-cpp-python",
    'tutorials/convert.md: llama-cli -m out/debug-q8_0.gguf -p "def " -n 64 --temp 0': "needs llama.cpp's programs (not installed); tests/test_gguf.py runs the file in llama.cpp through llama-cpp-python",
    "tutorials/convert.md: llama-server -m out/debug-q8_0.gguf --jinja": "needs llama.cpp's programs (not installed), and runs until stopped",
    "tutorials/convert.md: ollama create debug -f Modelfile": "needs Ollama (not installed)",
    'tutorials/convert.md: ollama run debug "def "': "needs Ollama (not installed)",
    "tutorials/kernels.md: rms_norm(x, weight, eps=1e-6, offset=0.0) -> y": "a list of signatures (the API contract), not code",
    "tutorials/kernels.md: python -m pytest tests/test_kernels_*.py": "runs part of the test suite (minutes)",
    "tutorials/kernels.md: python -m benchmarks.kernels [--interpreter] [--kernels rms_norm rope ...] [--reps 10] "
    "[--out bench_kernels.json]": "a synopsis ([optional] flags), and a benchmark of minutes",
    "tutorials/kernels.md: python -m benchmarks.flce_memory [--device cpu|cuda] [--include-interpreter] "
    "[--out bench_flce_memory.json]": "a synopsis ([optional] flags), and a benchmark of minutes",
    "tutorials/kernels.md: pip install liger-kernel": "installs a package (network)",
    "tutorials/multi-node.md: litliger pretrain --config my.yaml --devices 8 --strategy fsdp": "8 devices",
    "tutorials/multi-node.md: torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr node0 "
    "--master_port 29500 \\": "2 machines",
    "tutorials/multi-node.md: torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint "
    "node0:29500 --rdzv-id run42 \\": "2 machines",
    "tutorials/multi-node.md: sbatch examples/slurm_pretrain.sbatch": "a SLURM cluster of 2 nodes x 8 GPUs",
    "tutorials/multi-node.md: torchrun --nnodes 1 --nproc_per_node 8 --max-restarts 3 \\": "8 devices",
    "tutorials/pretrain.md: litliger pretrain --config my.yaml --devices 8 --strategy ddp": "8 devices",
    "tutorials/pretrain.md: litliger pretrain --config my.yaml --devices 8 --strategy fsdp": "8 devices",
    "tutorials/resume.md: litliger upgrade_checkpoint out/run/step-00000400": "needs a checkpoint of an earlier litliger version (pickled training state)",
    "tutorials/resume.md: litliger pretrain --config my.yaml --resume out/run/step-00000400": "needs step 400 of a longer run",
}

# Servers: started in the background, ready when their output has this text; stopped (SIGTERM, exit 0) at the end.
BACKGROUND = {"tutorials/generate.md: litliger serve out/pretrain/debug/final": "listening on http://127.0.0.1:8000"}

# Run only where CUDA is (marked gpu; tests/conftest.py skips them elsewhere), with the reason.
GPU = {
    'tutorials/convert.md: convert_from_hf("path/to/hf_model", "checkpoints/qwen", dtype=torch.bfloat16)': "loads the model on device='cuda'",
    'tutorials/kernels.md: x = torch.randn(4, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)': "CUDA tensors",
    "tutorials/kernels.md: python -m benchmarks.kernels --out bench_kernels.json": "GPU benchmark",
    "tutorials/kernels.md: python -m benchmarks.flce_memory --device cuda --out bench_flce_memory.json": "GPU benchmark",
    "tutorials/kernels.md: python -m pytest -m gpu tests/": "the GPU tests",
    "tutorials/pretrain.md: python -m benchmarks.pretrain --model_name Llama-3.2-1B --seq 2048 --micro_batch 4 "
    "--steps 40": "Llama-3.2-1B on a GPU",
}

# Flags appended to a command that takes over a minute on 2 cores as printed. The debug runs keep their model,
# data and schedule shape; only the number of steps, validation batches and sampled tokens shrink.
SHORT_PRETRAIN = [
    "--train.max_steps",
    "4",
    "--train.save_interval",
    "2",
    "--eval.max_iters",
    "2",
    "--sample.max_new_tokens",
    "8",
]
SHORT_FINETUNE = [
    "--train.max_steps",
    "4",
    "--train.save_interval",
    "2",
    "--eval.max_iters",
    "2",
    "--data.init_args.max_examples",
    "200",
    "--sample.max_new_tokens",
    "8",
]
SHORT_PREFERENCE = ["--train.max_steps", "4", "--train.save_interval", "2", "--eval.max_iters", "2",
                    "--data.init_args.max_pairs", "200"]  # fmt: skip
SHORT_DISTILL = ["--train.max_steps", "4", "--train.save_interval", "2", "--eval.max_iters", "2"]
SHORTEN = {
    "README.md: litliger pretrain --config config_hub/pretrain/debug.yaml --train.max_steps 50 --out_dir out/try": SHORT_PRETRAIN,
    "README.md: litliger pretrain --config config_hub/pretrain/debug.yaml --resume auto": SHORT_PRETRAIN,
    "README.md: litliger pretrain --config config_hub/pretrain/mixture-debug.yaml": SHORT_PRETRAIN,
    "tutorials/finetune.md: litliger pretrain --config config_hub/pretrain/debug.yaml": SHORT_PRETRAIN,
    "tutorials/finetune.md: litliger finetune --config config_hub/finetune/debug.yaml": SHORT_FINETUNE,
    "tutorials/finetune.md: litliger finetune --config config_hub/finetune/debug-packed.yaml": SHORT_FINETUNE,
    "tutorials/finetune.md: litliger pretrain --initial_checkpoint_dir out/finetune/debug/final --config "
    "config_hub/pretrain/debug.yaml \\": SHORT_PRETRAIN,
    "tutorials/pretrain.md: litliger pretrain --config config_hub/pretrain/debug.yaml": SHORT_PRETRAIN,
    "tutorials/align.md: litliger finetune --config config_hub/finetune/debug-dpo.yaml": SHORT_PREFERENCE,
    # three epochs of the stand-in records: four steps show the same flags work
    "README.md: litliger finetune --checkpoint_dir checkpoints/Qwen2.5-0.5B --data litliger.data.Instructions \\": [
        "--train.max_steps",
        "4",
    ],
    "tutorials/align.md: litliger finetune --config config_hub/finetune/debug-kd.yaml": SHORT_DISTILL,
}


# --------------------------------------------------------------------------------------------- the Markdown


@dataclass(frozen=True)
class Snippet:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's (python: the block's) first line
    lang: str
    code: str  # bash: the command with comments removed; python: the block
    key: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _bash_commands(file: str, first: int, lines: list[str]) -> list[Snippet]:
    out, i = [], 0
    while i < len(lines):
        text = _strip_comment(lines[i])
        if not text.strip():
            i += 1
            continue
        start, parts = i, [text]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(_strip_comment(lines[i]))
        i += 1
        out.append(Snippet(file, first + start, "bash", "\n".join(parts), f"{file}: {parts[0].strip()}"))
    return out


def parse(file: str) -> list[Snippet]:
    """The runnable snippets of one Markdown file, in order."""
    lines = (ROOT / file).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,})\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence.group(2)):
            end += 1
        lang, body = fence.group(3), lines[i + 1 : end]
        if lang in ("bash", "sh"):
            out += _bash_commands(file, i + 2, body)
        elif lang == "python":
            first = next((n for n, s in enumerate(body) if s.strip()), 0)
            named = next((s for s in body if s.strip() and not re.match(r"(import|from) ", s)), body[first])
            out.append(Snippet(file, i + 2 + first, "python", "\n".join(body), f"{file}: {_strip_comment(named)}"))
        i = end + 1
    return out


SNIPPETS = [s for f in DOCS for s in parse(f)]


def _param(s: Snippet) -> pytest.param:
    marks = [pytest.mark.slow]
    if s.key in GPU:
        marks.append(pytest.mark.gpu)
    return pytest.param(s, id=s.id, marks=marks)


# ----------------------------------------------------------------------------------- prerequisites, stand-ins


def _debug_env(env: dict[str, str], cwd: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "litliger", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


class Session:
    """What the commands share: the environment, and short runs of the quickstart made once."""

    def __init__(self, base: Path) -> None:
        self.base = base
        (base / "bin").mkdir()
        for name, line in (
            ("litliger", f'exec "{sys.executable}" -m litliger "$@"'),
            ("python", f'exec "{sys.executable}" "$@"'),
        ):
            shim = base / "bin" / name
            shim.write_text(f"#!/bin/sh\n{line}\n")
            shim.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LITLIGER_KERNELS")}
        self.env.update(
            PATH=f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}",
            LITLIGER_CACHE=str(base / "cache"),
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(base / "hf_cache"),  # a cache of stand-ins (FIXTURES), never the user's
            HF_DATASETS_OFFLINE="1",
            WANDB_MODE="disabled",
            PYTHONUNBUFFERED="1",
        )
        self.runs = base / "runs"
        self.workdirs: dict[str, Path] = {}
        self.servers: list[tuple[str, subprocess.Popen]] = []

    def start(self, snippet: Snippet, cwd: Path) -> None:
        """Start a BACKGROUND command and wait for its ready line (its output is read, so it never blocks)."""
        proc = subprocess.Popen(["bash", "-e", "-c", f"exec {snippet.code}"], cwd=cwd, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.servers.append((snippet.id, proc))
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if BACKGROUND[snippet.key] in line:
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the rest
                return
        raise AssertionError(f"{snippet.id} exited ({proc.wait()}) before it was ready:\n{''.join(seen)[-4000:]}")

    def stop_servers(self) -> None:
        codes = {}
        for id, proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            codes[id] = proc.wait(timeout=60)
        assert all(code == 0 for code in codes.values()), f"servers that did not exit 0 on SIGTERM: {codes}"

    def workdir(self, file: str) -> Path:
        if file not in self.workdirs:
            wd = self.base / "work" / file.replace("/", "_")
            wd.mkdir(parents=True)
            (wd / "config_hub").symlink_to(ROOT / "config_hub")
            (wd / "examples").symlink_to(ROOT / "examples")
            self.workdirs[file] = wd
        return self.workdirs[file]

    def pretrain_run(self) -> Path:
        """out/pretrain/debug of the quickstart command, shortened as SHORTEN shortens it."""
        run = self.runs / "out/pretrain/debug"
        if not run.exists():
            self.runs.mkdir(exist_ok=True)
            (self.runs / "config_hub").symlink_to(ROOT / "config_hub", target_is_directory=True)
            _debug_env(self.env, self.runs, "pretrain", "--config", "config_hub/pretrain/debug.yaml", *SHORT_PRETRAIN)
        return run

    def finetune_run(self) -> Path:
        run = self.runs / "out/finetune/debug"
        if not run.exists():
            self.pretrain_run()
            _debug_env(self.env, self.runs, "finetune", "--config", "config_hub/finetune/debug.yaml", *SHORT_FINETUNE)
        return run

    def hf_model(self) -> Path:
        out = self.runs / "hf_model"
        if not out.exists():
            _debug_env(self.env, self.runs, "convert_to_hf", str(self.pretrain_run() / "final"), str(out))
        return out


def _copy(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)


def _pretrained(s: Session, wd: Path) -> None:
    _copy(s.pretrain_run(), wd / "out/pretrain/debug")


def _finetuned(s: Session, wd: Path) -> None:
    _pretrained(s, wd)  # the base its step folders name
    _copy(s.finetune_run(), wd / "out/finetune/debug")


def _finetune_step_100(s: Session, wd: Path) -> None:
    _pretrained(s, wd)
    _copy(s.finetune_run() / "step-00000002", wd / "out/finetune/debug/step-00000100")


def _standin_model(name: str) -> Callable[[Session, Path], None]:
    return lambda s, wd: _copy(s.pretrain_run() / "final", wd / "checkpoints" / name)


def _hub_standin(repo_id: str) -> Callable[[Session, Path], None]:
    """The debug model (as convert_to_hf writes it) as repo ``repo_id`` in the session's Hugging Face cache,
    for `litliger download` (HF_HUB_OFFLINE=1)."""

    def make(s: Session, wd: Path) -> None:
        cache = Path(s.env["HF_HUB_CACHE"])
        if not (cache / f"models--{repo_id.replace('/', '--')}").exists():
            add_to_cache(cache, repo_id, {p.name: p.read_bytes() for p in s.hf_model().iterdir() if p.is_file()})

    return make


RECORDS = [
    {
        "instruction": f"Write a function that returns {n} plus its argument.",
        "input": "",
        "output": f"def add_{n}(x):\n    return x + {n}\n",
    }
    for n in range(40)
] + [
    {"messages": [{"role": "user", "content": f"What is {n} squared?"}, {"role": "assistant", "content": str(n * n)}]}
    for n in range(20)
]

TEXT = "\n".join(
    f"def function_{n}(a, b):\n    '''Line {n} of a small text corpus.'''\n    return a * {n} + b\n" for n in range(60)
)


def _write(path: str, content: str | Callable[[], str]) -> Callable[[Session, Path], None]:
    def make(s: Session, wd: Path) -> None:
        p = wd / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content() if callable(content) else content)

    return make


def _text_folder(folder: str, n: int = 6) -> Callable[[Session, Path], None]:
    def make(s: Session, wd: Path) -> None:
        for k in range(n):
            _write(f"{folder}/part{k}.txt", TEXT.replace("function_", f"f{k}_"))(s, wd)

    return make


def _jsonl_zst(folder: str) -> Callable[[Session, Path], None]:
    def make(s: Session, wd: Path) -> None:
        import zstandard

        (wd / folder).mkdir(parents=True, exist_ok=True)
        for k in range(3):  # 6,000 short records: enough for the 0.1% validation share of the docs to hold some
            lines = "".join(json.dumps({"text": f"record {j} of part {k}: " + TEXT[:200]}) + "\n" for j in range(2000))
            (wd / folder / f"chunk{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))

    return make


def _debug_config(out_dir: str) -> Callable[[], str]:
    """config_hub/pretrain/debug.yaml writing to out_dir, shortened like SHORTEN (a user's my.yaml)."""
    return lambda: (
        (ROOT / "config_hub/pretrain/debug.yaml")
        .read_text()
        .replace("out_dir: out/pretrain/debug", f"out_dir: {out_dir}")
        .replace("max_steps: 500", "max_steps: 4")
        .replace("max_iters: 10", "max_iters: 2")
        .replace("max_new_tokens: 80", "max_new_tokens: 8")
    )


def _my_yaml(s: Session, wd: Path) -> None:
    _write("my.yaml", _debug_config("out/run"))(s, wd)
    _copy(s.pretrain_run(), wd / "out/run")


MY_MIXTURE = """\
data:
  class_path: litliger.data.Mixture
  init_args:
    sources:
      - {name: slimpajama, path: slimpajama/train, glob: "**/*.jsonl.zst", weight: 0.7}
      - {name: notes, path: corpus, glob: "**/*.txt", weight: 0.3}
tokenizer_dir: checkpoints/TinyLlama-1.1B
"""


def _quiz_task(s: Session, wd: Path) -> None:
    """A local multiple-choice lm_eval task on local JSON lines."""
    docs = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " * c"], "label": 0},
            {"question": "import", "choices": [" os", " )("], "label": 0}]  # fmt: skip
    _write("my_tasks/quiz.jsonl", "".join(json.dumps(d) + "\n" for d in docs))(s, wd)
    _write(
        "my_tasks/quiz.yaml",
        f"""task: quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {wd / "my_tasks/quiz.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    )(s, wd)


MY_SCRIPT = """\
import torch
from litliger.kernels import rms_norm, rms_norm_torch

x, w = torch.randn(4, 64), torch.rand(64)
torch.testing.assert_close(rms_norm(x, w), rms_norm_torch(x, w))
"""

# path named by a command -> how it is made when the command runs and the path does not exist yet.
FIXTURES: dict[str, Callable[[Session, Path], None]] = {
    # outputs of the documented debug runs (shortened like SHORTEN), made once and copied in
    "out/pretrain/debug/final": _pretrained,
    "out/finetune/debug/final": _finetuned,
    "out/finetune/debug/step-00000100": _finetune_step_100,  # step 2 of the short run, under the full run's name
    # stand-ins for a user's models: the debug model (the commands' flags and data paths are what is checked)
    "path/to/hf_model": lambda s, wd: _copy(s.hf_model(), wd / "path/to/hf_model"),
    "checkpoints/Qwen2.5-0.5B": _standin_model("Qwen2.5-0.5B"),
    "checkpoints/TinyLlama-1.1B": _standin_model("TinyLlama-1.1B"),
    # stand-ins for Hub repos, in the session's Hugging Face cache (the commands run offline)
    "Qwen/Qwen2.5-0.5B": _hub_standin("Qwen/Qwen2.5-0.5B"),
    "EleutherAI/pythia-160m": _hub_standin("EleutherAI/pythia-160m"),
    # stand-ins for a user's data and files
    "my_records.jsonl": _write("my_records.jsonl", "".join(json.dumps(r) + "\n" for r in RECORDS)),
    "alpaca.json": _write("alpaca.json", json.dumps(RECORDS[:40])),
    "corpus/": _text_folder("corpus"),
    "slimpajama/": _jsonl_zst("slimpajama/train"),
    "my_mixture.yaml": _write("my_mixture.yaml", MY_MIXTURE),
    "my.yaml": _my_yaml,  # a run already in out/run, as the resume commands assume
    "my_script.py": _write("my_script.py", MY_SCRIPT),
    "my_tasks/quiz.yaml": _quiz_task,
}
# what a stand-in needs made before it
FIXTURE_NEEDS = {"my_mixture.yaml": ["slimpajama/", "corpus/", "checkpoints/TinyLlama-1.1B"]}
# configs of config_hub whose checkpoint_dir / teacher_dir / tokenizer_dir name a run's output (the config file
# itself always exists: the command's needs are made when it names the config)
CONFIG_NEEDS = {
    "config_hub/finetune/debug-dpo.yaml": ["out/pretrain/debug/final"],
    "config_hub/pretrain/debug-student.yaml": ["out/pretrain/debug/final"],
    "config_hub/finetune/debug-kd.yaml": ["out/pretrain/debug/final"],
}


@pytest.fixture(scope="session")
def session(tmp_path_factory: pytest.TempPathFactory):
    s = Session(tmp_path_factory.mktemp("docs"))
    yield s
    s.stop_servers()


def _prepare(s: Session, wd: Path, code: str) -> None:
    for config, needs in CONFIG_NEEDS.items():
        for need in needs if config in code else []:
            if not (wd / need).exists():
                FIXTURES[need](s, wd)
    for path, make in FIXTURES.items():
        if path in code and not (wd / path).exists():
            for need in FIXTURE_NEEDS.get(path, []):
                if not (wd / need).exists():
                    FIXTURES[need](s, wd)
            make(s, wd)


# ----------------------------------------------------------------------------------------------------- tests


def test_tables_name_existing_commands() -> None:
    """Every SKIP / GPU / SHORTEN entry still names a command of the docs, with a reason; keys are unique."""
    keys = [s.key for s in SNIPPETS]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    for table in (SKIP, GPU, SHORTEN, BACKGROUND):
        stale = sorted(set(table) - set(keys))
        assert not stale, f"entries that match no command any more (update them): {stale}"
    assert all(reason.strip() for reason in (*SKIP.values(), *GPU.values()))
    assert not set(SKIP) & set(GPU)
    code = "\n".join(s.code for s in SNIPPETS if s.key not in SKIP)
    needed = [*FIXTURE_NEEDS.values(), *CONFIG_NEEDS.values()]
    unused = [p for p in FIXTURES if p not in code and not any(p in n for n in needed)]
    assert all(config in code for config in CONFIG_NEEDS), "a CONFIG_NEEDS entry no command names"
    assert not unused, f"FIXTURES no command needs any more: {unused}"


def test_snippets_found() -> None:
    assert {s.file for s in SNIPPETS} >= {"README.md", "tutorials/pretrain.md", "tutorials/finetune.md"}
    assert len(SNIPPETS) > 40


@pytest.mark.parametrize("snippet", [_param(s) for s in SNIPPETS])
def test_doc_command(snippet: Snippet, session: Session) -> None:
    if snippet.key in SKIP:
        pytest.skip(SKIP[snippet.key])
    wd = session.workdir(snippet.file)
    _prepare(session, wd, snippet.code)
    if snippet.key in BACKGROUND:
        session.start(snippet, wd)
        return
    if snippet.lang == "python":
        cmd = [sys.executable, "-c", snippet.code]
    else:
        extra = " ".join(SHORTEN.get(snippet.key, []))
        cmd = ["bash", "-e", "-c", f"{snippet.code} {extra}".rstrip()]
    proc = subprocess.run(
        cmd, cwd=wd, env=session.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, (
        f"{snippet.id} failed (exit {proc.returncode}) in {wd}:\n{cmd[-1]}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
