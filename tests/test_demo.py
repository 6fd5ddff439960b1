"""python -m dit.demo: the page's logic (bounds, checkpoints by label only, images = sample.py's), the Gradio server
function and its API, autoguidance (guide=), and the page itself in headless Debian Chromium (Selenium), on tiny
pixel models."""

import os
import re
import shutil
import socket
from dataclasses import replace
from io import BytesIO

import numpy as np
import pytest
from conftest import compose_config
from helpers.tiny import randomize, tiny_dit
from PIL import Image

import sample
from dit import demo as dit_demo
from dit.data.class_names import FASHION_MNIST_CLASSES
from dit.demo import (
    CLASSIFIER_FREE,
    INPUT_GUIDANCE,
    NONE,
    Demo,
    DemoConfig,
    Request,
    RequestError,
    checkpoint_label,
    host_warning,
    parse_args,
)
from dit.diffusion import build_objective
from dit.hub import ModelRecord, save_export

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: nothing phones home
os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never looks for (or downloads) a driver
try:
    import gradio as gr
except ImportError:
    gr = None
needs_gradio = pytest.mark.skipif(gr is None, reason="gradio not installed (the demo extra: pip install -e '.[demo]')")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two pixel models with Fashion-MNIST's class names: a flow export <runA>/model and a DDPM training-checkpoint
    -like directory <runB>/checkpoints/step_0001000."""
    root = tmp_path_factory.mktemp("runs")
    data = dict(class_names=FASHION_MNIST_CLASSES, latent=False)
    flow = randomize(tiny_dit(in_channels=1), seed=0)
    save_export(root / "runA" / "model", flow, ModelRecord(build_objective("flow").settings(), data), ema=flow)
    ddpm = randomize(tiny_dit(in_channels=1, learn_sigma=True), seed=1)
    save_export(root / "runB" / "checkpoints" / "step_0001000", ddpm, ModelRecord(data=data), ema=ddpm)
    return root / "runA" / "model", root / "runB" / "checkpoints" / "step_0001000"


@pytest.fixture(scope="module")
def demo(runs):
    return Demo.load(DemoConfig(checkpoint=[str(p) for p in runs], device="cpu", max_images=16, max_steps=8, steps=4))


@pytest.fixture(scope="module")
def guided(runs):
    """runA's export with guide=@500: a weaker flow model (patch 8 instead of 4) saved as runA's step-500 checkpoint;
    and an export with 3 classes, which guides nothing here."""
    flow = ModelRecord(build_objective("flow").settings(), dict(class_names=FASHION_MNIST_CLASSES, latent=False))
    weak = randomize(tiny_dit(in_channels=1, patch_size=8), seed=2)
    save_export(runs[0].parent / "checkpoints" / "step_0000500", weak, flow, ema=weak)
    other = runs[0].parent.parent / "other" / "model"
    save_export(other, tiny_dit(in_channels=1, num_classes=3), ModelRecord(build_objective("flow").settings()))
    config = DemoConfig(checkpoint=str(runs[0]), device="cpu", max_images=16, max_steps=8, steps=4, guide="@500")
    return Demo.load(config), other


AUTO = "autoguidance (guide: runA step 500)"  # the guided fixture's choice


GOOD = dict(sampler="euler", classes=["Sneaker", "Bag"], per_class=2, steps=3, cfg_scale=2.0, seed=0)


def asked(**values) -> tuple[str, Request]:
    """(sampler, request) of GOOD with values changed: a panel's sampler and what the page asks of every panel."""
    values = GOOD | values
    return values.pop("sampler"), Request(**values)


def test_cli_defaults_are_safe():
    config = parse_args(["checkpoint=a"])
    assert config.host == "127.0.0.1" and config.checkpoint == ["a"]
    assert (config.max_images, config.max_steps, config.cfg_range, config.queue_size) == (16, 100, [1.0, 10.0], 16)
    assert parse_args(["checkpoint=a", "queue_size=3"]).queue_size == 3
    with pytest.raises(ValueError, match="queue_size=0: need at least 1"):
        parse_args(["checkpoint=a", "queue_size=0"])
    assert parse_args(["checkpoint=[a,b]", "port=8000"]).checkpoint == ["a", "b"]
    with pytest.raises(ValueError, match="unknown key hots"):
        parse_args(["checkpoint=a", "hots=0.0.0.0"])
    with pytest.raises(ValueError, match="checkpoint=<path>"):
        parse_args(["host=127.0.0.1"])
    for host in ("127.0.0.1", "localhost", "::1"):
        assert host_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "myhost"):
        assert "warning: host=" + host in host_warning(host)


