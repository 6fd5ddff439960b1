"""Interop with the released facebookresearch/DiT checkpoints and diffusers' DiTTransformer2DModel.

Our adaLN-Zero model uses the official parameter names, so an official state dict loads as is.
diffusers differs from the official code in two details that change outputs slightly, and the
converters carry them across so converted models compute the same function:
- its timestep frequencies are 10000^(-i/(half-1)) (``downscale_freq_shift=1``) instead of
  10000^(-i/half): ``timestep_freq_shift`` on our side;
- the LayerNorm before its MLP uses the config's ``norm_eps`` (default 1e-5) instead of 1e-6.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from dit.integrity import load_state_dict_checked
from dit.models import DIT_MODELS, DiT, DiTConfig

__all__ = ["diffusers_obstacle", "from_diffusers", "infer_official_config", "load_official_checkpoint", "to_diffusers"]


def _zoo_name(depth: int, hidden_size: int, patch_size: int) -> tuple[str | None, int | None]:
    """Zoo name and head count of an architecture; (None, None) outside the zoo (heads cannot be
    read off the weights: the caller must give num_heads)."""
    for name, cfg in DIT_MODELS.items():
        if (cfg["depth"], cfg["hidden_size"], cfg["patch_size"]) == (depth, hidden_size, patch_size):
            return name, cfg["num_heads"]
    return None, None


def infer_official_config(state_dict: dict[str, torch.Tensor], **overrides) -> DiTConfig:
    """The DiTConfig of an official-format adaLN-Zero state dict (``overrides``: e.g. num_heads= off the zoo)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        table = state_dict["y_embedder.embedding_table.weight"]  # (classes [+ 1], D)
        out = state_dict["final_layer.linear.weight"]  # (p*p*C_out, D)
        num_tokens = state_dict["pos_embed"].shape[1]
    except KeyError as e:
        raise ValueError(f"not an official DiT state dict: missing key {e}") from None
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    out_channels = out.shape[0] // patch_size**2
    name, num_heads = _zoo_name(depth, hidden_size, patch_size)
    if num_heads is None and "num_heads" not in overrides:
        raise ValueError(f"depth {depth} / hidden {hidden_size} is not a zoo size; pass num_heads=")
    # Official training always drops labels (class_dropout_prob=0.1), so the last row is the null class.
    settings = dict(
        input_size=math.isqrt(num_tokens) * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_classes=table.shape[0] - 1,
        class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * in_channels,
        block="adaln_zero",
        name=name,
    )
    return DiTConfig(**{**settings, **overrides})


