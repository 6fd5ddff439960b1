"""Look at a model in a browser: a Gradio page to sample grids from one or two checkpoints side by side.

    python -m dit.demo checkpoint=outputs/fashion_mnist-dit_ti4-adaln_zero/model
    python -m dit.demo checkpoint=[<run>/checkpoints/step_0001000,<run>/model]     # two, side by side
    python -m dit.demo checkpoint=<...> host=0.0.0.0 port=8080 max_steps=250       # other machines too

Needs the demo extra (pip install -e '.[demo]'). Safe by default, as a server should be: it listens on 127.0.0.1
unless host= says otherwise (and warns when it does); the page picks only among the checkpoints named on the
command line, by label (no path typed into the page is ever opened); the images, steps and guidance of one request
are bounded (max_images, max_steps, cfg_range) and checked by the server function, since an API call can send any
value a slider would not; a refusal names the field, the value and the bound. One request samples at a time, at most
queue_size wait, the next is told at once that the queue is full (tests/test_demo_load.py). Images are sample.py's
for the same checkpoint, classes, per_class, sampler, steps, cfg_scale, seed and batch_size (dit.sampling.generate).
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf

from dit.diffusion import SAMPLERS, SamplingSettings, build_sampler
from dit.hub import load_model, objective_of
from dit.sampling import GenerationSpec, generate, grid_array, load_vae, make_labels, resolve_classes

__all__ = [
    "Checkpoint",
    "Demo",
    "DemoConfig",
    "Request",
    "RequestError",
    "build_app",
    "checkpoint_label",
    "host_warning",
    "main",
]

NONE = "(none)"  # the second panel's choice for "only one grid"
MAX_SEED = 2**32 - 1


@dataclass
class DemoConfig:
    """python -m dit.demo's settings (key=value on the command line, as sample.py's). The bounds hold for one
    request, so that one page (or one API call) cannot keep the machine busy for minutes."""

    checkpoint: Any = MISSING  # one path, or a list [A,B,...]: what sample.py takes (export, step_*, .pt, diffusers)
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 = every interface (a warning says so)
    port: int = 7860
    use_ema: bool = True  # our checkpoints: EMA weights (false: raw weights)
    vae: str | None = None  # latent models: diffusers AutoencoderKL hub id or local path (default: from checkpoint)
    device: str = "auto"  # auto = cuda when there is one, else cpu
    batch_size: int = 64  # as sample.py's default, so the same seed gives sample.py's images
    max_images: int = 16  # per checkpoint and request (classes x per_class)
    max_steps: int = 100  # sampling steps per request
    cfg_range: list[float] = field(default_factory=lambda: [1.0, 10.0])  # [lo, hi] of cfg_scale
    queue_size: int = 16  # requests that may wait for the model; the next is told "Queue is full" (memory stays put)
    # what the page shows first
    steps: int = 25
    cfg_scale: float = 4.0
    per_class: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, (str, Path)):
            self.checkpoint = [self.checkpoint]
        if self.checkpoint is MISSING or not self.checkpoint:
            raise ValueError("checkpoint=<path> (or checkpoint=[A,B] for two side by side) is required")
        self.checkpoint = [str(c) for c in self.checkpoint]
        lo, hi = (float(v) for v in self.cfg_range)
        if not 0 <= lo <= hi:
            raise ValueError(f"cfg_range={[lo, hi]}: need 0 <= lo <= hi")
        self.cfg_range = [lo, hi]
        for key in ("max_images", "max_steps", "queue_size", "batch_size", "per_class", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: need at least 1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: need 1..65535")
        # the page's first values lie within the bounds
        self.steps = min(self.steps, self.max_steps)
        self.per_class = min(self.per_class, self.max_images)
        self.cfg_scale = min(max(self.cfg_scale, lo), hi)


def parse_args(argv: Sequence[str]) -> DemoConfig:
    """key=value arguments (checkpoint=A or checkpoint=[A,B], host=, port=, max_steps=, ...) -> DemoConfig."""
    cli = OmegaConf.from_cli(list(argv))
    schema = OmegaConf.structured(DemoConfig(checkpoint=["-"]))
    unknown = sorted(set(cli) - set(schema))
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)}; valid keys: {', '.join(schema)}")
    if "checkpoint" not in cli:
        raise ValueError("checkpoint=<path> (or checkpoint=[A,B] for two side by side) is required")
    merged = OmegaConf.merge(schema, cli)
    values = OmegaConf.to_container(merged, resolve=True)
    return DemoConfig(**values)


def host_warning(host: str) -> str | None:
    """A warning for a host other than loopback: the page is then open to whoever can reach this machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (
        f"warning: host={host}: the demo listens beyond this machine; anyone who can reach this port can "
        "sample from the loaded checkpoints (no authentication). host=127.0.0.1 (the default) keeps it local."
    )


