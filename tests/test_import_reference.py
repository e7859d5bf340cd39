"""Reference-code checkpoints (lora_modules.bin + lora_gatings.bin, whole pickled modules)
import safely and route and compute as the reference code prescribes.

The classes below are this test's own small implementation of the reference semantics
(docs/method.md, docs/importing.md), registered under the reference's module paths so that torch.save writes
the same global names as the reference code does. The expected logits come from running
them, hooked onto an unmodified copy of the base model, per row on the prompt tokens.
"""

from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from milora.format.contract import EXPERTS
from milora.errors import BaseMismatchError, AdapterImportError, UnsafeCheckpointError
from milora.model.importers import convert_to_milora, import_reference_checkpoint, load_reference_checkpoint
from milora.model.model import MiloraModel
from milora.model.router import RATIONAL_INIT
from milora.format.tolerances import close
from tests.import_helpers import llama, qwen2

EM_LORA, RATIONAL = "src.llama2.em_lora", "src.llama2.rational"


# ---- the reference semantics, as stand-in modules pickled under the reference's names ----

def Rational_PYTORCH_B_F(x, num, den):  # noqa: N802 (the reference's name)
    """R(x) = P(x) / (1 + |Q(x)|), by explicit powers (the importer's side uses Horner)."""
    powers = torch.stack([x ** i for i in range(6)], dim=-1)  # [..., 6]: 1, x, ..., x^5
    return (powers * num.float()).sum(-1) / (1 + (powers[..., 1:5] * den.float()).sum(-1).abs())


class Rational(nn.Module):
    def __init__(self, approx_func="gelu", perturb=0.0):
        super().__init__()
        num, den = RATIONAL_INIT[approx_func]
        g = torch.Generator().manual_seed(7)
        self.numerator = nn.Parameter((torch.tensor(num) + perturb * torch.randn(6, generator=g)).bfloat16())
        self.denominator = nn.Parameter((torch.tensor(den) + perturb * torch.randn(4, generator=g)).bfloat16())
        self.activation_function = Rational_PYTORCH_B_F

    def forward(self, x):
        return self.activation_function(x, self.numerator, self.denominator)


class LoRAModule(nn.Module):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.input_size, self.output_size, self.lora_rank, self.lora_alpha = d_in, d_out, rank, alpha
        self.dropout_prob = 0.3
        self.module_a = nn.Linear(d_in, rank, bias=False)
        self.module_b = nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.lora_alpha / self.lora_rank * self.module_b(self.module_a(x))


class LoRAGate(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.num_experts, self.k, self.noisy_gating = 7, k, True
        self.softplus, self.softmax = nn.Softplus(), nn.Softmax(1)
        self.w_gate = nn.Parameter(torch.randn(d, 7) * 4.0)
        self.w_noise = nn.Parameter(torch.randn(d, 7) * 0.1)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    def forward(self, x):  # [1, d] -> gates [1, 7], logits [1, 7]
        logits = x @ self.w_gate
        top, idx = logits.topk(self.k, dim=-1)
        return torch.softmax(torch.full_like(logits, float("-inf")).scatter(-1, idx, top), dim=-1), logits


class LastPooler(nn.Module):
    def __init__(self, n=1):
        super().__init__()
        self.num_prompt_tokens = n

    def forward(self, h):  # [T, d] -> [d]
        return h[-1]


class SelfAttnPooler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.output_dim = d
        self.attn_vector = nn.Linear(d, 1)

    def forward(self, h):  # [T, d] -> [d]
        return torch.softmax(self.attn_vector(h).squeeze(-1), dim=0) @ h


class LoRAGateWithPooling(nn.Module):
    def __init__(self, d, pooler_type, k, activation):
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "rational_gelu": lambda: Rational("gelu", 0.02),
                "rational_relu": lambda: Rational("relu", 0.02)}
        self.intermediate_act_fn = acts[activation]() if activation in acts else None
        self.pooler_type = pooler_type
        self.pooler = {"avg": lambda: nn.AdaptiveAvgPool1d(1), "attn": lambda: SelfAttnPooler(d)}.get(
            pooler_type, LastPooler)()
        with torch.no_grad():
            if pooler_type == "attn":
                self.pooler.attn_vector.weight.normal_(0, 30.0)  # sharp attention: the pooler matters
        self.lora_gate = LoRAGate(d, k)
        self.dropout = nn.Dropout(0.3)

    def forward(self, h):  # prompt tokens of one row [T, d] -> gates [1, 7], logits [1, 7]
        if self.intermediate_act_fn is not None:
            h = self.intermediate_act_fn(h)  # before pooling, as in the reference
        pooled = self.pooler(h.t()[None])[0, :, 0] if self.pooler_type == "avg" else self.pooler(h)
        return self.lora_gate(pooled[None])


