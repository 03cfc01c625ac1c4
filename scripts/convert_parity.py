"""Per-family max |logit difference| for both conversion directions (and the Triton backend).

Run: python scripts/convert_parity.py  (needs the test extra: transformers)
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_convert as tc
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
