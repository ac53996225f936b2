"""Fixtures: the sample models rebuilt from code, and torchvision models (never downloaded)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

# One thread per process: the suite runs in parallel (pytest -n), and torch's and onnxruntime's
# default thread pools fight over the few cores, making each call several times slower. The
# variables reach the `morph` subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import FIGURES  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)
# torch's structured trace log is meant never to propagate; under pytest's log capture it
# does, and each failure report would list thousands of empty DEBUG records.
logging.getLogger("torch.__trace").propagate = False

REPO = Path(__file__).resolve().parents[1]

# Small torchvision inputs keep tracing, exporting and checking fast.
TV_SHAPE = (1, 3, 64, 64)


@functools.cache
def _sample_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sample_models_build",
                                                  REPO / "sample_models" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def samples_module() -> ModuleType:
    """``sample_models/build.py``: ``SAMPLES`` (name -> (class, input shape)) and ``build()``."""
    return _sample_build()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory, samples_module: ModuleType) -> Path:
    """The sample checkpoints, rebuilt from code once per session (not the committed files)."""
    import morphcli

    folder = tmp_path_factory.mktemp("samples")
    for name, (_, shape) in samples_module.SAMPLES.items():
        morphcli.save(samples_module.build(name), folder / name, input_shapes=[shape])
    return folder


@pytest.fixture
def samples(sample_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the sample checkpoints in this test's tmp_path (safe to write beside)."""
    for f in sample_dir.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    return tmp_path


def sample_shape(name: str) -> tuple[int, ...]:
    """The input shape a sample model is built for, e.g. ``(1, 3, 32, 32)`` for cnn.pt."""
    return _sample_build().SAMPLES[name][1]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics, so a conversion that drops them is caught."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def torchvision_model(name: str, **kwargs: object) -> nn.Module:
    """``torchvision.models.<name>(weights=None)``, seeded, with non-trivial BatchNorm stats."""
    import torchvision

    torch.manual_seed(0)
    return randomize_batchnorm(getattr(torchvision.models, name)(weights=None, **kwargs))


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    return torchvision_model("resnet18")


@pytest.fixture(scope="session")
def mobilenet_v2() -> nn.Module:
    return torchvision_model("mobilenet_v2")



# ---------------------------------------------------------------- figures in the run summary
# Tests record figures (fuzz inputs, property-test morphs) with helpers.add_figures. Under
# xdist each worker sends its own to the controller, which adds them up and prints them.


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["morph_figures"] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    data = getattr(node, "workeroutput", {}).get("morph_figures")
    for group, (template, counts) in json.loads(data or "{}").items():
        _, totals = FIGURES.setdefault(group, (template, {}))
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for group in sorted(FIGURES):
        template, counts = FIGURES[group]
        shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in counts.items()}
        terminalreporter.write_line(template.format_map(_Missing(shown)))


class _Missing(dict):
    """format_map that shows a missing count as 0 (e.g. no refusals in a run)."""

    def __missing__(self, key: str) -> int:
        return 0
