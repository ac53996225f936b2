"""A fast slice of the timm zoo (``scripts/coverage.py --zoo timm`` runs the whole of it).

Models of four families are loaded as users have them (a state_dict with ``--arch
timm:create_model``, randomised as if trained so that no branch hides behind a 1e-6 layer scale
or a zero head); a seeded sample of the layers ``inspect`` lists is widened and deepened, and
each result is compared here with the timm model itself. Two models' widen counts are pinned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_function
from torch import nn

import morphcli

pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import zoo  # noqa: E402

# CNN with depthwise convs and squeeze-excite; ConvNeXt (layer scales, LayerNorm2d); a
# pooling-based ViT built for 64x64 images; StarNet (the product of two branches).
SLICE = ["tinynet_e", "convnext_atto", "pit_ti_224", "starnet_s050"]


def _batch_of_two(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (2, *shape[1:])


@pytest.mark.parametrize("name", SLICE)
def test_timm_widen_and_deepen_are_exact(name: str) -> None:
    gm = zoo.build(name, zoo="timm")
    model, _, _, shape = zoo.source(name, "timm")
    base = assert_same_function(model, gm, [_batch_of_two(shape)], rtol=1e-6)
    assert base.max_rel < 1e-6  # the loaded model is timm's, before any morph

    widen_at = zoo.candidates(gm, "widen", 2, seed=1)
    assert len(widen_at) == 2
    for i, layer in enumerate(widen_at):
        width = layer.module.weight.shape[0]
        wide, result = morphcli.widen(gm, layer.name, factor=2, init=("copy", "zero")[i],
                                      check=zoo.CHECK)
        assert result.exact and result.check.equivalent and result.check.max_rel < 1e-5
        assert wide.get_submodule(layer.name).weight.shape[0] == 2 * width
        same = assert_same_function(model, wide, [_batch_of_two(shape)], rtol=1e-5, seeds=(3,))
        assert same.max_rel < 1e-5, (layer.name, same)

    params = sum(p.numel() for p in gm.parameters())
    deepen_at = zoo.candidates(gm, "deepen", 2, seed=1)
    assert len(deepen_at) == 2
    for i, layer in enumerate(deepen_at):
        weighted = isinstance(layer.module, (nn.Linear, nn.Conv2d))
        kwargs = ({"init": "decompose", "norm": True, "activation": "gelu"} if weighted and i
                  else {"init": "identity", "residual": True})
        deep, result = morphcli.deepen(gm, after=layer.name, check=zoo.CHECK, **kwargs)
        assert result.exact and result.check.equivalent and result.check.max_rel < 1e-5
        assert sum(p.numel() for p in deep.parameters()) > params
        same = assert_same_function(model, deep, [_batch_of_two(shape)], rtol=1e-5, seeds=(3,))
        assert same.max_rel < 1e-5, (layer.name, kwargs, same)


def test_round_off_a_model_amplifies_is_not_failed() -> None:
    """MixNet-S at input scale 1e3 feeds its squeeze-excite sigmoids thousands: float32
    round-off of the copied units' sums (1e-7 relative) grows to 8e-4 of the output. The same
    widen computed in float64 agrees with the float64 original to 1e-15, and at unit scale
    the float32 models agree to 1e-6: the check passes, saying why."""
    gm = zoo.build("mixnet_s", zoo="timm")
    model, _, _, shape = zoo.source("mixnet_s", "timm")
    wide, result = morphcli.widen(gm, "blocks.1.0.conv_pwl.1", factor=2, init="copy",
                                  check=zoo.CHECK)
    assert result.check.equivalent and result.check.max_rel > 1e-5
    assert "amplifies round-off" in result.check.notes[-1]
    assert result.float64_check is not None and result.float64_check.max_rel < 1e-12
    same = assert_same_function(model, wide, [_batch_of_two(shape)], rtol=1e-6)
    assert same.max_rel < 1e-6


def test_onnx_of_a_model_that_amplifies_round_off_is_written(tmp_path: Path) -> None:
    """The same MixNet-S in onnxruntime differs from torch by 1.6e-4 of the output at input
    scale 1e3, beyond the export tolerance (1e-4), yet no more than torch's own float32 run
    differs from its float64 run there: the file is written, saying so, and at unit scale
    onnxruntime and torch agree to float32 round-off."""
    import numpy as np
    import onnxruntime as ort

    gm = zoo.build("mixnet_s", zoo="timm")
    model, _, _, shape = zoo.source("mixnet_s", "timm")
    result = morphcli.save(gm, tmp_path / "mixnet.onnx")
    check = result["check"]
    assert check["equivalent"] and check["max_rel"] > 1e-4
    assert "amplifies round-off" in check["summary"]
    session = ort.InferenceSession(str(tmp_path / "mixnet.onnx"))
    x = torch.randn(_batch_of_two(shape), generator=torch.Generator().manual_seed(5))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model.double()(x.double()).numpy()
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_layer_scales_and_norms_are_randomised() -> None:
    """timm starts ConvNeXt's layer scales at 1e-6: left so, every block's branch would move
    the output by a millionth and a wrong widen inside it would pass any check."""
    model, *_ = zoo.source("convnext_atto", "timm")
    block = model.stages[0].blocks[0]
    with torch.no_grad():
        assert float(block.gamma.abs().mean()) > 0.05
        assert float(block.norm.weight.std()) > 0.05


# (model, listed, total, depthwise, classifiers, refusals by reason fragment): EfficientNet-like
# layers are all widenable; ECA's Conv1d runs along the channels (a true limit: no unit map can
# follow a convolution across units), so each ECA block's producer is refused.
COUNTS = [("tinynet_e", 41, 41, 10, 1, {}),
          ("ecaresnet26t", 19, 31, 0, 1, {"a convolution slides along the widened axis": 12})]


@pytest.mark.parametrize(("name", "listed", "total", "depthwise", "heads", "refusals"), COUNTS)
def test_timm_widenable_count(name: str, listed: int, total: int, depthwise: int, heads: int,
                              refusals: dict[str, int]) -> None:
    from morphcli.graph.layers import layers
    from morphcli.morphs.applicable import applicable_morphs

    gm = zoo.build(name, zoo="timm")
    count = zoo.widenable(gm)
    inspected = [la for la in layers(gm) if isinstance(la.module, (nn.Conv2d, nn.Linear))
                 and "widen" in applicable_morphs(gm, la)]
    assert len(inspected) == count.listed  # what inspect lists, counted the same
    assert (count.listed, count.total, count.depthwise, count.classifiers) == (
        listed, total, depthwise, heads)
    assert sum(count.refused.values()) == total - listed
    for fragment, n in refusals.items():
        assert sum(k for why, k in count.refused.items() if fragment in why) == n
    assert all("'…'" in why or "node" not in why for why in count.refused)  # names stripped


def test_coverage_rewrites_only_its_own_section(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    # Loaded by path: "coverage" is also the name of coverage.py the package.
    spec = importlib.util.spec_from_file_location("zoo_coverage", zoo.__file__.replace(
        "zoo.py", "coverage.py"))
    assert spec is not None and spec.loader is not None
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)
    monkeypatch.setattr(coverage, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    coverage.update_docs("torchvision", "tv table 1")
    coverage.update_docs("timm", "timm table 1")
    coverage.update_docs("torchvision", "tv table 2")
    text = (tmp_path / "docs" / "coverage.md").read_text()
    assert text.count("tv table") == 1 and "tv table 2" in text and "timm table 1" in text
    assert text.index("## torchvision") < text.index("## timm")
