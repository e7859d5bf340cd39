"""The base weights shared by the prefill and decode graphs, mapped once for both sessions.

milora-export writes both graphs against one external data file (manifest.WEIGHTS_FILE) and
records, per graph, where each external initializer lies in it (graphs.<g>.
external_initializers: name -> offset, length, dtype, shape). The file is memory-mapped
once; each distinct tensor becomes one OrtValue over the mapped bytes (on CPU an OrtValue
wraps the numpy buffer: no copy), handed to every session that uses it through
SessionOptions.add_initializer, so onnxruntime neither reads nor copies those tensors per
session. (add_external_initializers would copy them into each graph.) The OrtValues and the
map must outlive the sessions: the caller keeps the returned object.

Exports without the table (written before the file was shared) return None: each session
then loads its own data file, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milora.errors import ManifestError

GRAPHS = ("prefill", "decode")


@dataclass
class SharedInitializers:
    data: np.memmap  # the whole weights file, read-only
    values: dict[str, dict[str, Any]]  # graph -> initializer name -> OrtValue

    @property
    def distinct(self) -> int:
        return len({id(v) for table in self.values.values() for v in table.values()})


def map_shared_initializers(ort, root: Path, manifest: dict[str, Any]) -> SharedInitializers | None:
    graphs = manifest["graphs"]
    tables = {g: graphs[g].get("external_initializers") for g in GRAPHS}
    if any(t is None for t in tables.values()):
        return None
    files = {graphs[g]["data_file"] for g in GRAPHS}
    if len(files) != 1:
        raise ManifestError(f"the prefill and decode graphs list different weight files {sorted(files)}; "
                            "this milora expects one shared file: export again")
    path = Path(root) / files.pop()
    if not path.is_file():
        raise ManifestError(f"{path} is missing; the export is incomplete: export again")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    by_place: dict[tuple, Any] = {}  # one OrtValue per distinct tensor, whichever graph names it
    values: dict[str, dict[str, Any]] = {}
    for g, table in tables.items():
        values[g] = {}
        for name, t in table.items():
            offset, length, dtype, shape = t["offset"], t["length"], np.dtype(t["dtype"]), tuple(t["shape"])
            if offset < 0 or offset + length > data.size or length != dtype.itemsize * int(np.prod(shape)):
                raise ManifestError(f"{g} initializer {name} (offset {offset}, length {length}, {dtype} {list(shape)}) "
                                    f"does not fit {path.name} ({data.size} bytes); the export is corrupt: export again")
            key = (offset, length, dtype.str, shape)
            if key not in by_place:
                array = data[offset:offset + length].view(dtype).reshape(shape)
                by_place[key] = ort.OrtValue.ortvalue_from_numpy(array)
            values[g][name] = by_place[key]
    return SharedInitializers(data, values)
