"""Start a run from published or earlier weights: ``train.py init_from=<source>``.

The source is anything ``dit.hub.load_model`` reads (an official facebookresearch/DiT ``.pt``, a
diffusers DiTPipeline or DiTTransformer2DModel directory, our export or training checkpoint; its EMA weights
when it has them), or a Hugging Face Hub id when the network allows (downloaded with ``huggingface_hub``).

Weights that fit are loaded as they are. What cannot fit is handled by one explicit rule each, and every tensor
that is not simply kept is listed in one table at start (kept / resized / reset / recomputed / dropped):

- the label table for another number of classes: the class rows re-initialised, or taken from the source's
  classes named by ``init_from_class_map`` (one source class, index or name, per new class); the null class
  (classifier-free guidance's) kept;
- the final layer for other output channels: with the same input channels, the channels both have are kept (the
  epsilon half of a learned-sigma model), the others keep this model's initialisation; other input channels reset
  it, and the patch embedding's weight;
- the position embedding for another resolution: sin-cos, so recomputed for the new grid (RoPE has none);
- anything else that differs (the block type, the width, the depth, the patch size, the norms, ...): refused,
  naming the setting, because those weights do not correspond.

``init_from`` is not ``resume``: the step, the optimiser and the data position start fresh, the EMA starts from the
loaded weights, and the run records where it started (``init_from`` in the exports' and checkpoints'
config.json, and so in the model card). A run that has a checkpoint resumes from it; the source is not read again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dit.hub import load_model
from dit.models import DiT, DiTConfig

__all__ = ["InitFrom", "initialize"]

LABELS = "y_embedder.embedding_table.weight"
# Architecture settings the source and this model must share: their weights correspond only then. The other
# DiTConfig fields may differ, each with its rule (module docstring): num_classes and class_dropout_prob (the
# label table), in_channels and learn_sigma (the patch embedding and the final layer), input_size (positions).
SHARED = (
    "block",
    "hidden_size",
    "depth",
    "num_heads",
    "patch_size",
    "mlp_ratio",
    "norm",
    "qk_norm",
    "mlp",
    "pos_embed",
    "timestep_freq_shift",
    "norm_eps",
)


@dataclasses.dataclass
class Row:
    action: str  # resized | reset | recomputed | dropped
    key: str
    source: tuple | None  # shapes
    target: tuple | None
    how: str

    def line(self) -> str:
        shapes = f"{self.source or '-'} -> {self.target or '-'}".replace("(", "[").replace(")", "]").replace(",]", "]")
        return f"  {self.action:<10} {self.key}  {shapes}: {self.how}"


@dataclasses.dataclass
class InitFrom:
    """What initialize() did: the record saved with the run, and the table printed at start."""

    source: str
    path: str
    format: str
    weights: str | None
    class_map: list[int] | None
    kept: int
    kept_parameters: int
    rows: list[Row]

    def record(self) -> dict:
        """config.json's "init_from" (exports, checkpoints): where the run started."""
        return {
            "source": self.source,
            "path": self.path,
            "format": self.format,
            "weights": self.weights,
            "class_map": self.class_map,
            "kept": self.kept,
            "changed": [{"key": r.key, "action": r.action, "how": r.how} for r in self.rows],
        }

    def table(self) -> str:
        head = f"init_from {self.source} ({self.format} format{f', {self.weights}' if self.weights else ''}):"
        kept = f"  {'kept':<10} {self.kept} tensors, {self.kept_parameters / 1e6:.2f}M values, as they are"
        return "\n".join([head, kept, *(r.line() for r in self.rows)])


def resolve(source: str) -> Path:
    """A local path, or a Hub repository id fetched with huggingface_hub (its VAE left out)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download  # only for a Hub id: the network, an optional path

            return Path(snapshot_download(repo_id=source, ignore_patterns=["vae/*"]))
        except Exception as e:  # offline, no such repository, no access: one line, whatever the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FileNotFoundError(
                f"init_from={source}: no such file or directory, and as a Hub id it could not be fetched "
                f"({type(e).__name__}: {first[:200]}); download it and give its path"
            ) from None
    raise FileNotFoundError(f"init_from={source}: no such file or directory")


def check_shared(source: DiTConfig, target: DiTConfig, where: str) -> None:
    for key in SHARED:
        a, b = getattr(source, key), getattr(target, key)
        if a != b:
            why = f"a {a} block's weights are not a {b} block's" if key == "block" else "the weights do not correspond"
            raise ValueError(
                f"init_from {where}: it has model.{key}={a}, this run model.{key}={b}; {why} "
                f"(set model.{key}={a} to start from it, or train from scratch)"
            )


def class_indices(class_map, names: list[str] | None, source_classes: int, classes: int) -> list[int] | None:
    """init_from_class_map: one source class per class of this model, as indices or the source's class names."""
    if class_map is None:
        return None
    class_map = list(class_map)
    if len(class_map) != classes:
        raise ValueError(f"init_from_class_map has {len(class_map)} entries; this model has {classes} classes")
    out = []
    for i, c in enumerate(class_map):
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if not names or c not in names:
                known = "the source names no classes" if not names else f"e.g. {', '.join(names[:5])}"
                raise ValueError(f"init_from_class_map[{i}]={c!r}: not a class of the source ({known})")
            c = names.index(c)
        c = int(c)
        if not 0 <= c < source_classes:
            raise ValueError(f"init_from_class_map[{i}]={c}: the source has classes 0..{source_classes - 1}")
        out.append(c)
    return out


