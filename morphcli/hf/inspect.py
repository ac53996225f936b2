"""``morph inspect DIR``: what a Hugging Face directory holds and which morphs apply."""

from __future__ import annotations

from typing import Any

from morphcli.hf.directory import HFDir


def _heads_to_add(d: HFDir) -> int | None:
    """The fewest query heads to add that keep the grouped-query ratio and that transformers'
    config accepts (some require hidden_size to be a multiple of the heads), or None."""
    from morphcli.errors import MorphError
    from morphcli.hf.check import to_config

    fam = d.family
    if not fam.rotary or d.config.get(fam.field_of("head_dim")) is None:
        return None
    heads = int(d.cfg("heads"))
    kv = int(d.cfg("kv_heads") or heads)
    ratio = heads // kv
    for more in range(ratio, 4 * heads + 1, ratio):
        config = {**d.config, fam.field_of("heads"): heads + more,
                  fam.field_of("kv_heads"): kv + more // ratio}
        try:
            to_config(d, config)
            return more
        except MorphError:
            continue
    return None


def summarize(d: HFDir) -> dict[str, Any]:
    """Family, dtype, weight files, the config's sizes, the blocks, the applicable morphs."""
    fam = d.family
    sizes = {role: d.cfg(role) for role in ("layers", "hidden", "inter", "heads", "kv_heads",
                                            "head_dim")}
    sizes["vocab"] = d.config.get("vocab_size")
    blocks = [f"{d.prefix}.{j}" for j in range(d.n_blocks)]
    morphs = [f"deepen {d.path} --after {blocks[-1]}",
              f"widen {d.path} intermediate_size --factor 2"]
    if d.has_head:
        morphs.append(f"widen {d.path} hidden_size --factor 2")
    more = _heads_to_add(d)
    if more:
        morphs.append(f"widen {d.path} num_attention_heads --by {more}")
    return {
        "path": str(d.path), "family": fam.name, "class": d.cls_name, "dtype": d.dtype,
        "shards": [f for f in d.weight_files if not f.endswith(".json")],
        "params": sum(t.numel() for t in d.state.values()),
        "sizes": {fam.field_of(k) if k != "vocab" else "vocab_size": v
                  for k, v in sizes.items()},
        "blocks": blocks, "morphs": morphs,
    }
