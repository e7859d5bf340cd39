"""OrtBackend(share_weights=True) maps the export's one weights file once and hands the same
buffers to the prefill and decode sessions (milora.runtime.weights)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from milora.errors import ManifestError
from milora.format import manifest as mf
from milora.runtime.ort_backend import OrtBackend
from milora.format.tolerances import close
from runtime_helpers import random_prompts


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def test_sessions_share_mapped_weights(exported):
    _, out = exported
    manifest = mf.read_manifest(out)
    backend = OrtBackend(out, manifest, share_weights=True)
    shared = backend.shared_weights
    tables = {g: manifest["graphs"][g]["external_initializers"] for g in ("prefill", "decode")}
    assert shared is not None and {g: set(v) for g, v in shared.values.items()} == {g: set(t) for g, t in tables.items()}
    # One OrtValue per distinct byte range, the same object in both sessions' options ...
    places = {(t["offset"], t["length"]) for table in tables.values() for t in table.values()}
    assert shared.distinct == len(places)
    for name, t in tables["decode"].items():
        twin = [n for n, u in tables["prefill"].items() if (u["offset"], u["length"]) == (t["offset"], t["length"])]
        assert any(shared.values["prefill"][n] is shared.values["decode"][name] for n in twin)
    # ... wrapping the mapped file itself, not a copy.
    start = shared.data.ctypes.data
    for g, table in shared.values.items():
        for name, value in table.items():
            assert value.data_ptr() - start == tables[g][name]["offset"]


def test_shared_weights_give_the_plain_sessions_outputs(exported):
    """The graphs run with the mapped initializers (and no prepacking) compute what they
    compute when onnxruntime loads the external data itself (the default)."""
    _, out = exported
    manifest = mf.read_manifest(out)
    shared_backend, plain_backend = OrtBackend(out, manifest, share_weights=True), OrtBackend(out, manifest)
    assert plain_backend.shared_weights is None
    prompts = random_prompts(5, (4, 7))
    got = [b.prefill(prompts, [0, 0]) for b in (shared_backend, plain_backend)]
    np.testing.assert_allclose(got[0][0], got[1][0], **close("runtime", "logits"))  # packed and unpacked GEMMs round differently
    ids = got[0][0].argmax(-1)
    steps = [b.decode(ids, kv, b.bind_rows(np.zeros(2, np.int64), gates)) for b, (_, gates, kv) in
             zip((shared_backend, plain_backend), got)]
    np.testing.assert_allclose(steps[0], steps[1], **close("runtime", "logits"))


def test_table_outside_the_file_is_refused(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    manifest = mf.read_manifest(copy)
    name = next(iter(manifest["graphs"]["decode"]["external_initializers"]))
    manifest["graphs"]["decode"]["external_initializers"][name]["offset"] = (copy / mf.WEIGHTS_FILE).stat().st_size
    with pytest.raises(ManifestError, match="does not fit .*export again"):
        OrtBackend(copy, manifest, share_weights=True)


def test_export_without_the_table_is_refused_for_sharing(exported):
    """An export from before the shared file opens as before, but not with share_weights."""
    _, out = exported
    old = json.loads(json.dumps(mf.read_manifest(out)))
    for g in ("prefill", "decode"):
        del old["graphs"][g]["external_initializers"]
    assert OrtBackend(out, old).shared_weights is None
    with pytest.raises(ManifestError, match="export it again"):
        OrtBackend(out, old, share_weights=True)