REFERENCE_CLASSES = {EM_LORA: [LoRAModule, LoRAGate, LastPooler, SelfAttnPooler, LoRAGateWithPooling],
                     RATIONAL: [Rational, Rational_PYTORCH_B_F]}


@pytest.fixture(autouse=True)
def reference_package(monkeypatch):
    """Make the classes above importable as src.llama2.em_lora.* / src.llama2.rational.*,
    which is what the pickles name."""
    for name in ("src", "src.llama2", EM_LORA, RATIONAL):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for module, objs in REFERENCE_CLASSES.items():
        for obj in objs:
            monkeypatch.setattr(obj, "__module__", module)
            setattr(sys.modules[module], obj.__name__, obj)


def no_gqa(builder, **kw):
    return lambda: builder(num_key_value_heads=4, num_hidden_layers=3, **kw)


def make_reference(base, pooler="last", k=1, activation="rational_gelu", rank=4, alpha=16, seed=3):
    """(list_lora_modules, list_lora_gatings) for `base`, sized as the reference sizes them:
    q, k, v, o output the hidden size."""
    torch.manual_seed(seed)
    d, inter, layers = base.config.hidden_size, base.config.intermediate_size, base.config.num_hidden_layers
    shapes = [(d, d)] * 4 + [(d, inter)] * 2 + [(inter, d)]
    modules = nn.ModuleList(LoRAModule(i, o, rank, alpha) for _ in range(layers) for i, o in shapes)
    with torch.no_grad():
        for m in modules:
            m.module_a.weight.normal_(0, 0.3)
            m.module_b.weight.normal_(0, 0.3)  # non-zero B: the adapter changes the output
    gatings = nn.ModuleList(LoRAGateWithPooling(d, pooler, k, activation) for _ in range(layers))
    return modules.eval(), gatings.eval()


def save_reference(path, modules, gatings):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(modules, path / "lora_modules.bin")
    torch.save(gatings, path / "lora_gatings.bin")
    return path


def reference_forward(base, modules, gatings, ids, mask, fixed_gates=None):
    """The reference model's forward on an unmodified base: gates of layer l from the hidden
    states entering layer l, one prompt at a time (its masked tokens); every linear j gets
    gates[:, l, j] * lora_j(x). Returns (logits [B, T, V], gates [B, L, 7], router logits [B, L, 7]).
    With fixed_gates, no gate runs (a decode step reuses the prompt's routing)."""
    gates, router_logits, handles = {}, {}, []

    def pre_hook(l):
        def hook(module, args, kwargs):
            if fixed_gates is not None:
                gates[l] = fixed_gates[:, l]
                return
            h = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
            rows = [gatings[l](h[b][mask[b].bool()]) for b in range(h.shape[0])]
            gates[l] = torch.cat([g for g, _ in rows])  # [B, 7]
            router_logits[l] = torch.cat([z for _, z in rows])
        return hook

    def lora_hook(l, j):
        def hook(module, args, out):
            return out + gates[l][:, j, None, None] * modules[7 * l + j](args[0])
        return hook

    for l, layer in enumerate(base.model.layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(l), with_kwargs=True))
        for j, name in enumerate(EXPERTS):
            parent = layer.self_attn if j < 4 else layer.mlp
            handles.append(getattr(parent, name).register_forward_hook(lora_hook(l, j)))
    try:
        with torch.no_grad():
            logits = base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        for h in handles:
            h.remove()
    stack = lambda d: torch.stack([d[l] for l in sorted(d)], dim=1) if d else None  # noqa: E731
    return logits, stack(gates), stack(router_logits)


