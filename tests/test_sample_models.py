"""The committed sample models, the files README's first command reads, load and compute what
``sample_models/build.py`` builds, and that script still rebuilds them byte for byte."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO
from helpers import assert_equivalent, sha256

import morphcli
from morphcli.graph.inputs import INPUTS_META

COMMITTED = REPO / "sample_models"


@pytest.mark.parametrize("name", ["cnn.pt", "mlp.pt", "resnet.pt"])
def test_committed_sample_loads_and_matches_its_source(samples_module: ModuleType,
                                                        tmp_path: Path, name: str) -> None:
    path = COMMITTED / name
    _, shape = samples_module.SAMPLES[name]
    loaded = morphcli.load(path)
    assert [s.shape for s in loaded.meta[INPUTS_META]] == [shape]
    source = samples_module.build(name).eval()
    assert assert_equivalent(source, loaded, [(3, *shape[1:])], atol=0.0) == 0.0

    rebuilt = tmp_path / name
    morphcli.save(samples_module.build(name), rebuilt, input_shapes=[shape])
    assert sha256(rebuilt) == sha256(path), f"{name}: run python sample_models/build.py"
