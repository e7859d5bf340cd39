"""The runtime must run from OUT_DIR alone on a box without PyTorch: served here in a child
process where torch, transformers and milora's model/export/train layers cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest


BLOCKED = ("torch", "transformers", "milora.model", "milora.export", "milora.train", "milora.assets")

# Installed first in the child: any import of a blocked module raises ImportError.
BLOCKER = textwrap.dedent(f"""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
                raise ImportError(f"{{name}} is blocked: the runtime must not need it")
            return None
    sys.meta_path.insert(0, Block())
""")


@pytest.fixture(scope="module")
def out_dir(tiny_export):
    return tiny_export[1]


def test_runtime_imports_no_torch_or_transformers():
    code = ("import sys, milora.runtime, milora.runtime.engine, milora.runtime.cli, milora.runtime.scoring; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"runtime imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_runtime_serves_with_torch_and_transformers_blocked(out_dir):
    """Engine, tenants added from an OUT_DIR pack, generation, scoring and the CLI, all with
    torch, transformers and milora's torch-side layers unimportable."""
    code = BLOCKER + textwrap.dedent(f"""
        import json
        from milora.runtime import Engine, SamplingParams
        from milora.runtime.scoring import score_options
        from milora.runtime.cli import main
        with Engine({str(out_dir)!r}) as engine:
            engine.remove_tenant("beta")
            engine.add_tenant("beta", {str(out_dir / "adapters" / "beta.safetensors")!r})
            reqs = [engine.submit(t, prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=4, ignore_eos=True))
                    for t in ("alpha", "beta", None)]
            engine.run_until_done()
            scores = score_options(engine, "gamma", [5, 6, 7], [[8], [9, 10]])
        rc = main([{str(out_dir)!r}, "--list-tenants"])
        print(json.dumps({{"tokens": [r.output_ids for r in reqs], "scores": scores, "rc": rc}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [len(t) for t in result["tokens"]] == [4, 4, 4] and result["rc"] == 0
    assert len(result["scores"]) == 2 and all(s < 0 for s in result["scores"])


def test_the_blocker_blocks():
    """The child's blocker really refuses torch (else the test above proves nothing)."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
