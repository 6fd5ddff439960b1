"""The page (Gradio, imported only inside these functions: the demo extra) and its server."""

from __future__ import annotations

import os

from dit.demo.logic import CLASSIFIER_FREE, MAX_SEED, NONE, Demo, Request, RequestError

__all__ = ["CSS", "build_app", "launch"]

# the grids fill their boxes, small images scaled up stay sharp
CSS = "#grid-0 img, #grid-1 img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def build_app(demo: Demo):
    """The Gradio Blocks of the page: one or two panels (checkpoint + sampler each), shared classes, images per
    class, steps, guidance scale, seed and guidance (shown when there is a guide), one Generate button, one grid per
    panel."""
    import gradio as gr  # the demo extra (pip install -e '.[demo]'): optional, and seconds to import

    system_fonts = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    theme = gr.themes.Default(**system_fonts)  # the page loads no web fonts (it works offline)
    with gr.Blocks(title="dit demo", analytics_enabled=False) as app:
        app.dit_launch = dict(theme=theme, css=CSS)  # launch() takes theme and css in Gradio 6
        gr.Markdown("### dit: sample a grid (one row per class)")
        # The generate endpoint takes the inputs' values in the order they are created here (Gradio sorts a set of
        # inputs by creation): the panels' checkpoint and sampler, then Request's fields in their order (classes,
        # per class, steps, guidance scale, seed, guidance: the last added last, so older API calls keep indices).
        panels = _panels(gr, demo)
        shared = _shared_controls(gr, demo)
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            image = dict(type="numpy", format="png", interactive=False, height=480)
            grid_a = gr.Image(label="grid", elem_id="grid-0", **image)
            grid_b = gr.Image(label="second grid", elem_id="grid-1", visible=len(demo.labels) > 1, **image)
        tracked = gr.Progress()  # Gradio passes a request's progress bar to the parameter whose default it is

        def run(values: dict, progress=tracked):  # values: {input component: its value}
            (ckpt_a, sampler_a), (ckpt_b, sampler_b) = panels
            chosen = [(values[ckpt_a], values[sampler_a])]
            chosen += [] if values[ckpt_b] in (None, NONE) else [(values[ckpt_b], values[sampler_b])]
            request = Request(*(values[x] for x in shared))
            try:
                grids = demo.grids(chosen, request, progress)
            except RequestError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return grids[0], (grids[1] if len(grids) > 1 else None)

        inputs = {*panels[0], *panels[1], *shared}
        # One model on one device: requests wait in the queue, queue_size at most (the next is refused at once).
        # preprocess=False: the values reach run() as sent, and Demo.check alone judges them (Gradio's checks would
        # refuse some with messages that name no field, e.g. "Could not preprocess input component at index 8").
        button.click(run, inputs, [grid_a, grid_b], api_name="generate", concurrency_limit=1, preprocess=False)
    app.queue(max_size=demo.config.queue_size, default_concurrency_limit=1)
    return app


def _panels(gr, demo: Demo) -> list[tuple]:
    """The two panels' (checkpoint, sampler) dropdowns; the second shown when there are two checkpoints, (none) to
    leave it out. A checkpoint's choice changes its sampler's choices."""
    labels = demo.labels

    def sampler_choices(label: str):
        if label not in demo.checkpoints:
            return gr.Dropdown(choices=[], value=None, interactive=False)
        samplers = demo.checkpoints[label].samplers
        return gr.Dropdown(choices=samplers, value=samplers[0], interactive=True)

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
    ckpt_a.change(sampler_choices, ckpt_a, sampler_a, api_visibility="private")
    ckpt_b.change(sampler_choices, ckpt_b, sampler_b, api_visibility="private")
    return [(ckpt_a, sampler_a), (ckpt_b, sampler_b)]


def _shared_controls(gr, demo: Demo) -> list:
    """What every panel samples with, one control per Request field, in its order. The guidance choice is shown only
    when there is more than classifier-free guidance to choose (python -m dit.demo guide=...)."""
    c, names = demo.config, demo.class_names
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
    choices = list(demo.guidances)
    guidance = gr.Radio(choices, value=CLASSIFIER_FREE, label="guidance", visible=len(choices) > 1, elem_id="guidance")
    return [classes, per_class, steps, cfg_scale, seed, guidance]


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
