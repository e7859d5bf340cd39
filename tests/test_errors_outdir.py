"""Bad-input matrix, rows on an exported directory (docs/errors.md): a truncated graph, a
pack whose sha256 differs from the manifest, and non-finite packs or adapters met by
`milora-export --check` and the runtime (Engine.add_tenant, slot loads) - refused with a typed
error naming the tenant, the tensor and the counts, while the other tenants keep working."""

from __future__ import annotations

import math
import shutil

import pytest

from errors_helpers import fails, poison_safetensors, raises, rewrite_manifest
from export_helpers import make_model_dir
from milora.errors import NonFiniteError, SlotLoadError, TenantError
from milora.export import cli as export_cli
from milora.format.config import MiloraConfig
from milora.runtime import cli as generate_cli
from runtime_helpers import add_word_tokenizer

TENANTS = {"solo": MiloraConfig(rank=2, alpha=4, top_k=2), "pal": MiloraConfig(rank=2, alpha=2, pooler="last")}
PROMPT = [5, 9, 17, 23]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model_dir, out_dir): two tenants, no validation (the rows test refusals, not numerics)."""
    from milora.export.exporter import export

    root = tmp_path_factory.mktemp("errors_out")
    model_dir = make_model_dir(root, TENANTS)
    add_word_tokenizer(model_dir)
    export(model_dir, root / "out", validate=False, progress=False)
    return model_dir, root / "out"


@pytest.fixture
def out(exported, tmp_path):
    """A private copy of the exported directory to break."""
    shutil.copytree(exported[1], tmp_path / "out")
    return tmp_path / "out"


def engine(out_dir):
    from milora.runtime import Engine

    return Engine(out_dir, max_batch=4)


def generate(eng, tenant):
    from milora.runtime import SamplingParams

    return eng.submit(tenant, prompt_ids=PROMPT, params=SamplingParams(max_new_tokens=2))


def test_truncated_onnx_in_out_dir(capsys, out):
    graph = out / "prefill.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    fails(capsys, generate_cli.main, [out, "--tenant", "solo", "--prompt", "w5"], "does not match its manifest",
          "prefill.onnx changed (sha256", "export it again")
    rewrite_manifest(out)  # the sha256 now matches: the content is still refused
    fails(capsys, export_cli.main, ["--check", out, "--no-validate"], "prefill.onnx (prefill graph) cannot be parsed "
          "as ONNX", "expected a complete ONNX model", "Fix: export again")


def test_pack_sha256_differs_from_manifest(capsys, out):
    pack = out / "adapters" / "solo.safetensors"
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF
    pack.write_bytes(bytes(data))
    fails(capsys, generate_cli.main, [out, "--tenant", "pal", "--prompt", "w5"], "does not match its manifest",
          "adapters/solo.safetensors changed (sha256", "manifest", "export it again")
    fails(capsys, export_cli.main, ["--check", out, "--no-validate"], "adapters/solo.safetensors changed")


def test_check_reports_non_finite_pack_behind_a_matching_manifest(capsys, out):
    poison_safetensors(out / "adapters" / "solo.safetensors", "router.act_den", {(0, 1): math.nan, (1, 2): math.inf})
    rewrite_manifest(out)
    fails(capsys, export_cli.main, ["--check", out, "--no-validate"], "tenant 'solo' (slot pack",
          "router.act_den: 2 of 10 values (NaN 1, +inf 1, -inf 0)", "expected finite numbers", "Fix: export again")


def test_runtime_add_tenant_refuses_non_finite_pack(exported, tmp_path):
    bad = tmp_path / "bad.safetensors"
    shutil.copy(exported[1] / "adapters" / "pal.safetensors", bad)
    poison_safetensors(bad, "lora_B.up_proj", {(0, 0, 0): -math.inf})
    eng = engine(exported[1])
    raises(NonFiniteError, lambda: eng.add_tenant("bad", bad), "tenant 'bad'", f"slot pack {bad}",
           "lora_B.up_proj: 1 of", "(NaN 0, +inf 0, -inf 1)", "Fix:")
    assert "bad" not in eng.tenants
    assert eng.generate("pal", prompt_ids=PROMPT).status == "finished"  # the others keep working


def test_runtime_add_tenant_refuses_non_finite_adapter_dir(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported[0] / "adapters" / "solo", bad)
    poison_safetensors(bad / "milora_adapter.safetensors", "layers.1.router.pooler", {(3,): math.nan})
    eng = engine(exported[1])
    raises(NonFiniteError, lambda: eng.add_tenant("bad", bad), "tenant 'bad'",
           "layers.1.router.pooler: 1 of 32 values (NaN 1, +inf 0, -inf 0)", "Fix:")
    assert "bad" not in eng.tenants
    assert eng.generate("solo", prompt_ids=PROMPT).status == "finished"


def test_runtime_slot_load_of_non_finite_pack(out):
    """A pack changed behind the manifest's back fails only its own tenant's requests."""
    poison_safetensors(out / "adapters" / "solo.safetensors", "lora_A.q_proj", {(0, 0, 0): math.nan})
    rewrite_manifest(out)
    eng = engine(out)
    bad, good = generate(eng, "solo"), generate(eng, "pal")
    eng.run_until_done()
    assert good.status == "finished" and len(good.output_ids) == 2
    assert bad.status == "failed" and isinstance(bad.error, SlotLoadError) and isinstance(bad.error, TenantError)
    for needle in ("tenant 'solo' cannot be loaded into slot", "lora_A.q_proj: 1 of", "(NaN 1, +inf 0, -inf 0)"):
        assert needle in str(bad.error)
    assert isinstance(bad.error.cause, NonFiniteError)
