"""MiloraModel: a Hugging Face causal LM with MiLoRA added, and its forward / generate.

Shape legend: B batch rows, T new tokens, P past tokens, L layers, E experts, V vocab.

    out = model(input_ids, attention_mask)               # prefill: routers run
    out.routing                                          # RoutingState, gates [B, L, 7]
    out = model(next_ids, mask, routing=out.routing,     # decode: no router runs
                past_key_values=out.past_key_values)
    seqs = model.generate(input_ids, attention_mask=..., max_new_tokens=...)  # HF generate
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from milora.format.adapter import check_base, check_tensors, expected_shapes, read_adapter
from milora.format.contract import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, EXPERT_INDEX, NUM_EXPERTS, lora_a_name,
                             lora_b_name, router_tensor_name)
from milora.format.outdir import atomic_write_text
from milora.errors import AdapterFormatError, RoutingError
from milora.format.config import MiloraConfig
from milora.model.inject import base_info, decoder_layers, expert_linear, set_expert_linear
from milora.model.layer import MiloraLinear
from milora.model.losses import load_balancing_loss
from milora.model.router import MiloraRouter
from milora.model.routing import (RoutingSession, RoutingState, checkpoint_contexts, current_forward, current_session,
                                  routing_session)

ROUTER_PARTS = ("weight", "pooler", "act_num", "act_den", "noise_weight")


@dataclass
class MiloraOutput:
    logits: Tensor | None  # [B, T, V]; None with forward(..., loss_only=True)
    past_key_values: Any  # the HF cache, or None without use_cache
    routing: RoutingState  # computed (prefill) or the one given (decode)
    loss: Tensor | None = None  # lm_loss + lb_coef * lb_loss (when labels are given)
    lm_loss: Tensor | None = None
    lb_loss: Tensor | None = None  # only when routers ran


class MiloraModel(nn.Module):
    """Wraps a supported HF causal LM (modified in place: its target linears become
    MiloraLinear). Base weights are frozen; adapter parameters are the trainable ones."""

    def __init__(self, base_model: nn.Module, config: MiloraConfig, dtype: torch.dtype | None = None):
        super().__init__()
        layers = decoder_layers(base_model)
        if any(isinstance(expert_linear(layers[0], m), MiloraLinear) for m in config.target_modules):
            raise RoutingError("this model already has MiLoRA added; load the base model again")
        self.base_model = base_model
        self.config = config
        self.base = base_info(base_model)
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.routers = nn.ModuleList(
            [MiloraRouter(self.base["hidden_size"], config) for _ in layers]) if config.routed else None
        self.linears = {}
        for l, layer in enumerate(layers):
            for m in config.target_modules:
                lin = MiloraLinear(expert_linear(layer, m), l, m, config.rank, config.scale, config.dropout, dtype)
                set_expert_linear(layer, m, lin)
                self.linears[(l, m)] = lin
            layer.register_forward_pre_hook(self._make_layer_hook(l), with_kwargs=True)
        if self.routers is not None:
            self.routers.to(base_model.device)
        fixed = torch.zeros(NUM_EXPERTS)
        fixed[[EXPERT_INDEX[m] for m in config.target_modules]] = 1.0
        self.register_buffer("_fixed_gates", fixed, persistent=False)  # [7], non-routed adapters
        self._expert_index = torch.tensor([EXPERT_INDEX[m] for m in config.target_modules])
        # transformers 5.x renamed the forward's past_key_values argument to `cache`.
        params = inspect.signature(base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        base_model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        base_model.register_forward_hook(self._end_forward)

    @property
    def num_layers(self) -> int:
        return self.base["num_layers"]

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    # ---- routing hooks (state lives in the call-scoped RoutingSession, never on modules) ----

    def _begin_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        current_session().begin(ref.shape[0], kwargs.get("attention_mask"), ref.shape[1], ref.device)

    def _end_forward(self, module, args, output):
        current_session().end(self.num_layers)

    def _make_layer_hook(self, l: int):
        def hook(module, args, kwargs):
            fwd = current_forward()
            if not fwd.routing:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
            b = hidden.shape[0]
            if self.routers is None:
                fwd.layer_gates[l] = self._fixed_gates.expand(b, NUM_EXPERTS)
                return None
            gates, probs, _ = self.routers[l](hidden, fwd.mask)  # [B, E] each
            full = torch.zeros(b, NUM_EXPERTS, dtype=torch.float32, device=hidden.device)
            fwd.layer_gates[l] = full.index_copy(1, self._expert_index.to(hidden.device), gates)  # [B, 7]
            fwd.layer_probs[l] = probs
            return None
        return hook

    # ---- forward / generate ----

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                routing: RoutingState | None = None, routing_mask: Tensor | None = None,
                past_key_values: Any = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, loss_only: bool = False,
                **kwargs) -> MiloraOutput:
        """One forward. Without `routing`, routers run on the tokens selected by
        `routing_mask` [B, T] (default: attention_mask, i.e. the prompt at inference;
        in training, the prompt span while attention covers prompt and response).
        With `routing` (from a prefill), no router runs.

        loss_only (with labels): the LM head runs only where a label is (the response
        tokens), not over the whole vocabulary at every prompt token; the loss is the same,
        out.logits is None. Training uses it: on SmolLM2 (vocabulary 49152) the full logits
        of a prompt-heavy batch dominate the step's memory."""
        if routing is not None and routing_mask is not None:
            raise RoutingError("give either routing (decode) or routing_mask (prefill), not both")
        if loss_only and labels is None:
            raise RoutingError("forward(loss_only=True) got labels=None; loss_only computes only the loss, so it "
                               "needs labels [B, T] (-100 where no loss): pass labels, or drop loss_only for logits")
        t = input_ids.shape[1]
        if attention_mask is None:
            past = 0 if past_key_values is None else past_key_values.get_seq_length()
            attention_mask = torch.ones(input_ids.shape[0], past + t, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # Left padding: positions count real tokens only.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]  # [B, T]
        session = RoutingSession(routing, routing_mask)
        kwargs[self._cache_arg] = past_key_values
        with routing_session(session):
            if loss_only:
                out, lm_loss, logits = self._forward_loss_only(input_ids, attention_mask, position_ids, labels,
                                                              use_cache, kwargs)
            else:
                out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      labels=labels, use_cache=use_cache, **kwargs)
                lm_loss, logits = out.loss, out.logits
        lb = None
        if routing is None and self.routers is not None:
            lb = load_balancing_loss(session.lb_probs or [], self.config.lb_loss)
        loss = lm_loss
        if loss is not None and lb is not None:
            loss = loss + self.config.lb_coef * lb
        cache = out.get("past_key_values", out.get("cache"))
        return MiloraOutput(logits, cache, session.state, loss, lm_loss, lb)

    def _forward_loss_only(self, input_ids, attention_mask, position_ids, labels, use_cache, kwargs):
        """(HF output, mean token loss, None): the base model runs with its LM head on one
        position (logits_to_keep=1), the decoder's last hidden state is taken from a hook, and
        the LM head then runs on the labelled positions only. Same maths as the HF causal-LM
        loss: position t predicts labels[t + 1], -100 ignored, mean over labelled tokens."""
        seen: list[Tensor] = []
        handle = self.base_model.get_decoder().register_forward_hook(lambda m, a, o: seen.append(o[0]))
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=use_cache, logits_to_keep=1, **kwargs)
        finally:
            handle.remove()
        target = labels[:, 1:]  # [B, T-1]
        keep = target != -100
        hidden = seen[-1][:, :-1][keep]  # [N, d]: the positions that predict a label
        logits = self.base_model.get_output_embeddings()(hidden).float()  # [N, V]
        return out, nn.functional.cross_entropy(logits, target[keep]), None

    def gradient_checkpointing_enable(self, **checkpoint_kwargs) -> None:
        """Activation checkpointing of the base model's decoder layers (use this, not the base
        model's method: its backward recomputes layers outside this model's forward, where the
        routing is only reachable through checkpoint's context_fn, which needs use_reentrant=False)."""
        kwargs = {**checkpoint_kwargs, "use_reentrant": False, "context_fn": checkpoint_contexts}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @torch.no_grad()
    def compute_routing(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RoutingState:
        """Run the prompt once (no cache) and return its routing."""
        return self.forward(input_ids, attention_mask, use_cache=False).routing

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 routing: RoutingState | None = None, return_routing: bool = False, **generate_kwargs):
        """Hugging Face generate() with MiLoRA routing: the first forward (the prompt) routes,
        unless `routing` is given; every decode step reuses that routing and runs no router.
        Beams and num_return_sequences copies of a prompt carry that prompt's routing.

        Refused: chunked prefill (prefill_chunk_size) and a past KV cache without `routing`:
        both would route on part of the prompt only, and every prompt token's KV depends on
        routing computed from the whole prompt (docs/method.md)."""
        gen_config = generate_kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        chunk = generate_kwargs.get("prefill_chunk_size", getattr(gen_config, "prefill_chunk_size", None))
        if chunk:
            raise RoutingError(
                f"prefill_chunk_size={chunk!r}: chunked prefill is not exact for MiLoRA (the router needs the "
                "whole prompt before any prompt token is computed); generate without prefill_chunk_size"
            )
        if routing is None and generate_kwargs.get("past_key_values") is not None:
            raise RoutingError(
                "generate() got past_key_values but no routing: the routers would see only the new tokens. "
                "Pass the routing of the request the cache belongs to, or prefill the whole prompt again"
            )
        session = RoutingSession(routing)
        with routing_session(session):
            out = self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return (out, session.state) if return_routing else out

    # ---- adapter tensors and files (format v1, docs/adapter-format.md) ----

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every adapter tensor under its format-v1 name."""
        out: dict[str, Tensor] = {}
        for (l, m), lin in self.linears.items():
            out[lora_a_name(l, m)] = lin.lora_A.detach()
            out[lora_b_name(l, m)] = lin.lora_B.detach()
        for l, router in enumerate(self.routers or []):
            for part in ROUTER_PARTS:
                value = getattr(router, part)
                if value is not None:
                    out[router_tensor_name(l, part)] = value.detach()
        return out

    def load_adapter_state_dict(self, tensors: dict[str, Any], where: str = "adapter") -> None:
        """Copy format-v1 tensors (torch or numpy) into this model; every tensor must be present
        with its exact shape."""
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        check_tensors(shapes, expected_shapes(self.config, self.base), where)
        with torch.no_grad():
            for name, param in self.adapter_parameters_by_name().items():
                param.copy_(torch.as_tensor(tensors[name]).to(param.dtype))

    def adapter_parameters_by_name(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for (l, m), lin in self.linears.items():
            out[lora_a_name(l, m)] = lin.lora_A
            out[lora_b_name(l, m)] = lin.lora_B
        for l, router in enumerate(self.routers or []):
            for part in ROUTER_PARTS:
                value = getattr(router, part)
                if value is not None:
                    out[router_tensor_name(l, part)] = value
        return out

    def save_adapter(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write milora_config.json + milora_adapter.safetensors (router tensors stay float32;
        `dtype` casts the LoRA matrices, e.g. torch.float16 for smaller files). bfloat16 LoRA
        matrices are stored as float32 (exactly): the format is read with numpy, which has no
        bfloat16, so a bf16 tensor in the file would make the adapter unreadable."""
        from safetensors.torch import save_file

        if dtype is not None and dtype not in (torch.float32, torch.float16):
            raise AdapterFormatError(
                f"save_adapter(dtype={dtype}) is not supported; expected torch.float32 or torch.float16 "
                "(adapter files are read with numpy, which has no bfloat16)"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in self.adapter_state_dict().items():
            t = t.to("cpu").contiguous()
            if dtype is not None and ".lora_" in name:
                t = t.to(dtype)
            elif t.dtype == torch.bfloat16:
                t = t.float()  # lossless; loading casts back to the model's dtype
            tensors[name] = t
        tmp = directory / (ADAPTER_WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "milora", "format_version": "1"})
        _sort_metadata(tmp)
        tmp.replace(directory / ADAPTER_WEIGHTS_FILE)
        atomic_write_text(directory / ADAPTER_CONFIG_FILE, json.dumps(self.config.to_json_dict(self.base), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str | Path,
                        dtype: torch.dtype | None = None) -> "MiloraModel":
        """Add the adapter at `adapter_dir` to `base_model` (refused if the base's dims differ)."""
        config, adapter_base, tensors = read_adapter(adapter_dir)
        check_base(adapter_base, base_info(base_model), f"adapter {adapter_dir}")
        model = cls(base_model, config, dtype=dtype)
        model.load_adapter_state_dict(tensors, where=str(adapter_dir))
        # Inference mode, as Hugging Face's from_pretrained: noisy gating and dropout act only
        # after an explicit .train().
        return model.eval()


def _sort_metadata(path: Path) -> None:
    """safetensors writes its metadata map in a random order (a Rust HashMap), so equal
    adapters made equal files only by chance: rewrite the header with the metadata sorted, in
    place (same characters, same length). Reproducible training then means identical bytes,
    and an export fingerprinted by sha256 is not redone for nothing."""
    import struct

    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > size:  # another serialiser's spacing: leave the file as written
            return
        f.seek(8)
        f.write(raw + b" " * (size - len(raw)))


def add_milora(base_model: nn.Module, config: MiloraConfig | None = None, **options) -> MiloraModel:
    """Add a fresh MiLoRA adapter (config, or MiloraConfig(**options)) to a HF causal LM."""
    return MiloraModel(base_model, config or MiloraConfig(**options))


def load_milora(base_model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> MiloraModel:
    return MiloraModel.from_pretrained(base_model, adapter_dir, dtype=dtype)
