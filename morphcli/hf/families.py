"""The supported model families: one table entry each, describing weights by name (as
mergekit's architecture files do), never by tracing. A new family is a new entry."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """How one ``config.model_type`` lays out its weights and config.

    Projection names are relative to a block (``model.layers.3.`` + ``self_attn.o_proj``)."""

    name: str
    classes: tuple[str, ...]          # transformers classes allowed for ``architectures``
    blocks: tuple[str, ...]           # candidate block prefixes (with and without a head)
    attn_out: str                     # projection writing attention into the residual stream
    mlp_in: tuple[str, ...]           # projections producing the MLP's hidden units
    mlp_out: str                      # projection writing the MLP into the residual stream
    qkv: tuple[str, ...]              # query, key, value (one fused name for GPT-2)
    norm: str                         # "rms", "rms1p" (Gemma's (1 + w)) or "layer"
    final_norms: tuple[str, ...]      # the norm before the LM head, candidate keys
    embeddings: tuple[str, ...]       # token embedding keys (tied to the head when tied)
    fields: dict[str, str] = field(default_factory=dict)  # role -> config field
    conv1d: bool = False              # GPT-2's Conv1D: weights stored (in, out)
    post_ln: tuple[str, ...] = ()     # BERT: the block's output and attention LayerNorms
    embed_scale: bool = False         # Gemma: embeddings times sqrt(hidden_size)
    rotary: bool = True
    decoder: bool = True
    per_layer: tuple[str, ...] = ()   # config lists with one entry per block

    def field_of(self, role: str) -> str:
        return self.fields.get(role, _DEFAULT_FIELDS[role])


_DEFAULT_FIELDS = {"layers": "num_hidden_layers", "hidden": "hidden_size",
                   "inter": "intermediate_size", "heads": "num_attention_heads",
                   "kv_heads": "num_key_value_heads", "head_dim": "head_dim"}


def _llama_like(name: str, classes: tuple[str, ...], norm: str = "rms", **kw: object) -> Family:
    return Family(
        name=name, classes=classes, blocks=("model.layers", "layers"),
        attn_out="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        norm=norm, final_norms=("model.norm", "norm"),
        embeddings=("model.embed_tokens", "embed_tokens"), **kw)  # type: ignore[arg-type]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _llama_like("llama", ("LlamaForCausalLM", "LlamaModel")),
    _llama_like("mistral", ("MistralForCausalLM", "MistralModel")),
    _llama_like("qwen2", ("Qwen2ForCausalLM", "Qwen2Model"), per_layer=("layer_types",)),
    _llama_like("qwen3", ("Qwen3ForCausalLM", "Qwen3Model"), per_layer=("layer_types",)),
    _llama_like("gemma", ("GemmaForCausalLM", "GemmaModel"), norm="rms1p", embed_scale=True),
    _llama_like("gemma2", ("Gemma2ForCausalLM", "Gemma2Model"), norm="rms1p",
                embed_scale=True, per_layer=("layer_types",)),
    _llama_like("gemma3_text", ("Gemma3ForCausalLM", "Gemma3TextModel"), norm="rms1p",
                embed_scale=True, per_layer=("layer_types",)),
    Family(
        name="gpt2", classes=("GPT2LMHeadModel", "GPT2Model"), blocks=("transformer.h", "h"),
        attn_out="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", qkv=("attn.c_attn",),
        norm="layer", final_norms=("transformer.ln_f", "ln_f"),
        embeddings=("transformer.wte", "wte"), conv1d=True, rotary=False,
        fields={"layers": "n_layer", "hidden": "n_embd", "inter": "n_inner", "heads": "n_head",
                "kv_heads": "n_head"}),
    Family(
        name="bert", classes=("BertForMaskedLM", "BertModel"),
        blocks=("bert.encoder.layer", "encoder.layer"), attn_out="attention.output.dense",
        mlp_in=("intermediate.dense",), mlp_out="output.dense",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        norm="layer", final_norms=("cls.predictions.transform.LayerNorm",),
        embeddings=("bert.embeddings.word_embeddings", "embeddings.word_embeddings"),
        post_ln=("output.LayerNorm", "attention.output.LayerNorm"), rotary=False, decoder=False,
        fields={"kv_heads": "num_attention_heads"}),
)}

# The names users type for the config fields `widen` grows.
WIDEN_FIELDS = ("intermediate_size", "hidden_size", "num_attention_heads")


def family_for(model_type: object, where: str) -> Family:
    """The table entry for ``config.model_type``, or an error naming the supported ones."""
    from morphcli.errors import InputError

    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise InputError(f"{where}: model_type {model_type!r} is not a supported family; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return fam