def load_official_checkpoint(path: str | Path, use_ema: bool = True, **overrides) -> DiT:
    """Load an official DiT .pt (a plain state dict, or train.py's {"model", "ema", ...}) strictly.

    Loaded with weights_only=True: no pickled code from the file is executed. Mismatched keys or
    shapes raise an error naming them.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable official DiT checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "ema" in obj and "model" in obj:
        obj = obj["ema" if use_ema else "model"]
    try:
        config = infer_official_config(obj, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = DiT(config)
    load_state_dict_checked(model, obj, path)
    return model


def diffusers_obstacle(model: DiT) -> str | None:
    """Why to_diffusers cannot convert this model (None: it can)."""
    if model.block != "adaln_zero":
        return f"diffusers' DiTTransformer2DModel only has adaLN-Zero blocks, not {model.block!r}"
    plain = {
        **{"norm": "layernorm", "qk_norm": False, "mlp": "gelu", "pos_embed": "sincos", "cond_map": None},
        "interval_input": False,
        "guidance_input": False,
    }
    other = {k: getattr(model.config, k) for k, v in plain.items() if getattr(model.config, k) != v}
    if other:
        listing = ", ".join(f"{k}={v}" for k, v in other.items())
        return (
            "diffusers' DiT has only layernorm, gelu, sincos, no qk_norm, no spatial map, no interval or guidance "
            f"input (few-step models); this model has {listing}"
        )
    if not model.y_embedder.has_null_class:
        return "diffusers' DiT always has a null class; build the model with class_dropout_prob > 0"
    return None


def to_diffusers(model: DiT, num_embeds: int | None = None):
    """Our adaLN-Zero DiT -> diffusers DiTTransformer2DModel computing the same function.

    num_embeds: the label table's class count (its null row is at that index; default: the model's classes).
    DiTPipeline hard-codes the null class as 1000, so a K-class model runs in it with num_embeds=1000: rows
    0..K-1 are the classes, rows K..999 copies of the null row (never a real class), row 1000 the null row.
    from_diffusers drops such copies again.
    """
    from diffusers import DiTTransformer2DModel  # diffusers takes seconds to import: only conversions need it

    if why := diffusers_obstacle(model):
        raise ValueError(why)
    num_embeds = model.num_classes if num_embeds is None else num_embeds
    if num_embeds < model.num_classes:
        raise ValueError(f"a label table of {num_embeds} classes cannot hold this model's {model.num_classes}")
    if model.t_embedder.freq_shift != 1:
        warnings.warn(
            "diffusers' DiT embeds timesteps with downscale_freq_shift=1 while this model uses "
            f"{model.t_embedder.freq_shift}: set on the converted modules (so outputs match), but a "
            "save_pretrained/from_pretrained round trip resets it to 1",
            stacklevel=2,
        )
    c = model.config
    dmodel = DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=num_embeds,
        norm_eps=c.norm_eps,
    )
    sd = model.state_dict()
    table = sd["y_embedder.embedding_table.weight"]  # (K + 1, D), the null class last
    null = table[-1:]
    table = torch.cat([table[:-1], null.expand(num_embeds - model.num_classes + 1, -1)])  # (num_embeds + 1, D)
    new = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(len(model.blocks)):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        # diffusers keeps a copy of the timestep/label embedders in every block.
        for ours, theirs in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
            for p in ("weight", "bias"):
                new[f"{d}norm1.emb.timestep_embedder.{theirs}.{p}"] = sd[f"t_embedder.{ours}.{p}"]
        new[f"{d}norm1.emb.class_embedder.embedding_table.weight"] = table
        for p in ("weight", "bias"):
            new[f"{d}norm1.linear.{p}"] = sd[f"{o}adaLN_modulation.1.{p}"]
            q, k, v = sd[f"{o}attn.qkv.{p}"].chunk(3, dim=0)
            new[f"{d}attn1.to_q.{p}"], new[f"{d}attn1.to_k.{p}"], new[f"{d}attn1.to_v.{p}"] = q, k, v
            new[f"{d}attn1.to_out.0.{p}"] = sd[f"{o}attn.proj.{p}"]
            new[f"{d}ff.net.0.proj.{p}"] = sd[f"{o}mlp.fc1.{p}"]
            new[f"{d}ff.net.2.{p}"] = sd[f"{o}mlp.fc2.{p}"]
    dmodel.load_state_dict(new, strict=True)
    for block in dmodel.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = model.t_embedder.freq_shift
    return dmodel.to(next(model.parameters()).dtype)


def _without_null_copies(table: torch.Tensor) -> torch.Tensor:
    """A diffusers label table (classes, then the null row) without the rows just before the null row that are
    exact copies of it: the padding to_diffusers(num_embeds=1000) writes for DiTPipeline (a trained or randomly
    initialised class row never equals the null row exactly)."""
    num_classes = len(table) - 1
    while num_classes > 1 and torch.equal(table[num_classes - 1], table[-1]):
        num_classes -= 1
    return torch.cat([table[:num_classes], table[-1:]])


def from_diffusers(dmodel, name: str | None = None) -> DiT:
    """diffusers DiTTransformer2DModel -> our adaLN-Zero DiT computing the same function (a label table padded for
    DiTPipeline, to_diffusers(num_embeds=1000), loses its padding: the model has its own K classes again)."""
    cfg = dmodel.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.norm_eps != 1e-6:
        warnings.warn(
            f"diffusers config norm_eps={cfg.norm_eps} applies to its pre-MLP LayerNorm only (its "
            "pre-attention norm uses 1e-6); our blocks use it for both, so outputs differ at the "
            "level of that eps difference",
            stacklevel=2,
        )
    sd = dmodel.state_dict()
    blocks = dmodel.transformer_blocks
    ref = blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(blocks[1:], start=1):
        if any(not torch.equal(v, ref[k]) for k, v in block.norm1.emb.state_dict().items()):
            raise ValueError(f"transformer_blocks.{i} has timestep/label embedders unlike block 0's; cannot share them")
    zoo_name, _ = _zoo_name(cfg.num_layers, hidden, cfg.patch_size)
    table = _without_null_copies(sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"])
    model = DiT(
        DiTConfig(
            input_size=cfg.sample_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            hidden_size=hidden,
            depth=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            num_classes=len(table) - 1,
            class_dropout_prob=0.1,
            learn_sigma=dmodel.out_channels == 2 * cfg.in_channels,
            block="adaln_zero",
            timestep_freq_shift=int(blocks[0].norm1.emb.time_proj.downscale_freq_shift),
            norm_eps=cfg.norm_eps,
            name=name or zoo_name,
        )
    )
    new = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": model.pos_embed,
        "y_embedder.embedding_table.weight": table,
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for ours, theirs in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
        for p in ("weight", "bias"):
            new[f"t_embedder.{ours}.{p}"] = sd[f"transformer_blocks.0.norm1.emb.timestep_embedder.{theirs}.{p}"]
    for i in range(cfg.num_layers):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            new[f"{o}adaLN_modulation.1.{p}"] = sd[f"{d}norm1.linear.{p}"]
            new[f"{o}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn1.to_{n}.{p}"] for n in "qkv"], dim=0)
            new[f"{o}attn.proj.{p}"] = sd[f"{d}attn1.to_out.0.{p}"]
            new[f"{o}mlp.fc1.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            new[f"{o}mlp.fc2.{p}"] = sd[f"{d}ff.net.2.{p}"]
    model.load_state_dict(new, strict=True)
    return model.to(next(dmodel.parameters()).dtype)
