"""REPA (Yu et al., ICLR 2025, "Representation Alignment for Generation"): during training, the hidden tokens after
one early block, through a small trained MLP (the projector), are pulled towards a frozen self-supervised encoder's
patch features of the clean image; the loss gains ``weight * (-mean cosine similarity)``.

    python train.py training.repa.weight=0.5 training.repa.block=8 training.repa.encoder=timm:vit_base_patch14_dinov2 \\
        training.repa.encoder_weights=/models/dinov2_vitb14.safetensors        # ImageNet scale: REPA's DINOv2-B
    python train.py experiment=fashion_mnist_cpu_2024 training.repa.weight=0.5  # the teacher trained here (teachers.py)

The encoder is a TEACHERS name, or ``timm:<model name>`` with its weights as a local file (nothing is downloaded;
a missing file is an error naming it). Its feature grid is resized (bilinear) to the DiT's token grid when they
differ. The projector is trained with the DiT (same optimiser, synchronised like it under DDP/FSDP, in the
checkpoints so a resume is exact), and left out of the EMA and of the export: sampling never uses it. REPA needs the
images: latents are used with the images stored beside them (python -m dit.data.extract --pixels), else refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from dit.data import has_images
from dit.registry import Registry
from dit.training.addons.base import Addon
from dit.training.teachers import FashionMNISTTeacher

__all__ = [
    "REPA",
    "REPAConfig",
    "REPAModel",
    "TEACHERS",
    "TimmTeacher",
    "build_teacher",
    "dit_weights",
    "repa_loss",
    "teacher_tokens",
]


@dataclass
class REPAConfig:
    """``training.repa``: weight 0 = off (REPA's lambda is 0.5)."""

    weight: float = 0.0
    block: int = 8  # align the output of this block (1-based; REPA: 8 of SiT-XL's 28)
    encoder: str = "fashion_mnist_ssl"  # a TEACHERS name, or timm:<model name>
    encoder_weights: str | None = None  # timm encoders: the local weights file (safetensors or a torch state dict)
    encoder_resolution: int = 224  # timm encoders: the images are resized to this (REPA: 224 for DINOv2, 16x16)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # timm encoders: create_model keyword arguments
    projector_dim: int = 2048  # REPA's MLP: D -> 2048 -> 2048 -> encoder dim, SiLU

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def check(self, model, dataset, token_routing=None) -> None:
        """Clear errors before anything is built: the block, latent data, a routed block."""
        if self.weight < 0:
            raise ValueError(f"training.repa.weight={self.weight}: must be >= 0 (0 = off)")
        if not self.enabled:
            return
        if not 1 <= self.block <= len(model.blocks):
            raise ValueError(f"training.repa.block={self.block}: need 1 <= block <= depth ({len(model.blocks)})")
        if not has_images(dataset):
            raise ValueError(
                "training.repa needs the images for its encoder; this dataset holds VAE latents only "
                "(extract them with --pixels: python -m dit.data.extract ... --pixels --pixel-size 224)"
            )
        if token_routing is not None and token_routing.enabled:
            start, end = token_routing.span(len(model.blocks))
            if start <= self.block - 1 < end - 1:
                raise ValueError(
                    f"training.repa.block={self.block} is inside the token-routing span [{start}, {end}): "
                    "its output holds only the routed share of the tokens; align a block before or after it"
                )


class TimmTeacher(nn.Module):
    """A timm encoder (e.g. vit_base_patch14_dinov2) from local weights: images in [-1, 1] -> its patch tokens."""

    def __init__(self, model_name: str, weights: str | Path | None, resolution: int = 224, **kwargs):
        super().__init__()
        import timm  # only for timm encoders: importing timm costs seconds

        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"training.repa.encoder_weights={weights!r}: timm:{model_name} needs its weights as a local file "
                "(nothing is downloaded), e.g. the model.safetensors of the timm/" + model_name + " hub repository"
            )
        self.net = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
        self.net.load_state_dict(_read_state_dict(Path(weights)), strict=True)
        self.net.eval().requires_grad_(False)
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.resolution = resolution
        self.input_shape = (3, resolution, resolution)  # what the network sees (after the resize in forward)
        patch = self.net.patch_embed.patch_size
        self.grid = resolution // (patch[0] if isinstance(patch, tuple) else patch)
        self.dim = self.net.num_features
        self.name = f"timm:{model_name}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        tokens = self.net.forward_features((x - self.mean) / self.std)
        return tokens[:, self.net.num_prefix_tokens :]  # (N, grid^2, dim): the patch tokens


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


# Encoders by name (training.repa.encoder); timm:<name> builds a TimmTeacher. Adding one: a class (with name, grid,
# dim and input_shape, the shape of one image it takes, for the FLOPs count), one entry.
TEACHERS: Registry[nn.Module] = Registry("REPA encoder", [FashionMNISTTeacher])


