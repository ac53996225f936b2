"""Training checkpoints: a dict holding a model state beside other entries (optimizer,
scheduler, scaler, epoch, step, user data), PyTorch Lightning's ``.ckpt`` included.

Such a file is read as its model state (``--key`` names the entry when several hold one;
Lightning's ``state_dict`` with its ``model.`` prefix is found too) and written back as the same
kind of dict: the model state morphed, every other entry kept, and an entry
``morphcli_architecture`` (plain JSON) so that morph can read the result without ``--arch``.

Optimizer state follows the morph's resize plan (``morphs.plan``): per-parameter tensors shaped
like a resized parameter (Adam's moments, SGD's momentum buffer) are resized with the same
channel maps (new units zero state, copies copied, divided units divided like the weights);
scalars (``step``) are kept. State the plan cannot map (a parameter replaced by new values, a
layer resized by a rule registered from outside, state of another shape) is refused naming it,
or dropped with ``--drop-optimizer-state`` (``param_groups`` kept). Parameter ids are renumbered
to the morphed model's parameter order (``morphcli.load(OUTPUT).parameters()``), new parameters
(which get no state, as PyTorch's optimizers start them) joining the group of the parameter
before them: the layer they were inserted after.
"""

from __future__ import annotations

import collections
import copy
import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from morphcli.errors import InputError
from morphcli.morphs.plan import ResizePlan, differs, replay
from morphcli.rules.channel_map import follow

TRAINING_META = "morphcli.training"
ARCH_ENTRY = "morphcli_architecture"


@dataclass
class TrainingCheckpoint:
    """What of a training checkpoint is not the model: the whole dict as read, which entry
    holds the model state and under which key prefix, and the parameter order that the
    optimizer's ids count in."""

    entries: dict[str, Any]
    key: str = ""
    prefix: str = ""  # "model." for Lightning: the state keys are prefix + parameter name
    others: dict[str, torch.Tensor] = field(default_factory=dict)  # state keys outside prefix
    param_order: list[str] = field(default_factory=list)
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # model state, unprefixed
    notes: list[str] = field(default_factory=list)
    metadata: Any = None  # the model state's _metadata (module versions), written back

    def entry_names(self) -> list[str]:
        return [k for k in self.entries if k not in (self.key, ARCH_ENTRY)]


