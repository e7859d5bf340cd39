"""The documented example of docs/export.md (plain onnxruntime + manifest.json, no milora
import) runs on an export and generates the same greedy tokens as the PyTorch reference."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from export_helpers import TENANTS, make_model_dir
from milora.export.exporter import export, load_base
from milora.model.model import MiloraModel

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_documented_example_matches_reference(tmp_path):
    tenants = {k: TENANTS[k] for k in ("alpha", "beta")}
    model_dir = make_model_dir(tmp_path, tenants)
    out = tmp_path / "out"
    export(model_dir, out, validate=False, progress=False)
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert "import milora" not in code and "from milora" not in code
    script = tmp_path / "example.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, prompt, tokens in zip(result["tenants"], result["prompts"], result["tokens"]):
        model = MiloraModel.from_pretrained(load_base(model_dir, "float32"), model_dir / "adapters" / name)
        seq = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=len(tokens),
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == want, (name, tokens, want)