def build_teacher(repa: REPAConfig, device) -> nn.Module:
    """The frozen encoder training.repa names, on ``device``, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # building it (random init, then its weights) leaves the run's RNG alone
        if repa.encoder.startswith("timm:"):
            kwargs = repa.encoder_kwargs
            teacher = TimmTeacher(repa.encoder[5:], repa.encoder_weights, repa.encoder_resolution, **kwargs)
        else:
            teacher = TEACHERS[repa.encoder]()
    return teacher.to(device).eval().requires_grad_(False)


class REPAModel(nn.Module):
    """The DiT plus REPA's projector, as the module the loop trains (so DDP / FSDP synchronise the projector and
    the checkpoints hold it): ``forward`` is the DiT's, and leaves the projected tokens of block ``repa.block`` in
    ``self.projected`` (N, T, encoder dim) for the loss. The EMA and the export take ``self.dit`` only."""

    def __init__(self, dit: nn.Module, repa: REPAConfig, teacher_dim: int, seed: int = 0):
        super().__init__()
        self.dit = dit
        d = dit.config.hidden_size
        # nn.Linear's default init from a generator of the run's seed: the same projector on every process (FSDP
        # does not broadcast it) and in every run of the seed, whatever the global random state at this point.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hidden = repa.projector_dim
            self.repa_projector = nn.Sequential(
                nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, teacher_dim)
            )
        self._no_split_modules = dit._no_split_modules  # FSDP wraps the DiT's blocks, as without REPA
        self.num_extra = dit.block_cls.num_extra_tokens
        self.projected: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        dit.blocks[repa.block - 1].register_forward_hook(self._keep)

    @property
    def config(self):
        """The DiT's (checkpoints record the DiT's architecture: the projector is training state, not model)."""
        return self.dit.config

    def _keep(self, module, args, output) -> None:
        self._hidden = output

    def flops_per_image(self, teacher: nn.Module) -> float:
        """REPA's FLOPs per training image beside the DiT's: the frozen encoder's forward on one image of its input
        and the projector's forward and backward on the DiT's tokens (its gradient into the DiT adds no matrix
        work: the DiT's backward is counted with the DiT). The projector is counted on the meta device, the encoder
        on one blank image where it is (its autocast guard has no meta device)."""
        tokens = torch.empty(1, self.dit.num_tokens, self.dit.config.hidden_size, device="meta", requires_grad=True)
        device = next(iter(teacher.state_dict().values()), torch.empty(0)).device  # cpu for one with no tensors
        with FlopCounterMode(display=False) as counter:
            copy.deepcopy(self.repa_projector).to("meta")(tokens).sum().backward()
            with torch.no_grad():
                teacher(torch.zeros(1, *teacher.input_shape, device=device))
        return float(counter.get_total_flops())

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.dit(*args, **kwargs)
        if self.training:  # sampling (the grids, FID) uses the EMA's DiT, but keep eval forwards cheap anyway
            self.projected = self.repa_projector(self._hidden[:, self.num_extra :])
        self._hidden = None
        return out


def dit_weights(state_dict: dict) -> dict:
    """The DiT's tensors of a REPAModel state dict, under the DiT's own names (what exports and sampling load)."""
    return {k[len("dit.") :]: v for k, v in state_dict.items() if k.startswith("dit.")}


def teacher_tokens(teacher: nn.Module, images: torch.Tensor, grid: int) -> torch.Tensor:
    """The encoder's patch features of the clean images, resized (bilinear) to the DiT's grid x grid tokens."""
    with torch.no_grad():
        z = teacher(images).float()  # (N, g^2, De)
        g = teacher.grid
        if g != grid:
            z = z.transpose(1, 2).reshape(len(z), -1, g, g)
            z = F.interpolate(z, size=(grid, grid), mode="bilinear", align_corners=False)
            z = z.flatten(2).transpose(1, 2)
    return z


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample -mean over tokens of cos(projected token, encoder token) (REPA's projection loss), (N,)."""
    return -F.cosine_similarity(projected.float(), target, dim=-1).mean(dim=1)


class REPA(Addon):
    """REPA as a training add-on (dit/training/addons/base.py): the DiT trains inside REPAModel, the alignment term
    joins the loss (as REPA's own loss object returns it beside the denoising loss), the encoder's and projector's
    FLOPs join the count, and the export keeps the DiT's weights only."""

    name = "repa"  # training.repa
    terms = ("repa",)

    @classmethod
    def check(cls, settings: REPAConfig, model: nn.Module, dataset, cfg) -> None:
        settings.check(model, dataset, cfg.token_routing)

    def wrap(self, model: nn.Module, device: torch.device, seed: int) -> nn.Module:
        self.teacher = build_teacher(self.settings, device)
        self.model = REPAModel(model, self.settings, self.teacher.dim, seed)
        return self.model

    def inner(self, module: nn.Module) -> nn.Module:
        return module.dit

    def add_losses(self, terms: dict[str, torch.Tensor], images: torch.Tensor | None) -> None:
        """The projected block tokens against the encoder's patch features of the clean images."""
        target = teacher_tokens(self.teacher, images, self.model.config.grid_size)
        terms["repa"] = repa_loss(self.model.projected, target)
        terms["loss"] = terms["loss"] + self.settings.weight * terms["repa"]

    def training_flops(self, model: nn.Module, flops: float) -> float:
        return flops + self.model.flops_per_image(self.teacher)

    def export_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dit_weights(state_dict)  # the projector is training state: the export is the DiT's
