"""The report opens in a real headless Chromium: no failed requests, no console errors, every chart's
lines laid out with a real size, and a screenshot with the series colours in it.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in NUL on file descriptors 3 and 4), so no extra Python package is needed. Without Chromium
(`apt-get install -y chromium` on Debian) the test is skipped, saying so. The screenshot is saved to
$LORAKIT_TEST_ARTIFACTS (default tests/artifacts/) and its path printed.
"""

import base64
import io
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lorakit.config import RunConfig, to_dict
from lorakit.report.html import write_report
from lorakit.report.svg import PALETTE
from lorakit.train.log import MetricsWriter

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y "
                                "chromium), so the HTML report cannot be opened in a real browser here")
ARTIFACTS = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]
TIMEOUT = 60.0  # seconds for any one DevTools answer


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes answers on fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(3, 4), preexec_fn=fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events, self.session = b"", 0, [], None

    def _recv(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the debugging pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self._recv()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def open(self, url: str, width: int = 1200, height: int = 2000) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._recv())

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]

    def failures(self) -> list[str]:
        """Failed requests, console errors and uncaught exceptions seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Network.loadingFailed":
                out.append(f"request failed: {p.get('errorText')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"console: {p['entry']['text']}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def make_run(folder: Path, r: int, quantization) -> None:
    """A finished run folder in the trainer's layout (numbers made up, curves falling then rising)."""
    folder.mkdir(parents=True)
    cfg = to_dict(RunConfig())
    cfg["lora"].update(r=r, alpha=2.0 * r)
    cfg["model"]["quantization"] = quantization
    (folder / "run_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    w, best = MetricsWriter(folder), None
    for step in range(1, 21):
        loss = 2.5 * math.exp(-step / (3 + r / 8)) + (0.05 if quantization else 0.0)
        w.write({"step": step, "loss": loss, "lr": 2e-4 * min(1.0, step / 4), "grad_norm": 1.0,
                 "tokens_per_s": 900.0 + 10 * step, "supervised_tokens": 40})
        if step % 5 == 0:
            val = loss + 0.4 + 0.004 * (step - 10) ** 2 * r / 8
            w.write({"step": step, "val_loss": val, "val_ppl": math.exp(val), "train_loss_mean": loss})
            best = min(best or (val, step), (val, step))
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    w.write({"step": 20, "event": "end", "reason": "completed", "peak_memory_bytes": (200 + r) * 2**20,
             "seconds": 3.0 + r / 8, "best_val_loss": best[0], "best_step": best[1]})
    w.close()
    (folder / "run_info.json").write_text(json.dumps({"trainable_params": 1024 * r,
                                                      "predicted_peak_bytes": (180 + r) * 2**20}))


def test_missing_resource_is_detected(browser, tmp_path):
    """Control: a page that loads a missing image does show a failed request (so the check can fail)."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png" alt=""><p>x</p></body></html>')
    browser.open(page.as_uri())
    assert any("ERR_FILE_NOT_FOUND" in f for f in browser.failures())


def test_sweep_report_renders_in_chromium(browser, tmp_path):
    from PIL import Image

    sweep, names = tmp_path / "sweep", []
    for q in (None, "nf4"):
        for r in (8, 16):
            names.append(f"r{r}-{'qlora' if q else 'lora'}")
            make_run(sweep / names[-1], r, q)
    (sweep / "sweep.json").write_text(json.dumps({
        "runs": [{"name": n, "dir": n} for n in names], "best": "r8-lora", "why": "Best run: r8-lora.",
        "merge_command": "lorakit merge ...", "alpha_ratio": 2.0, "base_config": to_dict(RunConfig())}))
    report = write_report(sweep)
    browser.open(report.as_uri())
    assert browser.failures() == []
    requested = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requested == [report.as_uri()]  # the page needed nothing else
    # the sweep's charts, outside the per-run <details>: 4 + 2 lines, 4 + 2 labelled rows of bars
    drawn = browser.evaluate(
        "[...document.querySelectorAll('body > .charts polyline.series, body > svg rect.bar')]"
        ".map(e => { const b = e.getBoundingClientRect(); return [e.tagName, b.width, b.height]; })")
    lines = [d for d in drawn if d[0] == "polyline"]
    bars = [d for d in drawn if d[0] == "rect"]
    assert len(lines) == len(names) + 2 and all(w > 50 for _, w, _ in lines)
    assert len(bars) == 2 * len(names) and all(w >= 1 and h > 5 for _, w, h in bars)
    assert browser.evaluate("document.querySelector('tr.best td').textContent") == "r8-lora"

    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "sweep_report.png"
    shot.write_bytes(png)
    print(f"screenshot -> {shot}")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (1200, 2000)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 50  # not blank
    for hex_colour in PALETTE[:4]:  # each run's line colour is on screen
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, hex_colour


def test_run_report_renders_in_chromium(browser, tmp_path):
    make_run(tmp_path / "run", 8, "nf4")
    report = write_report(tmp_path / "run")
    browser.open(report.as_uri())
    assert browser.failures() == []
    widths = browser.evaluate("[...document.querySelectorAll('polyline.series')].map(e => e.getBoundingClientRect().width)")
    assert len(widths) == 4 and all(w > 50 for w in widths)  # train + validation loss, learning rate, throughput
    points = browser.evaluate("document.querySelectorAll('circle.point').length")
    assert points == 4  # the four evaluations