# Two prompts, the second left-padded: routing must see prompt tokens only.
IDS = torch.tensor([[5, 17, 33, 8, 61, 2, 44, 19], [0, 0, 0, 70, 12, 3, 88, 41]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])

# With k = 1 a renormalized gate is exactly 1.0 whatever the logits, so only the selection
# shows; k >= 2 makes the gate values (hence pooling and activation order) show in the logits.
CASES = [  # builder, pooler, k, activation
    (llama, "attn", 2, "rational_gelu"),
    (llama, "last", 1, "gelu"),
    (qwen2, "avg", 2, "rational_relu"),
    (qwen2, "attn", 1, "none"),
    (llama, "avg", 3, "relu"),
]


@pytest.mark.parametrize("builder,pooler,k,activation", CASES)
def test_reference_checkpoint_routes_and_computes_like_the_reference(builder, pooler, k, activation, tmp_path):
    build = no_gqa(builder)
    modules, gatings = make_reference(build(), pooler=pooler, k=k, activation=activation)
    src = save_reference(tmp_path / "ckpt", modules, gatings)
    expected, ref_gates, ref_logits = reference_forward(build(), modules, gatings, IDS, MASK)
    # The fixture must not sit on near-ties, or a selection could flip on rounding.
    top = ref_logits.sort(dim=-1, descending=True).values
    assert (top[..., k - 1] - top[..., k]).min() > 1e-4  # float32 differences are ~1e-6

    model = load_reference_checkpoint(build(), src).eval()
    cfg = model.config
    assert (cfg.routed, cfg.top_k, cfg.gate_mode, cfg.activation_position) == (True, k, "renormalized", "pre_pool")
    assert cfg.pooler == {"attn": "attention", "last": "last", "avg": "mean"}[pooler]
    with torch.no_grad():
        out = model(IDS, MASK)
    assert torch.equal(out.routing.active(), ref_gates != 0)  # the same experts, every row and layer
    torch.testing.assert_close(out.routing.gates, ref_gates, **close("torch", "gates"))
    torch.testing.assert_close(out.logits, expected, **close("torch", "logits"))
    # The routing is not trivial: different rows or layers pick different experts.
    assert len({tuple(r) for r in out.routing.active().reshape(-1, 7).tolist()}) > 1

    # Decode: the prompt's routing is reused and no router runs, as in the reference.
    nxt = torch.tensor([[7], [23]])
    full_ids, full_mask = torch.cat([IDS, nxt], 1), torch.cat([MASK, torch.ones(2, 1, dtype=MASK.dtype)], 1)
    with torch.no_grad():
        step = model(nxt, full_mask, routing=out.routing, past_key_values=out.past_key_values)
    ref_step, _, _ = reference_forward(build(), modules, gatings, full_ids, full_mask, fixed_gates=ref_gates)
    torch.testing.assert_close(step.logits[:, -1], ref_step[:, -1], **close("torch", "logits"))


def test_imported_tensors_map_the_reference_parameters(tmp_path):
    build = no_gqa(llama)
    modules, gatings = make_reference(build(), pooler="attn", activation="rational_relu", rank=4, alpha=16)
    config, tensors = import_reference_checkpoint(build(), save_reference(tmp_path / "c", modules, gatings))
    assert (config.rank, config.alpha, config.scale) == (4, 16.0, 4.0)  # alpha / r kept as trained
    assert config.noisy_gating and config.rational_init == "relu"
    g = gatings[1]
    assert torch.equal(tensors["layers.1.router.weight"], g.lora_gate.w_gate.detach().t())  # [7, d] = w_gate^T
    assert torch.equal(tensors["layers.1.router.noise_weight"], g.lora_gate.w_noise.detach().t())
    assert torch.equal(tensors["layers.1.router.pooler"], g.pooler.attn_vector.weight.detach()[0])
    assert torch.equal(tensors["layers.1.router.act_num"], g.intermediate_act_fn.numerator.detach().float())
    assert torch.equal(tensors["layers.2.down_proj.lora_A"], modules[2 * 7 + 6].module_a.weight.detach())