def test_labels_name_runs_not_paths(runs, tmp_path):
    assert [checkpoint_label(p) for p in runs] == ["runA export", "runB step 1000"]
    (tmp_path / "DiT-XL-2-256x256.pt").touch()
    assert checkpoint_label(tmp_path / "DiT-XL-2-256x256.pt") == "DiT-XL-2-256x256"
    loaded = [c for _ in range(2) for c in Demo.load(DemoConfig(str(runs[0]), device="cpu")).checkpoints.values()]
    assert Demo(loaded, DemoConfig("x")).labels == ["runA export", "runA export (2)"]  # the same run given twice


def test_only_the_given_checkpoints(demo, runs):
    assert demo.labels == ["runA export", "runB step 1000"]
    for typed in (str(runs[0]), "/etc/passwd", "../runA/model", NONE):  # a path (even a given one's) is no label
        with pytest.raises(RequestError, match="unknown checkpoint"):
            demo.check(typed, *asked())


def test_samplers_of_each_objective(demo):
    flow, ddpm = demo.checkpoints.values()
    assert flow.samplers == ["euler", "dpmpp", "euler_maruyama", "heun"]
    assert ddpm.samplers == ["ddpm", "ddim", "dpmpp", "unipc"]
    with pytest.raises(RequestError, match="sampler 'ddim' cannot sample runA export"):
        demo.check("runA export", *asked(sampler="ddim"))


def test_a_meanflow_model_is_offered_its_one_call_sampler_first(tmp_path):
    """A few-step model (issue 48): the demo offers its own sampler first (then the flow samplers it also takes at
    interval 0, never DDPM's), and one step is one evaluation, the grid sample.py's."""
    data = dict(class_names=FASHION_MNIST_CLASSES, latent=False)
    model = randomize(tiny_dit(in_channels=1, interval_input=True), seed=4)
    path = tmp_path / "mf" / "model"
    save_export(path, model, ModelRecord(build_objective("meanflow").settings(), data), ema=model)
    demo = Demo.load(DemoConfig(checkpoint=str(path), device="cpu", max_images=16, max_steps=8, steps=1))
    (ckpt,) = demo.checkpoints.values()
    assert ckpt.samplers[0] == "meanflow" and {"euler", "heun"} <= set(ckpt.samplers) and "ddpm" not in ckpt.samplers
    evaluations = []
    request = replace(asked(steps=1, seed=3)[1])
    grid = demo.grid("mf export", "meanflow", request, on_eval=evaluations.append)
    settings = dict(classes="[Sneaker,Bag]", per_class=2, steps=1, cfg_scale=2.0, seed=3, sampler="meanflow")
    out = sample.run(compose_config("sample", [f"{k}={v}" for k, v in (dict(checkpoint=path, out_dir=tmp_path / "s")
                                                                         | settings).items()]))  # fmt: skip
    np.testing.assert_array_equal(grid, np.array(Image.open(out / "grid.png")))
    assert evaluations == [1]
    assert list(demo.guidances) == [CLASSIFIER_FREE]  # no guidance input: classifier-free only


