"""Per-family max |logit difference| for both conversion directions (and the Triton backend).

Run: python -m benchmarks.convert_parity  (needs the test extra: transformers)

The families, tiny models and logit helpers are those of tests/test_convert.py, loaded from its file (the tests
folder is not a package).
"""

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

from benchmarks import REPO

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: the Triton rows run interpreted


def load_test_convert() -> ModuleType:
    spec = importlib.util.spec_from_file_location("test_convert", REPO / "tests" / "test_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    argparse.ArgumentParser(
        prog="python -m benchmarks.convert_parity", description=__doc__.split("\n\n")[0]
    ).parse_args()
    tc = load_test_convert()
    import torch
    import transformers

    from litliger.convert import convert_from_hf, convert_to_hf

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, fp32 CPU, B=2 T={tc.T}")
    print(f"{'family':10s} {'from_hf torch':>14s} {'from_hf triton':>15s} {'to_hf':>10s}")
    for case in tc.CASES:
        root = Path(tempfile.mkdtemp())
        model = tc.hf_model(case)
        model.save_pretrained(root / "hf")
        convert_from_hf(root / "hf", root / "lit")
        idx = tc.sample_idx()
        ref = tc.hf_logits(model, idx)
        a = tc.max_diff(tc.our_logits(root / "lit", idx, "torch"), ref)
        b = tc.max_diff(tc.our_logits(root / "lit", idx, "triton"), ref)
        convert_to_hf(root / "lit", root / "back")
        back = transformers.AutoModelForCausalLM.from_pretrained(root / "back").eval()
        c = tc.max_diff(tc.hf_logits(back, idx), tc.our_logits(root / "lit", idx))
        print(f"{case:10s} {a:14.3e} {b:15.3e} {c:10.3e}   |logits| max {ref.abs().max().item():.2f}")


if __name__ == "__main__":
    main()
