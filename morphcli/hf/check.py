"""The check: run the original and the grown model with transformers on the same random token
ids in float32 (logits, relative tolerance as morph's check), and greedy ``generate()`` with the
KV cache for decoders (a plain forward misses per-layer index bugs that only the cache shows)."""

from __future__ import annotations

import contextlib
import gc
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from morphcli.errors import InputError
from morphcli.hf.directory import HFDir

SEQ_LEN = 16
GREEDY_PROMPT = 8
GREEDY_NEW = 12


@dataclass
class HFCheck:
    """The verdict of one comparison (logits report, and greedy tokens for decoders)."""

    report: Any                        # morphcli.equivalence.report.CheckReport
    greedy_equal: bool | None          # None: not a decoder
    greedy_tokens: int = 0

    @property
    def equivalent(self) -> bool:
        return bool(self.report.equivalent) and self.greedy_equal is not False

    def summary(self) -> str:
        text = self.report.summary()
        if self.greedy_equal is not None:
            same = "identical" if self.greedy_equal else "DIFFERENT"
            text += f"; greedy generate() with KV cache over {self.greedy_tokens} tokens: {same}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), "greedy_equal": self.greedy_equal,
                "greedy_tokens": self.greedy_tokens, "equivalent": self.equivalent}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs and draws progress bars; the core never prints."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def model_class(d: HFDir) -> Any:
    import transformers

    return getattr(transformers, d.cls_name)  # an allowlisted built-in class, never auto_map


def to_config(d: HFDir, config: dict[str, Any]) -> Any:
    """transformers' config object; one it refuses (its own validation) is refused here."""
    from transformers import CONFIG_MAPPING

    from morphcli.errors import UnsupportedMorphError

    try:
        with quiet_transformers():
            cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    except Exception as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        raise UnsupportedMorphError(f"{d.path}: transformers refuses the config: {first}") from e
    cfg.dtype = torch.float32
    return cfg


