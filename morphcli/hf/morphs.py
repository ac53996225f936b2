"""The exact morphs of a Hugging Face model, as rewrites of its state_dict and config.

Every function takes the model as read (``HFDir``) and returns the new tensors (input dtype;
unchanged tensors are the same objects) and the new config; nothing here runs the model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.hf.directory import HFDir


@dataclass
class HFMorph:
    """A morph's result: new tensors and config, and the plan recorded beside the weights."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- deepen


def deepen(d: HFDir, afters: list[str]) -> HFMorph:
    """Insert after each named block a copy whose residual writes are zero (LLaMA Pro); for
    post-LN blocks (BERT) the output LayerNorm's affine moves to the copy instead.

    >>> deepen(load_dir("tiny-llama"), ["model.layers.1"]).config["num_hidden_layers"]
    3
    """
    if not afters:
        raise InputError("deepen needs --after BLOCK (e.g. --after "
                         f"{d.prefix}.{d.n_blocks - 1})")
    picked = [d.block(a) for a in afters]
    if len(set(picked)) != len(picked):
        raise InputError("each --after block may be named once")
    order: list[tuple[int, bool]] = []  # (source block, is a new copy) per new position
    for j in range(d.n_blocks):
        order.append((j, False))
        if j in picked:
            order.append((j, True))
    blocks, rest = _split_blocks(d)
    state = dict(rest)
    inverse_idx = d.family.conv1d and bool(d.config.get("scale_attn_by_inverse_layer_idx"))
    for p, (j, is_copy) in enumerate(order):
        block = dict(blocks[j])
        if is_copy:
            block = {k: t.clone() for k, t in block.items()}
            _deepen_copy(d, block, blocks[j], state, p)
        if inverse_idx and p != j:  # attention divides by (layer_idx + 1): keep q/(j+1)
            _scale_query(d, block, (p + 1) / (j + 1))
        state.update({f"{d.prefix}.{p}.{k}": t for k, t in block.items()})
    config = _deepened_config(d, order)
    plan = {"morph": "deepen", "after": [f"{d.prefix}.{j}" for j in sorted(picked)],
            "blocks": [f"{d.prefix}.{j}" + (" (new copy)" if c else "") for j, c in order],
            "recipe": "post-LN: LayerNorm affine moved to the copy" if d.family.post_ln
            else "copy with zero output projections (LLaMA Pro)"}
    return HFMorph(state, config, plan)


def _split_blocks(d: HFDir) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    pat = re.compile(re.escape(d.prefix) + r"\.(\d+)\.(.+)")
    blocks: dict[int, dict[str, torch.Tensor]] = {j: {} for j in range(d.n_blocks)}
    rest = {}
    for k, t in d.state.items():
        m = pat.fullmatch(k)
        if m:
            blocks[int(m.group(1))][m.group(2)] = t
        else:
            rest[k] = t
    return blocks, rest


def _deepen_copy(d: HFDir, copy: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                 state: dict[str, torch.Tensor], p: int) -> None:
    """Make ``copy`` (the new block at position p) pass its input through unchanged."""
    fam = d.family
    for proj in (fam.attn_out, fam.mlp_out):
        for suffix in (".weight", ".bias"):
            if proj + suffix in copy:
                copy[proj + suffix].zero_()
    if fam.post_ln:  # LN(LN(y)) != y: the source block ends with a plain LN, the copy re-applies
        out_norm, attn_norm = fam.post_ln
        prev = f"{d.prefix}.{p - 1}."
        for suffix, value in ((".weight", 1.0), (".bias", 0.0)):
            plain = torch.full_like(source[out_norm + suffix], value)
            state[prev + out_norm + suffix] = plain  # the source block, already placed
            copy[attn_norm + suffix] = plain.clone()
            copy[out_norm + suffix] = source[out_norm + suffix].clone()


def _scale_query(d: HFDir, block: dict[str, torch.Tensor], factor: float) -> None:
    name = d.family.qkv[0]
    hidden = int(d.cfg("hidden"))
    for suffix in (".weight", ".bias"):
        t = block[name + suffix].clone()
        q = t[..., :hidden]  # Conv1D stores (in, out): q is the first third of the out axis
        q.copy_((q.float() * factor).to(t.dtype))
        block[name + suffix] = t


def _deepened_config(d: HFDir, order: list[tuple[int, bool]]) -> dict[str, Any]:
    config = dict(d.config)
    config[d.family.field_of("layers")] = len(order)
    for name in d.family.per_layer:
        values = config.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != d.n_blocks:
            raise InputError(f"{d.path}/config.json: {name} should list {d.n_blocks} entries, "
                             "one per block")
        config[name] = [values[j] for j, _ in order]
    return config


# ---------------------------------------------------------------- widen the MLP


