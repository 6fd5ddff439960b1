"""Look at a model in a browser: a Gradio page to sample grids from one or two checkpoints side by side.

    python -m dit.demo checkpoint=outputs/fashion_mnist-dit_ti4-adaln_zero/model
    python -m dit.demo checkpoint=[<run>/checkpoints/step_0001000,<run>/model]     # two, side by side
    python -m dit.demo checkpoint=<run>/model guide=@500      # autoguidance by the run's step 500, beside CFG
    python -m dit.demo checkpoint=<...> host=0.0.0.0 port=8080 max_steps=250       # other machines too

Needs the demo extra (pip install -e '.[demo]'). Safe by default, as a server should be: it listens on 127.0.0.1
unless host= says otherwise (and warns when it does); the page picks only among the checkpoints named on the
command line, by label (no path typed into the page is ever opened); the images, steps and guidance of one request
are bounded (max_images, max_steps, cfg_range) and checked by the server function, since an API call can send any
value a slider would not; a refusal names the field, the value and the bound. One request samples at a time, at most
queue_size wait, the next is told at once that the queue is full (tests/test_demo_load.py). Images are sample.py's
for the same checkpoint, classes, per_class, sampler, steps, cfg_scale, guidance (and guide), seed and batch_size
(dit.sampling.generate). guide= (a checkpoint or export, or @STEP of each checkpoint's run) is loaded and checked
against every checkpoint at start; the page then offers autoguidance (Karras et al. 2024) beside classifier-free.

The rooms: config (the command line), logic (checkpoints, requests, grids; no Gradio), page (the Gradio page).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from dit.demo.config import DemoConfig, host_warning, parse_args
from dit.demo.logic import (
    CLASSIFIER_FREE,
    INPUT_GUIDANCE,
    MAX_SEED,
    NONE,
    Checkpoint,
    Demo,
    Request,
    RequestError,
    checkpoint_label,
    evaluations,
)
from dit.demo.page import CSS, build_app, launch

__all__ = [
    "CLASSIFIER_FREE",
    "CSS",
    "INPUT_GUIDANCE",
    "MAX_SEED",
    "NONE",
    "Checkpoint",
    "Demo",
    "DemoConfig",
    "Request",
    "RequestError",
    "build_app",
    "checkpoint_label",
    "evaluations",
    "host_warning",
    "launch",
    "main",
    "parse_args",
]


def main(argv: Sequence[str] | None = None, block: bool = True):
    """python -m dit.demo key=value ...: load the checkpoints (and guides), print where the page is, serve it."""
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
    app = build_app(demo)  # build_app and launch: looked up here, so that a test can stand in for them
    launch(app, config.host, config.port, block=block)
    return app