def build(d: HFDir, config: dict[str, Any], state: dict[str, torch.Tensor],
          shared: dict[int, torch.Tensor] | None = None) -> torch.nn.Module:
    """``type(model)(config)`` holding ``state`` upcast to float32, without a random init and
    without copies: built with its parameters on the meta device (no memory, no init), then
    the float32 tensors themselves become the parameters (``assign``). ``shared`` (id of a
    stored tensor -> its float32 form) lets two models share every unchanged tensor: the
    grown model's float32 state is built from the original's float32 tensors. Every
    parameter must come from ``state`` or be tied to one that does."""
    from transformers.initialization import no_init_weights

    shared = {} if shared is None else shared
    f32 = {}
    for k, v in state.items():
        if id(v) not in shared:
            shared[id(v)] = v.float() if v.is_floating_point() else v
        f32[k] = shared[id(v)]
    with quiet_transformers(), no_init_weights(), _parameters_on_meta():
        model = model_class(d)(to_config(d, config))
    result = model.load_state_dict(f32, strict=False, assign=True)
    model.tie_weights()  # assign replaced the tied parameter: tie the head to it again
    model = model.float().eval()
    missing = [k for k, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [k for k in result.unexpected_keys  # GPT-2's stored causal masks: unused
                  if not any(re.search(pattern, k) for pattern in ignored)]
    if missing or unexpected:
        raise InputError(f"{d.path}: the weights do not match {d.cls_name}: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model


def upcast_consuming(*states: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The float32 form of each state (non-float tensors as they are), one upcast per stored
    tensor however many states hold it, so the models built from them share every unchanged
    tensor. The states are emptied as it goes: a stored tensor leaves every state at once
    when upcast, so it dies (its file mapping unmapped) and the next is not read before its
    turn; memory holds the float32 copies plus one stored tensor, not the input besides."""
    orders = [list(state) for state in states]  # the key order decides the output shards
    holders: dict[int, list[tuple[int, str]]] = {}  # id of a stored tensor -> its entries
    for i, state in enumerate(states):
        for k, v in state.items():
            holders.setdefault(id(v), []).append((i, k))
    out: list[dict[str, torch.Tensor]] = [{} for _ in states]
    for entries in holders.values():
        i, k = entries[0]
        v = states[i][k]
        f32 = v.float() if v.is_floating_point() else v
        for j, key in entries:
            del states[j][key]
            out[j][key] = f32
        del v
    return [{k: f32[k] for k in order} for f32, order in zip(out, orders, strict=True)]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile moves to the meta device (its empty CPU tensor,
    never written, is freed at once); buffers (rotary frequencies, position ids, causal
    masks) are computed on the CPU as usual, since no state_dict holds them."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"),
                                                   requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


class Reference:
    """The original model, with its outputs remembered (keyed by the inputs' bytes): the
    second check, of the reloaded output, compares against them, so the original can be
    freed before the reload and at most one float32 model of each kind is alive."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model: torch.nn.Module | None = model
        self.config = model.config
        self._outputs: dict[bytes, list[torch.Tensor]] = {}
        self._greedy: dict[tuple[int, int], torch.Tensor] = {}

    def run(self, inputs: Any) -> list[torch.Tensor]:
        key = b"".join(t.numpy().tobytes() for t in inputs)
        if key not in self._outputs:
            self._outputs[key] = _runner(self._live())(inputs)
        return self._outputs[key]

    def greedy(self, vocab: int, seed: int) -> torch.Tensor:
        if (vocab, seed) not in self._greedy:
            self._greedy[vocab, seed] = _greedy(self._live(), vocab, seed)
        return self._greedy[vocab, seed]

    def release(self) -> None:
        """Drop the model (its float32 tensors); the remembered outputs stay."""
        self.model = None
        gc.collect()  # a transformers model holds reference cycles: free it now
        release_free_memory()

    def _live(self) -> torch.nn.Module:
        if self.model is None:  # a caller bug, never a user's: say which
            raise RuntimeError("the original model was released before its outputs were "
                               "remembered for these inputs")
        return self.model


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps tensors under its mmap threshold
    in the heap, where the reload's float32 model would come on top of them)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def compare_models(a: Reference, b: torch.nn.Module, vocab: int, *, decoder: bool,
                   samples: int, batch_size: int, seed: int, atol: float,
                   rtol: float) -> HFCheck:
    """Logits (every output) on seeded random ids in [0, vocab), then greedy tokens."""
    from morphcli.equivalence.compare import compare
    from morphcli.graph.inputs import InputSpec

    seq = min(SEQ_LEN, _max_positions(a.config))
    specs = [InputSpec((batch_size, seq), "int64", vocab)]
    with torch.no_grad(), quiet_transformers():
        report = compare(a.run, _runner(b), specs, samples=samples, batch_size=batch_size,
                         seed=seed, atol=atol, rtol=rtol)
        if not decoder:
            return HFCheck(report, None)
        same = a.greedy(vocab, seed).equal(_greedy(b, vocab, seed))
    return HFCheck(report, bool(same), GREEDY_NEW)


def _max_positions(cfg: Any) -> int:
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0)
               or SEQ_LEN)


def _runner(model: torch.nn.Module) -> Any:
    def run(inputs: Any) -> list[torch.Tensor]:
        (ids,) = inputs
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return [t for t in out.values() if isinstance(t, torch.Tensor)]

    return run


def _greedy(model: Any, vocab: int, seed: int) -> torch.Tensor:
    from transformers import GenerationConfig

    gen = torch.Generator().manual_seed(seed + 7919)
    ids = torch.randint(0, vocab, (2, GREEDY_PROMPT), generator=gen)
    config = GenerationConfig(max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW,
                              do_sample=False, use_cache=True, pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          generation_config=config)


def reload(d: HFDir, folder: Path) -> torch.nn.Module:
    """``from_pretrained`` the written folder in float32, requiring no missing, unexpected or
    mismatched keys: the proof that transformers loads what was written."""
    cls = model_class(d)
    with quiet_transformers():
        model, info = cls.from_pretrained(str(folder), dtype=torch.float32,
                                          output_loading_info=True)
    bad = {k: v for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise InputError(f"transformers reloads the written model with problems: {bad}")
    return model.eval()


@dataclass
class ReloadCheck:
    """The verdict on the written directory: transformers reloads it with no missing,
    unexpected or mismatched keys (its loading info), to the config that was checked, and
    every reloaded tensor equals, bit for bit and in its stored dtype, the tensor that was
    checked. The checked model ran in float32 on upcasts of exactly these values, so the
    reloaded model computes what was checked without running a third model."""

    mismatched: list[str]
    tensors: int

    @property
    def equivalent(self) -> bool:
        return not self.mismatched

    def summary(self) -> str:
        if self.mismatched:
            return (f"reloaded tensors differ from the checked ones: "
                    f"{', '.join(self.mismatched[:5])}")
        return f"reloaded by from_pretrained: {self.tensors} tensors bitwise equal to the checked"


_CONFIG_NOISE = ("dtype", "torch_dtype", "transformers_version", "_name_or_path",
                 "architectures")


def verify_reload(d: HFDir, folder: Path, config: dict[str, Any],
                  expected: dict[str, torch.Tensor]) -> ReloadCheck:
    """``from_pretrained`` the written folder in its stored dtypes (no float32 copy), require
    a clean loading info and the checked config, then compare every reloaded tensor's bytes
    with ``expected`` (the morph's output, read lazily again from the input: one tensor in
    memory at a time). ``expected`` is emptied as it goes."""
    cls = model_class(d)
    with quiet_transformers():
        model, info = cls.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
    bad = {k: v for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise InputError(f"transformers reloads the written model with problems: {bad}")
    want = {k: v for k, v in to_config(d, config).to_dict().items() if k not in _CONFIG_NOISE}
    got = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_NOISE}
    mismatched = [f"config.{k}" for k in sorted(set(want) | set(got))
                  if want.get(k) != got.get(k)]
    reloaded = model.state_dict(keep_vars=False)
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    compared = 0
    for key in list(expected):
        tensor = expected.pop(key)
        if any(re.search(pattern, key) for pattern in ignored):
            continue  # GPT-2's stored causal masks: written verbatim, unused, as in build()
        if key not in reloaded:
            mismatched.append(f"{key} (not in the reloaded model)")
            continue
        mine = reloaded[key]
        if mine.dtype != tensor.dtype or mine.shape != tensor.shape or not torch.equal(
                mine, tensor):
            mismatched.append(key)
        compared += 1
        del tensor
    return ReloadCheck(mismatched, compared)
