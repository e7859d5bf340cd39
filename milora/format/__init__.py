"""The contract as data, free of torch and transformers (numpy, safetensors and the standard
library only): everything the exporter writes and the runtime reads is defined here once.

    contract.py   expert names and order, adapter file and tensor names, the gate floor
    config.py     MiloraConfig: every option of an adapter, validated, and its JSON form
    adapter.py    adapter format v1: expected tensors and shapes, the base check, the reader
    finite.py     the one finiteness check (NaN / inf) of adapters and slot packs
    manifest.py   OUT_DIR: file names, graph IO names and shapes, bank specs, manifest.json
    pack.py       slot packs: one tenant's slice of every bank (build, save, load, assemble)

Layers above read these modules and never restate them: milora.model (the PyTorch reference),
milora.export (writes OUT_DIR through manifest and pack), milora.runtime (reads it).
"""
