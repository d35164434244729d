"""The Scalars tab as a user sees it: a real fit's train and validation curves on one chart, read from the
page TensorBoard renders in headless Chromium (driven through chromedriver's WebDriver HTTP API, so the
standard library is the only client; Debian's `chromium` and `chromium-driver` packages, see .ci/run)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import keras
import numpy as np
from matplotlib import image

import fastcore
from helpers import stop
from test_observability import TensorBoard, free_port

EPOCHS = 6
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# The Scalars tab is Polymer: its run selector and cards live in nested shadow roots, which the page's own
# script walks. Each card's chart is SVG; a run's curve is a `line-plot` path (its unsmoothed twin is a
# `ghost`) stroked in the run's colour, the colour its row in the run selector shows.
READ_PAGE = """
const deep = (root, selector) => {
  const found = [], walk = node => {
    found.push(...node.querySelectorAll(selector));
    node.querySelectorAll('*').forEach(e => e.shadowRoot && walk(e.shadowRoot));
  };
  walk(root); if (root.shadowRoot) walk(root.shadowRoot);
  return found;
};
const text = root => deep(root, '*').filter(e => e.tagName !== 'STYLE')
  .flatMap(e => [...e.childNodes].filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.data.trim()))
  .filter(Boolean).join(' ');
const runs = deep(document, 'tf-multi-checkbox').flatMap(box => deep(box, '.name-row')).map(row => ({
  name: row.querySelector('.item-label-container').textContent.trim(),
  checked: row.querySelector('paper-checkbox').checked,
  color: getComputedStyle(row.querySelector('.isolator')).color}));
const cards = deep(document, 'tf-scalar-card'), heading = card => text(deep(card, 'tf-card-heading')[0]);
const loss = cards.find(card => heading(card).startsWith('epoch_loss'));
if (loss) loss.scrollIntoView();   // in view for the screenshot
return {runs, scale: devicePixelRatio, cards: cards.map(card => ({
  heading: heading(card),
  curves: deep(card, '.line-plot:not(.ghost) path.line').filter(p => p.getAttribute('d')).map(p => ({
    color: getComputedStyle(p).stroke,
    points: p.getAttribute('d').slice(1).split('L').map(xy => xy.split(',').map(Number))})),
  box: card.getBoundingClientRect().toJSON()}))};
"""


class HeadlessChromium:
    """A chromedriver process and one headless Chromium session; close() ends both, whatever happened."""

    def __init__(self, log_path):
        self.port, self.session = free_port(), None
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)   # its own group
        try:
            deadline = time.monotonic() + 30
            while not self._ready():
                assert self.process.poll() is None and time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.2)
            options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                                                    "--window-size=1400,1000", "--hide-scrollbars"]}
            self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            return self.call("GET", "/status")["ready"]
        except OSError:
            return False

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {json.load(e)['value'].get('message')}") from None

    def page(self, path: str, body=None):
        return self.call("POST" if body is not None else "GET", f"/session/{self.session}{path}", body)

    def close(self) -> None:
        if self.session:
            try:
                self.call("DELETE", f"/session/{self.session}")   # Chromium quits
            except (OSError, AssertionError):
                pass
        stop(self.process)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)   # any browser process the driver left in its group
        except ProcessLookupError:
            pass
        self.log.close()


def fit_with_validation(run_dir: str) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    trainer = fastcore.Trainer(model, keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                               mode="graph", preflight=False)
    return trainer.fit(x[64:], y[64:], batch_size=32, epochs=EPOCHS, validation_data=(x[:64], y[:64]),
                       run_dir=run_dir, verbose=False).history


def scalars_tab(browser: HeadlessChromium, port: int, timeout: float = 60) -> dict:
    """The Scalars tab's runs and cards, once the epoch_loss card has drawn a curve per run (or timeout)."""
    browser.page("/url", {"url": f"http://127.0.0.1:{port}/#scalars"})
    deadline = time.monotonic() + timeout
    while True:
        page = browser.page("/execute/sync", {"script": READ_PAGE, "args": []})
        loss = [c for c in page["cards"] if c["heading"].startswith("epoch_loss")]
        if (loss and len(loss[0]["curves"]) >= 2) or time.monotonic() > deadline:
            return page
        time.sleep(0.5)


def rgb(css: str) -> np.ndarray:
    return np.array([int(v) for v in css[css.index("(") + 1:-1].split(",")[:3]]) / 255


def test_the_scalars_tab_draws_train_and_validation_on_one_chart(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, \
        "headless Chromium is missing: apt-get install chromium chromium-driver (Debian), as .ci/run does"
    logdir = tmp_path / "logs"
    # The run first: TensorBoard's start-up would load the CPUs while the run may measure the machine's peak.
    history = fit_with_validation(str(logdir / "run"))
    board = TensorBoard(logdir)
    try:
        board.wait_ready()
        board.poll(lambda: board.get("/data/plugin/scalars/tags"),
                   lambda tags: all("epoch_loss" in tags.get(f"run/{r}", {}) for r in ("train", "validation")))
        browser = HeadlessChromium(tmp_path / "chromedriver.log")
        try:
            page = scalars_tab(browser, board.port)
            shot = tmp_path / "scalars.png"
            shot.write_bytes(base64.b64decode(browser.page("/screenshot")))
        finally:
            browser.close()
    finally:
        board.stop()
    assert len(history) == EPOCHS and all("eval_loss" in epoch for epoch in history)

    # The run selector lists both runs, both shown, in two colours.
    runs = {run["name"]: run for run in page["runs"]}
    assert sorted(runs) == ["run/train", "run/validation"], page["runs"]
    assert all(run["checked"] for run in runs.values())
    train, validation = runs["run/train"]["color"], runs["run/validation"]["color"]
    assert train != validation

    # One epoch_loss card draws a curve per run, in the run's colour, a point per epoch at the same steps.
    cards = {card["heading"].split()[0]: card for card in page["cards"]}
    assert "epoch_loss" in cards and "batch_loss" in cards, [card["heading"] for card in page["cards"]]
    curves = {curve["color"]: curve["points"] for curve in cards["epoch_loss"]["curves"]}
    assert sorted(curves) == sorted([train, validation]), cards["epoch_loss"]["curves"]
    assert len(curves[train]) == len(curves[validation]) == EPOCHS
    assert [x for x, _ in curves[train]] == [x for x, _ in curves[validation]]   # the same steps
    assert [y for _, y in curves[train]] != [y for _, y in curves[validation]]   # two series, not one twice
    assert {curve["color"] for curve in cards["batch_loss"]["curves"]} == {train}   # a train-only tag: one run

    # The screenshot is a real picture, and the card's pixels hold both runs' colours.
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 500 and pixels.std() > 0.05
    box = {side: int(page["scale"] * px) for side, px in cards["epoch_loss"]["box"].items()}
    card = pixels[box["top"]:box["bottom"], box["left"]:box["right"]]
    assert card.size, box
    for color in (train, validation):
        near = (np.abs(card - rgb(color)).max(axis=-1) < 0.06).sum()
        assert near > 100, (color, near)   # a curve of a few hundred pixels, not a stray dot