def adapt_labels(s, t, src: DiTConfig, tgt: DiTConfig, mapping: list[int] | None) -> tuple[torch.Tensor, Row | None]:
    """The label table: class rows mapped or re-initialised, the null row kept (or initialised if it has none)."""
    ks, kt = src.num_classes, tgt.num_classes
    null_s, null_t = s.shape[0] > ks, t.shape[0] > kt
    if mapping is None and s.shape == t.shape:
        return s, None
    new, how = t.clone(), []
    if mapping is not None:
        new[:kt] = s[mapping]
        how.append(f"classes from init_from_class_map ({ks} -> {kt} classes)")
    else:
        how.append(f"class rows re-initialised ({ks} -> {kt} classes; init_from_class_map= maps them)")
    if null_s and null_t:
        new[kt] = s[ks]
        how.append("null class kept")
    elif null_t:
        how.append("null class initialised (the source has none)")
    action = "resized" if mapping is not None or (null_s and null_t) else "reset"
    return new, Row(action, LABELS, tuple(s.shape), tuple(t.shape), ", ".join(how))


def adapt_output(key: str, s, t, src: DiTConfig, tgt: DiTConfig) -> tuple[torch.Tensor, Row]:
    """A final-layer tensor whose leading dimension is patch^2 x output channels."""
    p2 = tgt.patch_size**2
    o_s, o_t = src.out_channels, tgt.out_channels
    if s.shape[0] != p2 * o_s or t.shape[0] != p2 * o_t or s.shape[1:] != t.shape[1:]:
        raise ValueError(f"init_from: {key} is {tuple(s.shape)} in the source but {tuple(t.shape)} here")
    if src.in_channels != tgt.in_channels:
        return t, Row("reset", key, tuple(s.shape), tuple(t.shape), f"{o_s} -> {o_t} output channels")
    n = min(o_s, o_t)  # epsilon (or velocity) channels first, a learned sigma's after (unpatchify: (p, p, C))
    new = t.clone().unflatten(0, (p2, o_t))
    new[:, :n] = s.unflatten(0, (p2, o_s))[:, :n]
    what = "learned-sigma channels dropped" if o_s > o_t else "learned-sigma channels initialised"
    return new.flatten(0, 1), Row("resized", key, tuple(s.shape), tuple(t.shape), f"first {n} channels kept, {what}")


def initialize(model: DiT, source: str, class_map=None) -> InitFrom:
    """Load `source` into `model` (in place, before training), adapting what differs; returns what was done."""
    path = resolve(str(source))
    src, meta = load_model(path)
    check_shared(src.config, model.config, str(path))
    mapping = class_indices(class_map, meta.get("class_names"), src.num_classes, model.num_classes)
    given, target = src.state_dict(), model.state_dict()
    new, rows, kept, kept_values = {}, [], 0, 0
    for key, t in target.items():
        s = given.get(key)
        row = None
        if s is None:
            value, row = t, Row("reset", key, None, tuple(t.shape), "not in the source")
        elif key == LABELS:
            value, row = adapt_labels(s, t, src.config, model.config, mapping)
        elif s.shape == t.shape:
            value = s
        elif key == "pos_embed":  # a buffer: the sin-cos grid of this model's input size
            g = model.config.grid_size
            value, row = t, Row("recomputed", key, tuple(s.shape), tuple(t.shape), f"sin-cos for the {g}x{g} grid")
        elif key.startswith("x_embedder.") and src.in_channels != model.config.in_channels:
            how = f"{src.in_channels} -> {model.config.in_channels} input channels"
            value, row = t, Row("reset", key, tuple(s.shape), tuple(t.shape), how)
        elif key.startswith("final_layer."):
            value, row = adapt_output(key, s, t, src.config, model.config)
        else:
            raise ValueError(f"init_from {path}: {key} is {tuple(s.shape)} there but {tuple(t.shape)} here")
        if row is None:
            kept, kept_values = kept + 1, kept_values + t.numel()
        else:
            rows.append(row)
        new[key] = value.to(t.dtype)
    rows += [Row("dropped", k, tuple(v.shape), None, "not in this model") for k, v in given.items() if k not in target]
    model.load_state_dict(new, strict=True)
    return InitFrom(
        source=str(source),
        path=str(path),
        format=meta.get("format", "?"),
        weights=meta.get("weights"),
        class_map=mapping,
        kept=kept,
        kept_parameters=kept_values,
        rows=rows,
    )