def test_a_model_with_a_guidance_input_is_offered_it_guided_in_one_call(tmp_path):
    """A MeanFlow model trained with a guidance input (iMF's): the page offers its own guidance, one evaluation a step
    at the scale asked, the grid sample.py's with guidance=input."""
    data = dict(class_names=FASHION_MNIST_CLASSES, latent=False)
    model = randomize(tiny_dit(in_channels=1, interval_input=True, guidance_input=True), seed=5)
    path = tmp_path / "mf" / "model"
    record = ModelRecord(build_objective("meanflow", guidance_input=True).settings(), data)
    save_export(path, model, record, ema=model)
    demo = Demo.load(DemoConfig(checkpoint=str(path), device="cpu", max_images=16, max_steps=8, steps=1))
    assert list(demo.guidances) == [CLASSIFIER_FREE, INPUT_GUIDANCE]
    evaluations = []
    request = replace(asked(steps=1, seed=3, cfg_scale=3.0, guidance=INPUT_GUIDANCE)[1])
    grid = demo.grid("mf export", "meanflow", request, on_eval=evaluations.append)
    settings = dict(classes="[Sneaker,Bag]", per_class=2, steps=1, cfg_scale=3.0, seed=3, sampler="meanflow",
                    guidance="input")  # fmt: skip
    out = sample.run(compose_config("sample", [f"{k}={v}" for k, v in (dict(checkpoint=path, out_dir=tmp_path / "s")
                                                                         | settings).items()]))  # fmt: skip
    np.testing.assert_array_equal(grid, np.array(Image.open(out / "grid.png")))
    assert evaluations == [1]
    unguided = demo.grid("mf export", "meanflow", replace(request, cfg_scale=1.0))
    assert not np.array_equal(grid, unguided)  # the scale reaches the model


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(classes=["Sneaker", "Bag", "Coat"], per_class=6), "18 images: at most 16"),
        (dict(per_class=0), "per class 0: need a whole number from 1 to 16"),
        (dict(per_class=2.5), "per class 2.5: need a whole number from 1 to 16"),
        (dict(steps=9), "steps 9: need a whole number from 1 to 8"),
        (dict(steps=0), "steps 0: need a whole number from 1 to 8"),
        (dict(steps=10_000), "steps 10000: need a whole number from 1 to 8"),
        (dict(steps=float("nan")), "steps nan: need a whole number from 1 to 8"),
        (dict(steps=float("inf")), "steps inf: need a whole number from 1 to 8"),
        (dict(steps="3"), "steps '3': need a whole number from 1 to 8"),
        (dict(steps=None), "steps None: need a whole number from 1 to 8"),
        (dict(steps=True), "steps True: need a whole number from 1 to 8"),
        (dict(cfg_scale=10.5), "guidance scale 10.5: need a number from 1.0 to 10.0"),
        (dict(cfg_scale=0.5), "guidance scale 0.5: need a number from 1.0 to 10.0"),
        (dict(cfg_scale=float("nan")), "guidance scale nan: need a number from 1.0 to 10.0"),
        (dict(cfg_scale=float("-inf")), "guidance scale -inf: need a number from 1.0 to 10.0"),
        (dict(cfg_scale="2.0"), "guidance scale '2.0': need a number from 1.0 to 10.0"),
        (dict(seed=-1), "seed -1: need a whole number from 0 to 4294967295"),
        (dict(seed=float("nan")), "seed nan: need a whole number from 0"),
        (dict(classes=[]), "choose at least one class"),
        (dict(classes="Sneaker"), "classes 'Sneaker': need a list of class names"),
        (dict(classes=[3]), r"classes \[3\]: need a list of class names"),
        (dict(classes=["Sneakers"]), "unknown class name 'Sneakers'; close names: 'Sneaker'; classes: T-shirt/top,"),
    ],
)
def test_bounds_are_enforced(demo, bad, message):
    with pytest.raises(RequestError, match=message):
        demo.grid("runA export", *asked(**bad))


def test_grid_is_sample_py_grid(demo, runs, tmp_path):
    """The same settings and seed give sample.py's grid.png, pixel for pixel; progress counts every evaluation."""
    evaluations = []
    for label, path, sampler in (("runA export", runs[0], "euler"), ("runB step 1000", runs[1], "ddim")):
        grid = demo.grid(label, *asked(sampler=sampler, seed=3), on_eval=evaluations.append)
        settings = dict(classes="[Sneaker,Bag]", per_class=2, steps=3, cfg_scale=2.0, seed=3, sampler=sampler)
        overrides = dict(checkpoint=path, out_dir=tmp_path / label) | settings
        out = sample.run(compose_config("sample", [f"{k}={v}" for k, v in overrides.items()]))
        np.testing.assert_array_equal(grid, np.array(Image.open(out / "grid.png")))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3) and evaluations == [1, 2, 3] * 2
    with pytest.raises(RequestError, match="unknown class name 'Sneakers'; close names: 'Sneaker'"):
        demo.grid("runA export", *asked(classes=["Sneakers"]))


def server_function(app):
    """The generate endpoint's function, called with its inputs' values in the endpoint's order (the page gives
    Gradio its inputs as a set: the function gets them as one {component: value} dict)."""
    (fn,) = [f for f in app.fns.values() if f.api_name == "generate"]
    return lambda *values, **kw: fn.fn(dict(zip(fn.inputs, values)), **kw)