def new_width(old: int, to: int | None, by: int | None, factor: float | None, what: str) -> int:
    """The width asked for by exactly one of --to / --by / --factor (more than ``old``)."""
    given = [x for x in (to, by, factor) if x is not None]
    if len(given) != 1:
        raise InputError(f"widen {what}: give exactly one of --to N, --by N, --factor F")
    new = to if to is not None else old + by if by is not None else old * float(factor or 0)
    if float(new) != int(new):
        raise InputError(f"widen {what}: --factor {factor:g} gives {new:g} units, not a whole "
                         "number; pick a factor that does, or use --to")
    if int(new) <= old:
        raise InputError(f"widen {what}: the new width {int(new)} must exceed the current "
                         f"{old}")
    return int(new)


def mlp_width(d: HFDir) -> int:
    width = d.cfg("inter")
    return int(width) if width is not None else 4 * int(d.cfg("hidden"))  # GPT-2's n_inner


def widen_mlp(d: HFDir, width: int, init: str, seed: int) -> HFMorph:
    """Every block's MLP to ``width`` units: new units read at random and write zero (or, with
    init 'copy', copy random units and the writes are divided, Net2WiderNet)."""
    old = mlp_width(d)
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.cat([torch.arange(old), _picks(old, width - old, gen)])
    counts = torch.bincount(mapping, minlength=old).float()
    state = dict(d.state)
    fam = d.family
    for j in range(d.n_blocks):
        pre = f"{d.prefix}.{j}."
        for name in fam.mlp_in:
            for suffix in (".weight", ".bias"):
                key = pre + name + suffix
                if key in state:
                    axis = 1 if fam.conv1d and suffix == ".weight" else 0
                    state[key] = _grow_in(state[key], axis, mapping, init, gen, suffix)
        key = pre + fam.mlp_out + ".weight"
        axis = 0 if fam.conv1d else 1
        state[key] = _grow_out(state[key], axis, mapping, counts, init)
    config = dict(d.config)
    config[fam.field_of("inter")] = width
    plan = {"morph": "widen", "field": "intermediate_size", "from": old, "to": width,
            "init": init, "blocks": d.n_blocks}
    return HFMorph(state, config, plan)