def test_top_k_argument_overrides_the_recorded_k(tmp_path):
    build = no_gqa(llama)
    src = save_reference(tmp_path / "c", *make_reference(build(), k=1))
    assert import_reference_checkpoint(build(), src).config.top_k == 1
    model = load_reference_checkpoint(build(), src, top_k=3)
    with torch.no_grad():
        gates = model(IDS, MASK).routing.gates
    assert model.config.top_k == 3 and ((gates != 0).sum(-1) == 3).all()
    with pytest.raises(AdapterImportError, match="top_k=9"):
        import_reference_checkpoint(build(), src, top_k=9)


def test_convert_writes_a_loadable_adapter(tmp_path):
    build = no_gqa(qwen2)
    modules, gatings = make_reference(build(), pooler="attn", k=2)
    src = save_reference(tmp_path / "c", modules, gatings)
    expected, _, _ = reference_forward(build(), modules, gatings, IDS, MASK)
    out = convert_to_milora(src, tmp_path / "milora", build())
    model = MiloraModel.from_pretrained(build(), out).eval()  # eval: no router noise
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, MASK).logits, expected, **close("torch", "logits"))


# ---- safety: pickles that would run code are refused and never run ----

class _Payload:
    """Unpickling this runs `call(*args)`; every payload below would create `marker`."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


def _checkpoint_with(tmp_path, payload):
    build = no_gqa(llama)
    modules, gatings = make_reference(build())
    modules[3].extra = payload  # hidden deep inside an otherwise valid checkpoint
    return save_reference(tmp_path / "evil", modules, gatings), build


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_code_running_pickles_are_refused_and_not_run(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = (_Payload(os.system, (f"touch {marker}",)) if kind == "os.system"
               else _Payload(exec, (f"open({str(marker)!r}, 'w').close()",)))
    src, build = _checkpoint_with(tmp_path, payload)
    name = "system" if kind == "os.system" else "builtins.exec"
    with pytest.raises(UnsafeCheckpointError, match=f"refers to .*{name}.*nothing was executed"):
        import_reference_checkpoint(build(), src)
    assert not marker.exists()
    # The payload is real: an unrestricted torch.load runs it.
    torch.load(src / "lora_modules.bin", weights_only=False)
    assert marker.exists()


def test_calling_an_allowlisted_class_is_refused(tmp_path):
    # A pickle may *call* a class it names (REDUCE) instead of rebuilding an instance; a
    # stand-in never lets such a call through.
    src, build = _checkpoint_with(tmp_path, _Payload(LoRAModule, (4, 4, 2, 8)))
    with pytest.raises(UnsafeCheckpointError, match=r"calls src\.llama2\.em_lora\.LoRAModule\(\.\.\.\)"):
        import_reference_checkpoint(build(), src)


def test_non_zip_pickles_are_refused_unread(tmp_path):
    build = no_gqa(llama)
    src = save_reference(tmp_path / "c", *make_reference(build()))
    marker = tmp_path / "pwned"
    (src / "lora_modules.bin").write_bytes(pickle.dumps(_Payload(os.system, (f"touch {marker}",))))
    with pytest.raises(UnsafeCheckpointError, match="not a torch.save zip checkpoint"):
        import_reference_checkpoint(build(), src)
    assert not marker.exists()


def test_unexpected_torch_classes_are_refused(tmp_path):
    build = no_gqa(llama)
    modules, gatings = make_reference(build())
    gatings[0].norm = nn.LayerNorm(4)
    src = save_reference(tmp_path / "c", modules, gatings)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.normalization.LayerNorm"):
        import_reference_checkpoint(build(), src)


# ---- refusals of checkpoints that do not fit ----

def test_gqa_base_is_refused_with_the_reason(tmp_path):
    src = save_reference(tmp_path / "c", *make_reference(no_gqa(llama)()))
    gqa = llama(num_key_value_heads=2, num_hidden_layers=3)
    with pytest.raises(BaseMismatchError, match=r"k_proj.*expected \[r, 32\] / \[16, r\].*grouped-query attention"):
        import_reference_checkpoint(gqa, src)


def test_checkpoint_of_another_depth_is_refused(tmp_path):
    src = save_reference(tmp_path / "c", *make_reference(no_gqa(llama)()))
    with pytest.raises(BaseMismatchError, match="ModuleList of 14 LoRAModule.*found ModuleList of 21"):
        import_reference_checkpoint(llama(num_key_value_heads=4), src)


def test_alpha_is_required_when_not_recorded(tmp_path):
    build = no_gqa(llama)
    modules, gatings = make_reference(build(), pooler="attn", k=2, alpha=16)
    expected, _, _ = reference_forward(build(), modules, gatings, IDS, MASK)
    for m in modules:
        del m.lora_alpha
    src = save_reference(tmp_path / "c", modules, gatings)
    with pytest.raises(AdapterImportError, match="does not record lora_alpha; pass alpha="):
        import_reference_checkpoint(build(), src)
    model = load_reference_checkpoint(build(), src, alpha=16)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, MASK).logits, expected, **close("torch", "logits"))


def test_alpha_contradicting_the_checkpoint_is_refused(tmp_path):
    build = no_gqa(llama)
    src = save_reference(tmp_path / "c", *make_reference(build(), alpha=16))
    with pytest.raises(AdapterImportError, match="records lora_alpha=16 but alpha=8"):
        import_reference_checkpoint(build(), src, alpha=8)


def Rational_PYTORCH_A_F(x, num, den):  # noqa: N802 (another Pade version of the rational package)
    return x


def test_other_rational_versions_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Rational_PYTORCH_A_F, "__module__", RATIONAL)
    monkeypatch.setattr(sys.modules[RATIONAL], "Rational_PYTORCH_A_F", Rational_PYTORCH_A_F, raising=False)
    build = no_gqa(llama)
    modules, gatings = make_reference(build(), activation="rational_gelu")
    for g in gatings:
        g.intermediate_act_fn.activation_function = Rational_PYTORCH_A_F
    src = save_reference(tmp_path / "c", modules, gatings)
    with pytest.raises(AdapterImportError, match="Rational_PYTORCH_A_F; only the 'safe' version B"):
        import_reference_checkpoint(build(), src)


def test_missing_files_are_named(tmp_path):
    build = no_gqa(llama)
    src = save_reference(tmp_path / "c", *make_reference(build()))
    (src / "lora_gatings.bin").unlink()
    with pytest.raises(AdapterImportError, match=r"\['lora_gatings.bin'\] missing"):
        import_reference_checkpoint(build(), src)


def test_bfloat16_checkpoints_import_as_float32(tmp_path):
    # The reference trains in bfloat16: every tensor in its files may be bf16.
    build = no_gqa(llama)
    modules, gatings = make_reference(build(), pooler="attn")
    modules, gatings = modules.to(torch.bfloat16), gatings.to(torch.bfloat16)
    config, tensors = import_reference_checkpoint(build(), save_reference(tmp_path / "c", modules, gatings))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["layers.0.v_proj.lora_B"], modules[2].module_b.weight.detach().float())
    assert torch.equal(tensors["layers.2.router.weight"], gatings[2].lora_gate.w_gate.detach().float().t())


def test_reference_checkpoint_exports_and_validates(tmp_path):
    """A reference-code checkpoint is a tenant of milora-export like any other: exported next
    to a MiLoRA tenant and validated (both graphs, per row) against the PyTorch reference."""
    from milora.export.exporter import export

    build = no_gqa(llama)
    model_dir = tmp_path / "model"
    build().save_pretrained(str(model_dir))
    modules, gatings = make_reference(build(), pooler="attn", k=2)
    ref_dir = save_reference(tmp_path / "ref", modules, gatings)
    manifest = export(model_dir, tmp_path / "out", adapters={"ref": str(ref_dir)}, progress=False)
    assert manifest["tenants"]["ref"]["kind"] == "reference"
    report = manifest["validation"]
    assert report["compared_selections"] > 0 and not report["skipped_rows"]
