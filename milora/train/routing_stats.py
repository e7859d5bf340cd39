"""Routing statistics: per layer, how often each of the 7 experts is switched on over a set of
prompts (the paper's Figure 2), as JSON and as a PNG heat map.

frequency[l][m] = (number of prompts whose routing turns expert m on in layer l) / prompts.
With top-k routing each row of the table sums to k.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from milora.format.contract import EXPERTS
from milora.format.padding import left_pad
from milora.errors import DataError, MiloraError
from milora.train.data import Example
from milora.train.encode import pad_id_of, prompt_ids


@torch.no_grad()
def expert_frequencies(model, tokenizer, examples: list[Example], chat: bool = True, batch_size: int = 16,
                       max_length: int = 512) -> torch.Tensor:
    """[L, 7] fraction of prompts that switch each expert on, per layer."""
    if not examples:
        raise DataError("routing statistics need at least one prompt")
    model.eval()
    pad = pad_id_of(tokenizer)
    counts = torch.zeros(model.num_layers, len(EXPERTS), dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, e.prompt, chat)[-max_length:] for e in examples[i:i + batch_size]]
        ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, pad))
        routing = model.compute_routing(ids, mask)
        counts += routing.active().sum(dim=0).double()  # [L, 7]
    return (counts / len(examples)).float()


def stats_dict(freq: torch.Tensor, n_prompts: int, label: str = "") -> dict[str, Any]:
    return {"label": label, "prompts": n_prompts, "experts": list(EXPERTS),
            "frequency": [[round(v, 6) for v in row] for row in freq.tolist()]}


def write_stats(freq: torch.Tensor, n_prompts: int, out_prefix: str | Path, label: str = "") -> tuple[Path, Path]:
    """Write <prefix>.json and <prefix>.png (rows: layers, columns: experts)."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    js = out_prefix.with_suffix(".json")
    js.write_text(json.dumps(stats_dict(freq, n_prompts, label), indent=1) + "\n")
    png = out_prefix.with_suffix(".png")
    heat_map(freq, png, label)
    return js, png


def heat_map(freq: torch.Tensor, path: str | Path, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise MiloraError("the routing heat map needs matplotlib; install it with: pip install matplotlib") from None
    layers = freq.shape[0]
    fig, ax = plt.subplots(figsize=(4.2, max(2.5, 0.18 * layers + 1.2)))
    im = ax.imshow(freq.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(freq.max())))
    ax.set_xticks(range(len(EXPERTS)), [e.replace("_proj", "") for e in EXPERTS], rotation=45)
    ax.set_ylabel("layer")
    ax.set_title(title or "expert selection frequency", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