def _picks(old: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """The units ``n`` copies copy: distinct ones, each as evenly often as possible, so the
    divisors stay small (a factor of 2 divides by exactly 2, exact in bf16 too)."""
    rounds = [torch.randperm(old, generator=gen) for _ in range(-(-n // old))]
    return torch.cat(rounds)[:n] if rounds else torch.zeros(0, dtype=torch.long)


def _grow_in(t: torch.Tensor, axis: int, mapping: torch.Tensor, init: str,
             gen: torch.Generator, suffix: str) -> torch.Tensor:
    """Units along ``axis``: copies of ``mapping``, or random new ones (zero biases)."""
    old = t.shape[axis]
    if init == "copy":
        return t.index_select(axis, mapping)
    shape = list(t.shape)
    shape[axis] = len(mapping) - old
    if suffix == ".bias":
        fresh = torch.zeros(shape, dtype=t.dtype)
    else:
        std = float(t.float().std()) or 0.02
        fresh = (torch.randn(shape, generator=gen) * std).to(t.dtype)
    return torch.cat([t, fresh], dim=axis)


def _grow_out(t: torch.Tensor, axis: int, mapping: torch.Tensor, counts: torch.Tensor,
              init: str) -> torch.Tensor:
    """Reads of the grown units along ``axis``: zero, or divided among the copies."""
    old = t.shape[axis]
    if init != "copy":
        shape = list(t.shape)
        shape[axis] = len(mapping) - old
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=axis)
    scale = (1.0 / counts[mapping]).view([-1 if a == axis else 1 for a in range(t.dim())])
    return (t.float().index_select(axis, mapping) * scale).to(t.dtype)


# ---------------------------------------------------------------- widen attention heads


def widen_heads(d: HFDir, heads: int, seed: int) -> HFMorph:
    """Add query heads (and key/value heads, keeping the grouped-query ratio) with zero output
    columns; needs an explicit ``head_dim`` in config.json (else head_dim would change)."""
    fam = d.family
    old_h = int(d.cfg("heads"))
    old_kv = int(d.cfg("kv_heads", old_h) or old_h)
    if d.config.get(fam.field_of("head_dim")) is None or len(fam.qkv) != 3:
        raise UnsupportedMorphError(
            f"{d.path}: {fam.name} has no explicit head_dim in config.json, so head_dim is "
            "hidden_size / num_attention_heads and more heads would change it; widen "
            "hidden_size --factor K instead (it multiplies the heads)")
    ratio = old_h // old_kv
    if (heads - old_h) % ratio:
        raise InputError(f"widen num_attention_heads: {old_h} query heads share {old_kv} "
                         f"key/value heads ({ratio} each); add a multiple of {ratio} heads")
    hd = int(d.config[fam.field_of("head_dim")])
    new_kv = old_kv + (heads - old_h) // ratio
    gen = torch.Generator().manual_seed(seed)
    state = dict(d.state)
    for j in range(d.n_blocks):
        pre = f"{d.prefix}.{j}."
        for name, n in zip(fam.qkv, (heads, new_kv, new_kv), strict=True):
            rows = torch.arange(n * hd)  # only its length matters for new units
            for suffix in (".weight", ".bias"):
                key = pre + name + suffix
                if key in state:
                    state[key] = _grow_in(state[key], 0, rows, "zero", gen, suffix)
        key = pre + fam.attn_out + ".weight"
        state[key] = _grow_out(state[key], 1, torch.arange(heads * hd), torch.ones(1), "zero")
    config = dict(d.config)
    config[fam.field_of("heads")] = heads
    if fam.field_of("kv_heads") in config:
        config[fam.field_of("kv_heads")] = new_kv
    plan = {"morph": "widen", "field": "num_attention_heads", "from": old_h, "to": heads,
            "key_value_heads": [old_kv, new_kv], "head_dim": hd, "init": "zero"}
    return HFMorph(state, config, plan)


# ---------------------------------------------------------------- widen hidden (HyperCloning)


def widen_hidden(d: HFDir, k: int) -> HFMorph:
    """HyperCloning x k: the residual stream becomes k tiled copies of itself. Embeddings tile,
    every linear map expands blockwise (inputs divided by k), norms tile, heads x k with
    head_dim kept; a tied head's 1/k is folded into the final norm (Gemma: sqrt(k))."""
    fam = d.family
    if not d.has_head:
        raise UnsupportedMorphError(
            f"{d.path}: {d.cls_name} outputs the hidden states themselves, which widening "
            "hidden_size would change; widen a model with its LM head "
            f"({fam.classes[0]})")
    model = meta_model(d)
    hidden = int(d.cfg("hidden"))
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb_scale = math.sqrt(k) if fam.embed_scale else 1.0  # sqrt(d) grows by sqrt(k)
    fold = k / emb_scale if tied else 1.0
    state = {}
    for key, t in d.state.items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        state[key] = _clone_tensor(d, key, t, module, k, hidden,
                                   is_head=module is head, is_emb=module is emb,
                                   emb_scale=emb_scale, fold=fold)
    config = dict(d.config)
    for name in {fam.field_of(r): r for r in ("hidden", "heads", "kv_heads")}:  # GPT-2: once
        if config.get(name) is not None:
            config[name] = int(config[name]) * k
    if config.get(fam.field_of("inter")) is not None:
        config[fam.field_of("inter")] = int(config[fam.field_of("inter")]) * k
    plan = {"morph": "widen", "field": "hidden_size", "factor": k, "from": hidden,
            "to": hidden * k, "recipe": "HyperCloning (tiled)", "tied_head_fold": fold}
    return HFMorph(state, config, plan)


def _clone_tensor(d: HFDir, key: str, t: torch.Tensor, module: torch.nn.Module, k: int,
                  hidden: int, *, is_head: bool, is_emb: bool, emb_scale: float,
                  fold: float) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    fam = d.family
    kind = key.rsplit(".", 1)[1]
    x = t.float()
    if isinstance(module, torch.nn.Embedding):
        out = x.repeat(1, k) / (emb_scale if is_emb else 1.0)
    elif isinstance(module, torch.nn.Linear):
        if kind == "weight":
            out = x.repeat(1, k) / k if is_head else x.repeat(k, k) / k
        else:
            out = x if is_head else x.repeat(k)
    elif isinstance(module, Conv1D):
        parts = 3 if fam.conv1d and key.endswith(f"{fam.qkv[0]}.{kind}") else 1
        chunks = x.chunk(parts, dim=-1)  # GPT-2's c_attn: q, k and v tile separately
        out = torch.cat([c.repeat(k, k) / k if kind == "weight" else c.repeat(k)
                         for c in chunks], dim=-1)
    elif x.dim() == 1 and x.numel() == d.config.get("vocab_size") != hidden:
        out = x  # a head's bias over the vocabulary (BERT's cls.predictions.bias)
    elif x.dim() == 1 and x.numel() == hidden:  # a norm over the residual stream
        out = x.repeat(k)
        if fold != 1.0 and any(key.startswith(n + ".") for n in fam.final_norms):
            out = (1 + out) / fold - 1 if fam.norm == "rms1p" else out / fold
    elif x.dim() == 1 and module.__class__.__name__.endswith("Norm"):
        out = x  # per-head q/k norms: head_dim is kept
    else:
        raise UnsupportedMorphError(
            f"{d.path}: HyperCloning has no rule for {key} ({type(module).__name__}, shape "
            f"{tuple(t.shape)})")
    return out.to(t.dtype) if out is not x else t


def meta_model(d: HFDir, config: dict[str, Any] | None = None) -> Any:
    """The transformers model of ``d`` on the meta device (module types, ties; no memory)."""
    from morphcli.hf.check import model_class, quiet_transformers, to_config

    with quiet_transformers():
        cfg = to_config(d, config or d.config)
        with torch.device("meta"):
            return model_class(d)(cfg)