def _is_state(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def candidates(obj: dict) -> list[str]:
    """The entries of ``obj`` that hold a model state (a dict of named tensors)."""
    return [k for k, v in obj.items() if isinstance(k, str) and _is_state(v)]


def recognise(obj: Any) -> TrainingCheckpoint | None:
    """A TrainingCheckpoint when ``obj`` is a dict with a model state and other entries."""
    if not isinstance(obj, dict) or _is_state(obj) or not candidates(obj):
        return None
    if len(obj) == 1:  # {"state_dict": sd} alone: a plain state_dict, as before
        return None
    return TrainingCheckpoint(entries=obj)


def select(training: TrainingCheckpoint, key: str | None, source: str) -> dict[str, Any]:
    """The model state of the checkpoint (``key`` names its entry); sets ``training.key``."""
    found = candidates(training.entries)
    if key is not None:
        if key not in training.entries:
            raise InputError(f"{source}: --key {key!r}: no such entry; the entries are "
                             f"{_names(training.entries)}")
        if key not in found:
            raise InputError(f"{source}: --key {key!r} is a {type(training.entries[key]).__name__},"
                             f" not a model state (a dict of tensors); entries that are: "
                             f"{', '.join(found) or 'none'}")
    elif len(found) == 1:
        key = found[0]
    else:
        raise InputError(f"{source}: several entries hold a model state ({', '.join(found)}); "
                         f"pass --key NAME to say which to morph, e.g. --key {found[0]}")
    training.key = key
    state = training.entries[key]
    metadata = getattr(state, "_metadata", None)
    out = type(state)(state) if isinstance(state, dict) else dict(state)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
        training.metadata = metadata
    return out


def split_prefix(training: TrainingCheckpoint, state: dict[str, torch.Tensor],
                 expected: set[str]) -> dict[str, torch.Tensor]:
    """The state under the architecture's own names: Lightning stores ``model.conv1.weight``
    for a LightningModule whose ``model`` attribute is the network; keys outside the prefix
    (a loss's buffers, metrics) are kept aside and written back as they were."""
    if set(state) == expected:
        return state
    for prefix in sorted({k.split(".")[0] + "." for k in state if "." in k}):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(inner) == expected:
            training.prefix = prefix
            training.others = {k: v for k, v in state.items() if not k.startswith(prefix)}
            return inner
    return state


def attach(gm: fx.GraphModule, training: TrainingCheckpoint, param_order: list[str]) -> None:
    training.param_order = param_order
    training.original = dict(gm.state_dict())
    gm.meta[TRAINING_META] = training


def of(gm: fx.GraphModule) -> TrainingCheckpoint | None:
    value = getattr(gm, "meta", {}).get(TRAINING_META)
    return value if isinstance(value, TrainingCheckpoint) else None


# ---------------------------------------------------------------- after the morph


def follow_morph(new: fx.GraphModule, plan: ResizePlan | None = None, *,
                 drop_optimizer_state: bool = False,
                 source: str = "the checkpoint") -> list[str]:
    """Carry the other entries of ``new``'s training checkpoint over the morph, optimizer
    state through ``plan``: raises InputError when optimizer state would be lost (unless
    ``drop_optimizer_state``); returns notes saying what was kept, mapped and dropped."""
    training = of(new)
    if training is None:
        return []
    new_order = _param_names(new)
    entries = dict(training.entries)
    notes: list[str] = []
    for where, opt, put in _optimizers(entries):
        mapped, note = follow_optimizer(opt, training.original, new, training.param_order,
                                        new_order, plan, where=where, source=source,
                                        drop=drop_optimizer_state)
        put(mapped)
        notes += note
    kept = [k for k in entries if k not in (training.key, ARCH_ENTRY)]
    if kept:
        notes.append(f"training checkpoint: entry {training.key!r} morphed; kept "
                     f"{', '.join(map(str, kept[:8]))}{' ...' if len(kept) > 8 else ''}")
    new.meta[TRAINING_META] = replace(training, entries=entries, notes=notes)
    return notes


def follow_optimizer(opt: dict, original: Mapping[str, torch.Tensor], new: torch.nn.Module,
                     old_order: list[str], new_order: list[str], plan: ResizePlan | None, *,
                     where: str = "the optimizer", source: str = "the model",
                     drop: bool = False) -> tuple[dict, list[str]]:
    """An optimizer ``state_dict`` whose ids count ``old_order`` (the parameters before the
    morph, ``original`` their values), carried to the morphed ``new`` whose parameters are
    ``new_order``: state resized through ``plan``; raises InputError for state the plan cannot
    map unless ``drop``. Returns it with notes."""
    changed = _changed(original, new, old_order)
    state_by_name, unmapped = _through_plan(opt, old_order, changed, plan, new)
    notes: list[str] = []
    lost = _lost(opt, old_order, unmapped)
    if lost and not drop:
        names = sorted({n for n, _ in lost})
        kinds = sorted({k for _, ks in lost for k in ks})
        raise InputError(
            f"{source}: the optimizer state in {where} holds per-parameter state "
            f"({', '.join(kinds)}) of {len(names)} parameters that the morph gives new "
            f"values no channel map expresses ({', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''}), so it cannot follow and would be "
            "lost. Pass --drop-optimizer-state to drop the state of just those parameters "
            "(param_groups and every other entry are kept), or write a model file "
            "without the checkpoint (.safetensors)")
    out = _renumbered(opt, old_order, new_order, {n for n, _ in lost}, state_by_name,
                      original)
    if lost:
        notes.append(f"{where}: dropped the optimizer state of {len(lost)} changed "
                     f"parameters ({', '.join(sorted(n for n, _ in lost)[:4])}"
                     f"{' ...' if len(lost) > 4 else ''}); param_groups kept")
    resized = sorted(changed - unmapped)
    if resized and any(n in state_by_name for n in resized):
        notes.append(f"{where}: the optimizer state of {len(resized)} resized parameters "
                     "follows the resize plan (new units start at zero state)")
    return out, notes


def _through_plan(opt: dict, order: list[str], changed: set[str], plan: ResizePlan | None,
                  new: torch.nn.Module) -> tuple[dict[str, Any], set[str]]:
    """(parameter name -> its state, resized through ``plan``; the changed parameters whose
    state the plan cannot map)."""
    names = _id_names(opt, order)
    by_name: dict[str, Any] = {}
    for pid, s in opt["state"].items():
        name = names.get(pid)
        if name is not None:
            by_name[name] = s
    if plan is None or not changed:
        return by_name, set(changed)
    out = {n: dict(s) if isinstance(s, dict) else s for n, s in by_name.items()}
    shapes = {n: tuple(t.shape) for n, t in new.state_dict().items()}
    for layer in plan.layers:
        if not layer.replayable:
            continue
        # Per state kind (exp_avg, ...), the layer's tensors shaped like their parameters;
        # others stay as they are and are caught as unmapped below.
        by_kind: dict[str, dict[str, torch.Tensor]] = {}
        for n, param in layer.old.named_parameters():
            for kind, v in _state_of(by_name, f"{layer.path}.{n}").items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape == param.shape:
                    by_kind.setdefault(kind, {})[n] = v
        for kind, given in by_kind.items():
            for n, value in replay(plan, layer, given).items():
                if n in given:
                    out[f"{layer.path}.{n}"][kind] = value
    for key, axis, cmap in plan.attrs:
        for kind, value in _state_of(by_name, key).items():
            if isinstance(value, torch.Tensor) and value.dim():
                out[key][kind] = follow(value, axis, cmap)
    mapped = plan.mapped()
    unmapped = {n for n in changed if n not in mapped or any(
        isinstance(v, torch.Tensor) and v.dim() and tuple(v.shape) != shapes.get(n)
        for v in _state_of(out, n).values())}
    return out, unmapped


def _state_of(by_name: Mapping[str, Any], name: str) -> dict[str, Any]:
    state = by_name.get(name)
    return state if isinstance(state, dict) else {}


def _param_names(gm: fx.GraphModule) -> list[str]:
    """The parameter order of the model that reading the written file gives
    (``describe.rebuild``: leaf layers set in description order, then tensors held by the
    graph), which is what ``optim.X(morphcli.load(OUTPUT).parameters())`` counts in."""
    from morphcli.graph.describe import describe

    desc = describe(gm)
    tree: dict[str, Any] = {"first": [], "own": [], "children": {}}

    def node(path: str) -> dict[str, Any]:
        at = tree
        for part in path.split(".") if path else []:
            at = at["children"].setdefault(part, {"first": [], "own": [], "children": {}})
        return at

    for path in desc["modules"]:
        node(path)["own"] += [f"{path}.{n}" for n, _ in gm_layer(gm, path).named_parameters()]
    for path, kind in desc["attrs"].items():
        if kind == "parameter":
            parent, _, _ = path.rpartition(".")
            node(parent)["first"].append(path)  # a module's own parameters come first
    out: list[str] = []

    def walk(at: dict[str, Any]) -> None:
        out.extend(at["first"] + at["own"])
        for child in at["children"].values():
            walk(child)

    walk(tree)
    return list(dict.fromkeys(out))


def gm_layer(gm: fx.GraphModule, path: str) -> torch.nn.Module:
    from morphcli.graph.carried import carried

    layers = carried(gm)
    return layers[path] if path in layers else gm.get_submodule(path)


def _changed(original: Mapping[str, torch.Tensor], new: torch.nn.Module,
             names: list[str]) -> set[str]:
    state = new.state_dict()
    out = set()
    for name in names:
        old, now = original.get(name), state.get(name)
        if old is None or now is None or differs(old, now):
            out.add(name)
    return out


def _optimizers(entries: dict[str, Any]) -> Iterator[tuple[str, dict, Any]]:
    """(where, optimizer state_dict, a setter) for every optimizer state in the entries:
    ``optimizer``-like values and lists of them (Lightning's ``optimizer_states``)."""
    for key, value in list(entries.items()):
        if _is_optimizer(value):
            yield f"entry {key!r}", value, _setter(entries, key)
        elif isinstance(value, list):
            items = list(value)
            entries[key] = items
            for i, item in enumerate(items):
                if _is_optimizer(item):
                    yield f"entry {key!r}[{i}]", item, _setter(items, i)


def _setter(container: Any, key: Any) -> Any:
    def put(value: Any) -> None:
        container[key] = value
    return put


def _is_optimizer(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("state"), dict)
            and isinstance(v.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in v["param_groups"]))