def checkpoint_label(path: str | Path) -> str:
    """What the page calls a checkpoint: its run directory and step, never the path itself.
    <run>/checkpoints/step_0001000 -> "<run> step 1000", <run>/model -> "<run> export", else the file's name."""
    p = Path(path).resolve() if Path(path).exists() else Path(path)
    if p.name.startswith("step_") and p.parent.name == "checkpoints" and p.name[5:].isdigit():
        return f"{p.parent.parent.name} step {int(p.name[5:])}"
    if p.name == "model" and p.is_dir():
        return f"{p.parent.name} export"
    return p.stem if p.is_file() else p.name


class RequestError(ValueError):
    """A request the demo refuses (out of bounds, unknown choice, a bad setting): shown in the page as a message."""


@dataclass(frozen=True)
class Request:
    """What one Generate asks of every panel, as the page (or any API call) sends it: Demo.check checks it."""

    classes: Sequence[str]  # class names, one grid row each
    per_class: float  # images per class (Gradio sends numbers as floats: 4.0 is 4)
    steps: float
    cfg_scale: float
    seed: float


@dataclass
class Checkpoint:
    """One loaded model, what the page calls it and what it can be sampled with."""

    label: str
    model: torch.nn.Module
    meta: dict
    vae: Any = None

    @cached_property
    def objective(self):
        return objective_of(self.meta)

    @cached_property
    def samplers(self) -> list[str]:
        """The samplers valid for its objective, its default first."""
        obj = self.objective
        names = sorted(n for n, c in SAMPLERS.items() if obj.name in c.objectives)
        return [obj.default_sampler] + [n for n in names if n != obj.default_sampler]

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(i) for i in range(self.model.num_classes)]


