"""Decoding speed and memory: litliger with the KV cache, litliger re-encoding the context every token, and
``transformers.generate``, on the same converted model, greedy, in one run.

The model is ``--model_name`` from the config registry (default ``bench-gen``: a 4-layer Llama-style model
with grouped-query attention, 25M parameters, vocab 8192), randomly initialised by litliger's init policy,
saved as a checkpoint folder and converted to transformers with ``litliger.convert.convert_to_hf``: both
libraries load the same weights from disk. Each implementation runs in its own subprocess (so its peak
memory is its own): one untimed 8-token warm-up, then ``--new_tokens`` greedy tokens after a
``--prompt_tokens`` random prompt (no EOS stop: every run makes all tokens).

- time to first token: the prefill and the first sampled token (litliger: ``generate_tokens``' first yield;
  transformers: a streamer's second ``put``, the first is the prompt).
- decode tokens/s: the tokens after the first over the time after it; also over the first 64 and the last
  64 of them, which shows how each path scales with the context (the uncached path slows down as it grows).
- peak memory: CUDA ``max_memory_allocated`` above what the loaded model holds; CPU the worker's peak RSS
  above its RSS once the model is loaded (the KV cache, activations and logits of generation).
- same tokens: whether the three greedy outputs are token-identical.

    python -m benchmarks.generate --threads 1                      # CPU
    python -m benchmarks.generate --model_name Llama-3.2-1B --device cuda --precision bf16-true

Results go to ``--out`` (bench_generate.json) with the device, versions and the command line. On a CPU
shared with other work pass ``--threads 1`` (see benchmarks/finetune.py for why).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPO, argv_as_run, child_env, module_argv
from benchmarks.memory import MIB, fix_mmap_threshold, max_rss_bytes, rss_bytes, trim_heap
from litliger import GPT, Config
from litliger.checkpoint import parameter_state_dict, save_checkpoint

IMPLS = ("litliger-cached", "litliger-uncached", "transformers")
BENCH_CONFIG = dict(
    name="bench-gen", block_size=1024, vocab_size=8192, padding_multiple=64, n_layer=4, n_embd=512, n_head=8,
    n_query_groups=2, intermediate_size=1376, norm_class="RMSNorm", mlp_class="SwiGLUMLP", bias=False,
)  # fmt: skip
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}


def build_checkpoints(model_name: str, root: Path) -> tuple[Path, Path]:
    """A random litliger checkpoint of ``model_name`` and its transformers conversion."""
    from litliger.convert import convert_to_hf

    config = Config(**BENCH_CONFIG) if model_name == "bench-gen" else Config.from_name(model_name)
    torch.manual_seed(0)
    model = GPT(config)
    save_checkpoint(root / "lit", parameter_state_dict(model), config)
    convert_to_hf(root / "lit", root / "hf")
    return root / "lit", root / "hf"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads) if args.threads else None
    device, dtype, cuda = torch.device(args.device), DTYPES[args.precision], args.device.startswith("cuda")
    fix_mmap_threshold()
    prompt = torch.randint(0, 8000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    trim_heap()
    if args.impl == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype).to(device).eval()
    else:
        model = GPT.from_checkpoint(args.lit_dir, device=device, dtype=dtype).eval()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()

    def run(n: int) -> tuple[list[int], list[float], float]:
        start = time.perf_counter()
        stamps, tokens = [], []
        if args.impl == "transformers":
            from transformers.generation.streamers import BaseStreamer

            class Clock(BaseStreamer):
                def put(self, value: torch.Tensor) -> None:
                    stamps.append(time.perf_counter())
                    tokens.extend(value.view(-1).tolist())

                def end(self) -> None:
                    pass

            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0, streamer=Clock())  # fmt: skip
            stamps, tokens = stamps[1:], tokens[prompt.shape[1] :]  # the first put is the prompt
        else:
            from litliger.inference.generate import generate_tokens

            steps = generate_tokens(model, prompt, n, temperature=0, kv_cache=args.impl == "litliger-cached")
            for token in steps:
                tokens.append(int(token))  # a host sync: the token is ready
                stamps.append(time.perf_counter())
        return tokens, stamps, start

    run(8)  # warm-up
    tokens, stamps, start = run(args.new_tokens)
    peak = (torch.cuda.max_memory_allocated() if cuda else max_rss_bytes()) - base
    rate = lambda a, b: (b - a) / (stamps[b] - stamps[a])  # tokens a+1..b over their time
    n = len(stamps) - 1
    return {
        "impl": args.impl,
        "new_tokens": len(tokens),
        "ttft_s": stamps[0] - start,
        "decode_tokens_per_sec": rate(0, n),
        "first_64_tokens_per_sec": rate(0, min(64, n)),
        "last_64_tokens_per_sec": rate(max(0, n - 64), n),
        "peak_mib": peak / MIB,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="bench-gen")
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_generate.json")
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # a worker
    parser.add_argument("--lit_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        lit_dir, hf_dir = build_checkpoints(args.model_name, Path(tmp))
        argv = [f"--{k}={v}" for k, v in vars(args).items() if v is not None and k not in ("out", "impl")]
        results = {}
        for impl in IMPLS:
            job = ("--impl", impl, "--lit_dir", str(lit_dir), "--hf_dir", str(hf_dir))
            cmd = module_argv("benchmarks.generate", *argv, *job)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=child_env()).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
    same = (
        results["litliger-cached"]["tokens"]
        == results["litliger-uncached"]["tokens"]
        == results["transformers"]["tokens"]
    )
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads)"
    )
    what = f"{args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, greedy, {args.precision}"
    print(f"{args.model_name}, {what}, {device}")
    print(f"{'':18s} {'TTFT s':>8s} {'decode tok/s':>12s} {'first 64':>9s} {'last 64':>9s} {'peak MiB':>9s}")
    for impl, r in results.items():
        print(f"{impl:18s} {r['ttft_s']:8.3f} {r['decode_tokens_per_sec']:12.1f} {r['first_64_tokens_per_sec']:9.1f} "
              f"{r['last_64_tokens_per_sec']:9.1f} {r['peak_mib']:9.1f}")  # fmt: skip
    cached, uncached, hf = (results[i] for i in IMPLS)
    speedup = {k: cached[k] / uncached[k] for k in ("first_64_tokens_per_sec", "last_64_tokens_per_sec")}
    print(f"cached / uncached: {speedup['first_64_tokens_per_sec']:.1f}x over the first 64 tokens, "
          f"{speedup['last_64_tokens_per_sec']:.1f}x over the last 64; cached / transformers: "
          f"{cached['decode_tokens_per_sec'] / hf['decode_tokens_per_sec']:.2f}x; same tokens: {same}")  # fmt: skip
    record = {
        "command": shlex.join(argv_as_run("benchmarks.generate")),
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items()
                     if k in ("model_name", "prompt_tokens", "new_tokens", "precision", "threads")},
        "same_tokens": same,
        "cached_over_uncached": speedup,
        "results": {impl: {k: v for k, v in r.items() if k != "tokens"} for impl, r in results.items()},
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