def _id_names(opt: dict, order: list[str]) -> dict[Any, str | None]:
    """Parameter id -> name: from ``param_names`` (torch >= 2.6 stores them when the
    optimizer got named parameters), else by position in the model's parameter order (the
    ids of ``optim.X(model.parameters())``); None where that cannot be known."""
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    names = [n for g in opt["param_groups"] for n in g.get("param_names", [])]
    if len(names) == len(ids):
        return dict(zip(ids, names, strict=True))
    if len(ids) == len(order):
        return dict(zip(ids, order, strict=True))
    return dict.fromkeys(ids)


def _lost(opt: dict, order: list[str], changed: set[str]) -> list[tuple[str, list[str]]]:
    """(parameter, state names) for each state entry the morph makes stale."""
    if not changed:
        return []
    names = _id_names(opt, order)
    out = []
    for pid, state in opt["state"].items():
        name = names.get(pid)
        if (name is None or name in changed) and isinstance(state, dict) and state:
            out.append((name or f"parameter id {pid}", sorted(map(str, state))))
    return out


def renumbered_names(old_order: list[str], new_order: list[str],
                     original: Collection[str]) -> list[str]:
    """The parameters a renumbered optimizer holds, in id order: the morphed model's that it
    held before or that the morph added (not those it never held, like a frozen backbone)."""
    held = set(old_order)
    return [n for n in new_order if n in held or n not in original]