class Demo:
    """The page's logic without the page: checkpoints by label, requests checked against the bounds, grids."""

    def __init__(self, checkpoints: Sequence[Checkpoint], config: DemoConfig, device: torch.device | str = "cpu"):
        self.config, self.device = config, torch.device(device)
        self.checkpoints: dict[str, Checkpoint] = {}
        for ckpt in checkpoints:
            label, n = ckpt.label, 2
            while label in self.checkpoints or label == NONE:
                label, n = f"{ckpt.label} ({n})", n + 1
            ckpt.label = label
            self.checkpoints[label] = ckpt

    @classmethod
    def load(cls, config: DemoConfig) -> Demo:
        """Load every checkpoint named in config (once, at start: a bad path fails here, not in the page)."""
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = []
        for path in config.checkpoint:
            model, meta = load_model(path, use_ema=config.use_ema)
            vae = load_vae(config.vae or meta["vae"], device) if meta.get("latent") else None
            loaded.append(Checkpoint(checkpoint_label(path), model.to(device).eval(), meta, vae))
        return cls(loaded, config, device)

    @property
    def labels(self) -> list[str]:
        return list(self.checkpoints)

    @property
    def class_names(self) -> list[str]:
        """The class choices of the page: the first checkpoint's (another must know the same names)."""
        return next(iter(self.checkpoints.values())).class_names

    def check(self, label: str, sampler: str, request: Request) -> tuple[Checkpoint, SamplingSettings, list[int]]:
        """The request's values, checked as the page's controls would and more (an API call can send anything: a
        string, NaN, a value beyond a slider) -> what to sample: the checkpoint, the settings, the class ids.
        Every refusal names the field, the value and the bound."""
        c = self.config
        if not isinstance(label, str) or label not in self.checkpoints:
            raise RequestError(f"unknown checkpoint {label!r}; choose one of: {', '.join(self.checkpoints)}")
        ckpt = self.checkpoints[label]
        if not isinstance(sampler, str) or sampler not in ckpt.samplers:
            raise RequestError(
                f"sampler {sampler!r} cannot sample {label} ({ckpt.objective.name} objective); "
                f"valid: {', '.join(ckpt.samplers)}"
            )
        classes = request.classes
        listed = isinstance(classes, Sequence) and not isinstance(classes, str)
        if not listed or not all(isinstance(name, str) for name in classes):
            raise RequestError(f"classes {classes!r}: need a list of class names")
        if not classes:
            raise RequestError("choose at least one class")
        per_class = _integer("per class", request.per_class, 1, c.max_images)
        steps = _integer("steps", request.steps, 1, c.max_steps)
        _integer("seed", request.seed, 0, MAX_SEED)
        n = len(classes) * per_class
        if n > c.max_images:
            raise RequestError(
                f"{len(classes)} classes x {per_class} per class = {n} images: at most {c.max_images} a request"
            )
        cfg_scale, (lo, hi) = request.cfg_scale, c.cfg_range
        number = isinstance(cfg_scale, Real) and not isinstance(cfg_scale, bool) and math.isfinite(cfg_scale)
        if not number or not lo <= cfg_scale <= hi:  # NaN compares False with any bound: asked to be finite first
            raise RequestError(f"guidance scale {cfg_scale!r}: need a number from {lo} to {hi}")
        try:
            ids = resolve_classes(list(classes), ckpt.meta.get("class_names"), ckpt.model.num_classes)
        except ValueError as e:  # e.g. a class name this checkpoint lacks
            names = ckpt.class_names
            valid = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            raise RequestError(f"{label}: {e}; classes: {valid}") from None
        try:
            settings = SamplingSettings(sampler=sampler, steps=steps, cfg_scale=float(cfg_scale))
        except (ValueError, KeyError) as e:
            raise RequestError(str(e)) from None
        return ckpt, settings, ids

    def grid(
        self, label: str, sampler: str, request: Request, on_eval: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """One grid (H, W, 3) uint8, one row per class, per_class images in each: sample.py's grid.png for the
        same settings. on_eval(model evaluations so far) after each evaluation, for a progress bar."""
        ckpt, settings, ids = self.check(label, sampler, request)
        per_class, seed = int(request.per_class), int(request.seed)
        try:
            spec = GenerationSpec(make_labels(ids, per_class, None, seed), self.config.batch_size, seed)
            counting = None if on_eval is None else _counting(on_eval)
            built_sampler = build_sampler(ckpt.objective, settings)
            batches = generate(ckpt.model, built_sampler, spec, vae=ckpt.vae, device=self.device, on_eval=counting)
            images = torch.cat([images for _, images in batches])
        except ValueError as e:  # e.g. guidance on a model without a null class
            raise RequestError(f"{label}: {e}") from None
        return grid_array(images, nrow=per_class)

    def grids(self, panels: Sequence[tuple[str, str]], request: Request, progress: Callable) -> list[np.ndarray]:
        """The grid of every (checkpoint label, sampler) panel, all checked before any sampling starts.
        progress((evaluations done, of total), desc=, unit=): one bar over every panel (Gradio's gr.Progress)."""
        for label, sampler in panels:
            self.check(label, sampler, request)
        n = len(request.classes) * int(request.per_class)
        batches = -(-n // self.config.batch_size)  # of each panel
        total = sum(evaluations(int(request.steps), sampler) * batches for _, sampler in panels)
        grids, before = [], 0
        for label, sampler in panels:
            report = lambda k, label=label, before=before: progress(
                (min(before + k, total), total), desc=f"sampling {label}", unit="model evaluations"
            )
            progress((before, total), desc=f"sampling {label}", unit="model evaluations")
            grids.append(self.grid(label, sampler, request, on_eval=report))
            before += evaluations(int(request.steps), sampler) * batches
        return grids


def evaluations(steps: int, sampler: str) -> int:
    """The model evaluations of one batch, as a progress bar's total: one a step, Heun two (an estimate: the bar
    is clamped to it)."""
    return steps * (2 if sampler == "heun" else 1)


def _integer(name: str, value, lo: int, hi: int) -> int:
    """A whole number from lo to hi, from the page or an API call (Gradio sends sliders' and numbers' values as
    floats: 4.0 is 4; 4.5, NaN, infinity, a string or None are refused, with the bounds)."""
    whole = isinstance(value, Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not lo <= value <= hi:
        raise RequestError(f"{name} {value!r}: need a whole number from {lo} to {hi}")
    return int(value)


def _counting(report: Callable[[int], None]) -> Callable[[int, int], None]:
    """generate()'s on_eval(batch start, evaluations in the batch) -> report(evaluations over all batches)."""
    done, last = 0, {}

    def on_eval(start: int, n: int) -> None:
        nonlocal done
        done += n - last.get(start, 0)
        last[start] = n
        report(done)

    return on_eval


# ---------------------------------------------------------------------------------------------------------------
# The page (Gradio, imported only here: the demo extra)
# ---------------------------------------------------------------------------------------------------------------

# the grids fill their boxes, small images scaled up stay sharp
CSS = "#grid-0 img, #grid-1 img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def build_app(demo: Demo):
    """The Gradio Blocks of the page: one or two panels (checkpoint + sampler each), shared classes, images per
    class, steps, guidance and seed, one Generate button, one grid per panel."""
    import gradio as gr  # the demo extra (pip install -e '.[demo]'): optional, and seconds to import

    c = demo.config
    labels, names = demo.labels, demo.class_names

    def sampler_choices(label: str):
        if label not in demo.checkpoints:
            return gr.Dropdown(choices=[], value=None, interactive=False)
        samplers = demo.checkpoints[label].samplers
        return gr.Dropdown(choices=samplers, value=samplers[0], interactive=True)

    system_fonts = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    theme = gr.themes.Default(**system_fonts)  # the page loads no web fonts (it works offline)
    with gr.Blocks(title="dit demo", analytics_enabled=False) as app:
        app.dit_launch = dict(theme=theme, css=CSS)  # launch() takes theme and css in Gradio 6
        gr.Markdown("### dit: sample a grid (one row per class)")
        # The generate endpoint takes the inputs' values in the order they are created here (Gradio sorts a set of
        # inputs by creation): the panels' checkpoint and sampler, then classes, per class, steps, guidance, seed.
        with gr.Row():
            with gr.Column():
                first = demo.checkpoints[labels[0]].samplers
                ckpt_a = gr.Dropdown(labels, value=labels[0], label="checkpoint", elem_id="checkpoint-0")
                sampler_a = gr.Dropdown(first, value=first[0], label="sampler", elem_id="sampler-0")
            with gr.Column(visible=len(labels) > 1):
                second = labels[1] if len(labels) > 1 else NONE
                ckpt_b = gr.Dropdown([NONE, *labels], value=second, label="second checkpoint", elem_id="checkpoint-1")
                first_b = demo.checkpoints[second].samplers if second in demo.checkpoints else []
                sampler_b = gr.Dropdown(
                    first_b, value=first_b[0] if first_b else None, label="sampler", elem_id="sampler-1"
                )
        classes = gr.Dropdown(
            names,
            value=names[: min(len(names), c.max_images // c.per_class, 4)],
            multiselect=True,
            label=f"classes (one row each; at most {c.max_images} images in all)",
            elem_id="classes",
        )
        with gr.Row():
            per_class = gr.Slider(1, c.max_images, value=c.per_class, step=1, label="per class", elem_id="per-class")
            steps = gr.Slider(1, c.max_steps, value=c.steps, step=1, label="steps", elem_id="steps")
            cfg_scale = gr.Slider(
                *c.cfg_range, value=c.cfg_scale, step=0.1, label="guidance scale (1 = none)", elem_id="cfg"
            )
            seed = gr.Number(value=c.seed, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            image = dict(type="numpy", format="png", interactive=False, height=480)
            grid_a = gr.Image(label="grid", elem_id="grid-0", **image)
            grid_b = gr.Image(label="second grid", elem_id="grid-1", visible=len(labels) > 1, **image)
        ckpt_a.change(sampler_choices, ckpt_a, sampler_a, api_visibility="private")
        ckpt_b.change(sampler_choices, ckpt_b, sampler_b, api_visibility="private")
        tracked = gr.Progress()  # Gradio passes a request's progress bar to the parameter whose default it is

        def run(values: dict, progress=tracked):  # values: {input component: its value}
            panels = [(values[ckpt_a], values[sampler_a])]
            panels += [] if values[ckpt_b] in (None, NONE) else [(values[ckpt_b], values[sampler_b])]
            request = Request(*(values[x] for x in (classes, per_class, steps, cfg_scale, seed)))
            try:
                grids = demo.grids(panels, request, progress)
            except RequestError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return grids[0], (grids[1] if len(grids) > 1 else None)

        inputs = {ckpt_a, sampler_a, ckpt_b, sampler_b, classes, per_class, steps, cfg_scale, seed}
        # One model on one device: requests wait in the queue, queue_size at most (the next is refused at once).
        # preprocess=False: the values reach run() as sent, and Demo.check alone judges them (Gradio's checks would
        # refuse some with messages that name no field, e.g. "Could not preprocess input component at index 8").
        button.click(run, inputs, [grid_a, grid_b], api_name="generate", concurrency_limit=1, preprocess=False)
    app.queue(max_size=c.queue_size, default_concurrency_limit=1)
    return app


def launch(app, host: str, port: int, block: bool = True):
    """Serve the page on host:port (never a share link; no analytics; no server-side rendering process)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        footer_links=[],
        **getattr(app, "dit_launch", {}),
    )


def main(argv: Sequence[str] | None = None, block: bool = True):
    """python -m dit.demo key=value ...: load the checkpoints, print where the page is, serve it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    try:
        import gradio  # noqa: F401  (the optional demo extra: said before the checkpoints load)
    except ImportError:
        raise SystemExit("error: the demo needs Gradio: pip install -e '.[demo]'") from None
    try:
        config = parse_args(argv)
        demo = Demo.load(config)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if warning := host_warning(config.host):
        print(warning, file=sys.stderr)
    print(f"dit demo: {', '.join(demo.labels)} at http://{config.host}:{config.port}/", flush=True)
    app = build_app(demo)
    launch(app, config.host, config.port, block=block)
    return app


if __name__ == "__main__":
    main()