@needs_gradio
def test_server_function_two_grids_and_messages(demo):
    run = server_function(dit_demo.build_app(demo))
    args = [["Sneaker"], 2, 3, 1.0, 0, CLASSIFIER_FREE]
    shown = []  # what the page's progress bar is told: (evaluations done, of total), per model evaluation
    a, b = run("runA export", "euler", "runB step 1000", "ddpm", *args, progress=lambda p, **kw: shown.append(p))
    assert shown == [(0, 6), (1, 6), (2, 6), (3, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    assert a.shape == b.shape == (18 + 2, 2 * 18 + 2, 3) and not np.array_equal(a, b)
    a_only, none = run("runA export", "euler", NONE, None, *args)
    assert none is None and np.array_equal(a_only, a)
    for bad, message in (
        (
            ("runA export", "euler", NONE, None, ["Sneaker"], 2, 500, 1.0, 0, CLASSIFIER_FREE),
            "steps 500: need a whole number from 1 to 8",
        ),
        (("runA export", "euler", "/etc/passwd", "ddpm", *args), "unknown checkpoint '/etc/passwd'"),
        (
            ("runA export", "euler", NONE, None, ["Sneaker"], 2, 3, 99.0, 0, CLASSIFIER_FREE),
            "guidance scale 99.0: need",
        ),
        (
            ("runA export", "euler", NONE, None, *args[:-1], AUTO),
            re.escape(f"unknown guidance '{AUTO}'; choose one of: classifier-free"),
        ),
        (("runA export", "euler", ["runB step 1000"], "ddpm", *args), r"unknown checkpoint \['runB step 1000'\]"),
    ):
        with pytest.raises(gr.Error, match=message):
            run(*bad)


@needs_gradio
def test_main_listens_on_loopback_unless_told(runs, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(dit_demo, "launch", lambda app, host, port, block: launched.append((host, port)))
    dit_demo.main([f"checkpoint={runs[0]}", "device=cpu"], block=False)
    assert launched[-1] == ("127.0.0.1", 7860) and "warning" not in capsys.readouterr().err
    dit_demo.main([f"checkpoint={runs[0]}", "device=cpu", "host=0.0.0.0", "port=9000"], block=False)
    assert launched[-1] == ("0.0.0.0", 9000) and "warning: host=0.0.0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: checkpoint not found"):
        dit_demo.main(["checkpoint=/no/such/run/model"], block=False)


# ---------------------------------------------------------------------------------------------------------------
# Autoguidance (guide=): offered beside classifier-free guidance, sample.py's images, a bad guide refused at start
# ---------------------------------------------------------------------------------------------------------------


def test_autoguided_grid_is_sample_py_grid(guided, runs, tmp_path):
    """guide=@500 offers autoguidance; its grid differs from classifier-free guidance's and is sample.py's grid.png
    with guidance=auto and the same guide (dit.sampling.load_guide + generate)."""
    demo, _ = guided
    assert list(demo.guidances) == [CLASSIFIER_FREE, AUTO]
    sampler, request = asked(seed=3)
    cfg, auto = (demo.grid("runA export", sampler, replace(request, guidance=g)) for g in demo.guidances)
    assert not np.array_equal(auto, cfg)
    settings = dict(classes="[Sneaker,Bag]", per_class=2, steps=3, cfg_scale=2.0, seed=3, sampler=sampler)
    overrides = dict(checkpoint=runs[0], out_dir=tmp_path, guidance="auto", guide="@500") | settings
    out = sample.run(compose_config("sample", [f"{k}={v}" for k, v in overrides.items()]))
    np.testing.assert_array_equal(auto, np.array(Image.open(out / "grid.png")))
    for unknown in ("auto", "pag", None, [AUTO]):
        with pytest.raises(RequestError, match=r"^unknown guidance .*; choose one of: classifier-free, autoguidance"):
            demo.check("runA export", sampler, replace(request, guidance=unknown))


@needs_gradio
def test_page_offers_the_guide_and_refuses_unknown_guidances(guided, demo):
    """The guidance choice is shown with a guide only; through the server function autoguidance gives the grid of
    Demo.grid, an unknown guidance a clear message (as every other refused value)."""
    with_guide, _ = guided
    for page, shown in ((with_guide, [CLASSIFIER_FREE, AUTO]), (demo, [CLASSIFIER_FREE])):
        app = dit_demo.build_app(page)
        (radio,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "guidance"]
        assert [value for _, value in radio.choices] == shown and radio.visible == (len(shown) > 1)
    run = server_function(dit_demo.build_app(with_guide))
    args = ["runA export", "euler", NONE, None, ["Sneaker"], 1, 2, 2.0, 0]
    grid, none = run(*args, AUTO)
    assert none is None
    np.testing.assert_array_equal(
        grid, with_guide.grid("runA export", "euler", Request(["Sneaker"], 1, 2, 2.0, 0, AUTO))
    )
    with pytest.raises(
        gr.Error, match=re.escape(f"unknown guidance 'autoguidance'; choose one of: classifier-free, {AUTO}")
    ):
        run(*args, "autoguidance")


@needs_gradio
def test_a_guide_that_does_not_fit_is_refused_at_start(guided, runs):
    _, other = guided
    assert parse_args(["checkpoint=a", "guide=@500"]).guide == "@500"  # as typed (YAML would refuse a leading @)
    for guide, message in (
        (other, r"^error: guide for runA export: guide \S+ cannot guide this model: num_classes: guide 3 vs model 10"),
        ("@250", r"^error: guide for runA export: guide=@250: no checkpoint \S+; the run has step_0000500$"),
        ("/no/such/guide", r"^error: guide for runA export: checkpoint not found: /no/such/guide$"),
    ):
        with pytest.raises(SystemExit, match=message) as refused:
            dit_demo.main([f"checkpoint={runs[0]}", "device=cpu", f"guide={guide}"], block=False)
        assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """The demo served on a free port of 127.0.0.1 (as main() serves it), in this process."""
    if gr is None:
        pytest.skip("gradio not installed (the demo extra: pip install -e '.[demo]')")
    config = DemoConfig(checkpoint=[str(runs[0])], device="cpu", port=free_port(), steps=4, per_class=2, max_steps=8)
    demo = Demo.load(config)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # the images it serves
        app = dit_demo.build_app(demo)
        dit_demo.launch(app, config.host, config.port, block=False)
        yield demo, f"http://127.0.0.1:{config.port}"
        app.close()


def api_call(url: str, data: list) -> tuple[str, str]:
    """POST to the generate endpoint as any HTTP client can (no slider in the way) -> (event, data)."""
    import requests

    event_id = requests.post(f"{url}/gradio_api/call/generate", json={"data": data}, timeout=30).json()["event_id"]
    lines = requests.get(f"{url}/gradio_api/call/generate/{event_id}", timeout=60).text.strip().splitlines()
    return lines[0].removeprefix("event: "), lines[1].removeprefix("data: ")


def test_server_binds_loopback_and_api_is_bounded(server):
    import psutil

    demo, url = server
    port = int(url.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening == ["127.0.0.1"]
    good = ["runA export", "euler", NONE, None, ["Sneaker"], 2, 4, 2.0, 0, CLASSIFIER_FREE]
    assert api_call(url, good)[0] == "complete"
    # the server function judges every value as sent (Gradio's own checks are off: their messages name no field)
    for changes, message in (
        ({0: "/etc/passwd"}, "unknown checkpoint '/etc/passwd'; choose one of: runA export"),
        ({6: 500}, "steps 500: need a whole number from 1 to 8"),
        ({7: 50.0}, "guidance scale 50.0: need a number from 1.0 to 10.0"),
        ({8: None}, "seed None: need a whole number from 0 to 4294967295"),
        ({4: ["Sneaker", "Bag"], 5: 16}, "2 classes x 16 per class = 32 images: at most 16 a request"),
        ({4: []}, "choose at least one class"),
        ({9: "pag"}, "unknown guidance 'pag'; choose one of: classifier-free"),
    ):
        event, data = api_call(url, [changes.get(i, v) for i, v in enumerate(good)])
        assert event == "error" and message in data and "Traceback" not in data, data


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (make setup installs them where apt is available)",
)
def test_page_in_headless_chromium(server):
    """Load the page, add a class, press Generate, read the grid back from the page: its size and its pixels."""
    import requests

    pytest.importorskip("selenium", reason="selenium not installed (the demo extra: pip install -e '.[demo]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    demo, url = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: the tests run as root here
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#classes input")))
        box.click()
        box.send_keys("Sneaker")
        box.send_keys(Keys.ENTER)
        box.send_keys(Keys.ESCAPE)
        wait.until(lambda d: "Sneaker" in d.find_element(By.ID, "classes").text)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#grid-0 img")))
        src = wait.until(lambda d: img.get_attribute("src") if "file=" in (img.get_attribute("src") or "") else None)
        page = np.array(Image.open(BytesIO(requests.get(src, timeout=30).content)).convert("RGB"))
    finally:
        driver.quit()
    classes = [*FASHION_MNIST_CLASSES[:4], "Sneaker"]  # the page's first 4 classes, and the one added
    assert page.shape == (5 * 18 + 2, 2 * 18 + 2, 3)  # 5 rows of 2 images of 16x16, 2-pixel padding
    np.testing.assert_array_equal(page, demo.grid("runA export", "euler", Request(classes, 2, 4, 4.0, 0)))