def _renumbered(opt: dict, old_order: list[str], new_order: list[str],
                dropped: set[str], by_name: dict[str, Any], original: Collection[str]) -> dict:
    """``opt`` with ids counted in ``new_order`` (new parameters join the group of the
    parameter before them), its state ``by_name``, without the state of ``dropped``; as it
    was when nothing moved."""
    names = _id_names(opt, old_order)
    if None in names.values():  # ids we cannot name: only the dropping applies
        kept = {k: v for k, v in opt["state"].items() if f"parameter id {k}" not in dropped}
        return {**opt, "state": kept}
    named = {pid: str(n) for pid, n in names.items()}
    group_of = {named[i]: g for g, group in enumerate(opt["param_groups"])
                for i in group["params"]}
    present = renumbered_names(old_order, new_order, original)
    moved = any(by_name.get(named[pid]) is not s for pid, s in opt["state"].items())
    if present == old_order and not dropped and not moved:
        return opt  # nothing moved: kept exactly as it was
    groups = [copy.copy(g) for g in opt["param_groups"]]
    for g in groups:
        g["params"] = []
        g.pop("param_names", None)
    state: dict[int, Any] = {}
    last = 0
    for new_id, name in enumerate(present):
        last = group_of.get(name, last)
        groups[last]["params"].append(new_id)
        if any("param_names" in g for g in opt["param_groups"]):
            groups[last].setdefault("param_names", []).append(name)
        if name in by_name and name not in dropped:
            state[new_id] = by_name[name]
    return {**opt, "state": state, "param_groups": groups}


# ---------------------------------------------------------------- writing


def payload(gm: fx.GraphModule, description: dict[str, Any],
            tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The dict written for a training checkpoint: the input's entries, the model state
    morphed (under its prefix, beside the keys kept aside) and the architecture."""
    training = of(gm)
    assert training is not None
    entries = dict(training.entries)
    state: dict[str, Any] = collections.OrderedDict(
        (training.prefix + k, v) for k, v in tensors.items())
    state.update(training.others)
    if isinstance(training.metadata, dict):  # module versions, for the user's load_state_dict
        state._metadata = training.metadata  # type: ignore[attr-defined]
    entries[training.key] = state
    entries[ARCH_ENTRY] = {"architecture": json.dumps(description, sort_keys=True),
                           "key": training.key, "prefix": training.prefix}
    return entries


def stored_architecture(obj: dict) -> tuple[str, str, str] | None:
    """(description text, model key, prefix) stored by ``payload``, or None."""
    value = obj.get(ARCH_ENTRY)
    if not isinstance(value, dict):
        return None
    text, key, prefix = value.get("architecture"), value.get("key"), value.get("prefix", "")
    if isinstance(text, str) and isinstance(key, str) and isinstance(prefix, str):
        return text, key, prefix
    return None


KEEPS_ENTRIES = (".pt", ".pth", ".ckpt", "")  # "": stdout, a .pt archive


def unkept_note(gm: fx.GraphModule, suffix: str) -> str:
    training = of(gm)
    names = training.entry_names() if training else []
    return (f"a {suffix} file holds the model only: the checkpoint's other entries "
            f"({', '.join(map(str, names[:6]))}{' ...' if len(names) > 6 else ''}) are not "
            "written; write .pt or .ckpt to keep them")


def _names(d: dict) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
