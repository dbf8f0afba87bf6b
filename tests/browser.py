"""Open an HTML file in a real headless Chromium and report what a reader would hit.

Chromium is driven through the DevTools protocol over its debugging *pipe* (`--remote-debugging-pipe`:
NUL-separated JSON on file descriptors 3 and 4), so no websocket library and no open port is needed.
Reported as errors: `console.error`/`console.assert` calls, uncaught exceptions, JavaScript dialogs
(alert, confirm, prompt: dismissed at once, so a page that opens one cannot hang the check), and the
browser's own error log (resources that fail to load, blocked requests). The page is screenshotted in
full, and the elements it holds are counted by tag (so a test can tell markup from data that shows as
text from markup that became elements).

In CI (`SPINE_FL_REQUIRE_BROWSER=1`, set by .ci/run) a missing Chromium fails the tests; elsewhere
they are skipped with a message saying how to install it.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRE_ENV = "SPINE_FL_REQUIRE_BROWSER"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-extensions", "--disable-sync", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    """The browser binary: $SPINE_FL_CHROMIUM, else the first of BROWSERS on PATH."""
    explicit = os.environ.get("SPINE_FL_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def require_chromium() -> str:
    """The browser, or a skip (a failure when SPINE_FL_REQUIRE_BROWSER is set, as in CI)."""
    binary = find_chromium()
    if binary is None:
        message = ("no headless Chromium found (looked for " + ", ".join(BROWSERS) + "); install it with "
                   "`apt-get install chromium` or set SPINE_FL_CHROMIUM")
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{message}; {REQUIRE_ENV} is set, so the browser checks must run", pytrace=False)
        pytest.skip(message)
    return binary


PAGE_FACTS = ("JSON.stringify({url: location.href, ready: document.readyState, text: document.body.innerText, "
              "images: [...document.images].map(i => i.naturalWidth), "
              "image_sources: [...document.images].map(i => i.getAttribute('src')), "
              "tags: [...document.querySelectorAll('*')].reduce((n, e) => "
              "(n[e.localName] = (n[e.localName] || 0) + 1, n), {}), "
              "handlers: [...document.querySelectorAll('*')].flatMap(e => [...e.attributes]"
              ".filter(a => a.name.startsWith('on')).map(a => e.localName + '[' + a.name + ']')), "
              "overflow: document.documentElement.scrollWidth - window.innerWidth})")


@dataclass
class PageCheck:
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    screenshot: Path  # the whole page, as PNG
    text: str  # what a reader sees (document.body.innerText)
    image_widths: list[int]  # decoded width of every <img>; 0 = broken image
    overflow_px: int  # how far the page is wider than the window (> 0: a reader must scroll sideways)
    messages: list[str] = field(default_factory=list)  # every console message, for diagnostics
    tags: dict[str, int] = field(default_factory=dict)  # how many elements of each tag the page holds
    handlers: list[str] = field(default_factory=list)  # event-handler attributes, as "img[onerror]"
    image_sources: list[str] = field(default_factory=list)  # every <img>'s src attribute


class DevToolsPipe:
    """One Chromium process and the DevTools protocol over its pipe."""

    def __init__(self, binary: str, profile_dir: str, stderr_path: Path):
        self._stderr = stderr_path.open("wb")
        # fd 3 = commands to the browser (our stdin pipe), fd 4 = replies and events (our stdout pipe)
        command = ['exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2', binary, *CHROMIUM_FLAGS,
                   f"--user-data-dir={profile_dir}", "about:blank"]
        self.process = subprocess.Popen(["sh", "-c", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, start_new_session=True)
        self._next_id = 0
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while chunk := self.process.stdout.read1(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                self._inbox.put(json.loads(raw))
        self._inbox.put(None)  # the browser closed the pipe

    def _receive(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if message is None:
            raise RuntimeError(f"Chromium exited (status {self.process.poll()}); see {self._stderr.name}")
        return message

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next_id += 1
        request: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = session
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\0")
        self.process.stdin.flush()
        return request["id"]

    def _keep(self, event: dict[str, Any]) -> None:
        """Keep an event; a JavaScript dialog is dismissed at once (else the page would wait for a click)."""
        self.events.append(event)
        if event.get("method") == "Page.javascriptDialogOpening":
            self._send("Page.handleJavaScriptDialog", {"accept": False}, event.get("sessionId"))

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send a command and wait for its reply; events that arrive meanwhile are kept in `events`."""
        request_id = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._keep(message)

    def wait_for(self, method: str, since: int = 0, timeout: float = 30.0) -> None:
        """Wait for an event `method` among the events from index `since` on."""
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events[since:]):
            self._keep(self._receive(deadline))

    def drain(self, seconds: float) -> None:
        """Collect the events of the next `seconds` (late console messages, failed loads)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._keep(self._receive(deadline))
            except TimeoutError:
                return

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except (RuntimeError, TimeoutError, OSError):
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)  # our own session: the browser and its helpers
                    self.process.wait(timeout=10)
        finally:
            self._stderr.close()


def _console_text(event: dict[str, Any]) -> str:
    params = event["params"]
    if event["method"] == "Runtime.consoleAPICalled":
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        return f"console.{params['type']}: {args}"
    if event["method"] == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        return f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}"
    if event["method"] == "Page.javascriptDialogOpening":
        return f"javascript dialog ({params['type']}): {params['message']}"
    entry = params["entry"]
    return f"{entry['source']} {entry['level']}: {entry['text']} {entry.get('url', '')}".strip()


def _is_error(event: dict[str, Any]) -> bool:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled":
        return params.get("type") in ("error", "assert")
    if method == "Log.entryAdded":
        return params["entry"].get("level") == "error"
    return method in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")


def check_page(html_file: Path, screenshot: Path, width: int = 1200, timeout: float = 60.0) -> PageCheck:
    """Load `html_file` in headless Chromium; return its console errors and a full-page screenshot."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="spine-fl-chromium-") as profile:
        browser = DevToolsPipe(binary, profile, screenshot.with_suffix(".chromium.log"))
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session)
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            url = Path(html_file).resolve().as_uri()
            before = len(browser.events)  # about:blank may report its own load late
            browser.call("Page.navigate", {"url": url}, session=session)
            browser.wait_for("Page.loadEventFired", since=before, timeout=timeout)
            browser.drain(0.5)
            facts = json.loads(browser.call("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True},
                                            session=session)["result"]["value"])
            if facts["url"] != url or facts["ready"] != "complete":
                raise RuntimeError(f"Chromium shows {facts['url']} ({facts['ready']}), not the loaded {url}")
            size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = browser.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000), "scale": 1}},
                session=session, timeout=timeout)
        finally:
            browser.close()
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    console = [e for e in browser.events if e.get("method") in
               ("Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded", "Page.javascriptDialogOpening")]
    return PageCheck([_console_text(e) for e in console if _is_error(e)], screenshot, facts["text"],
                     facts["images"], facts["overflow"], [_console_text(e) for e in console], facts["tags"],
                     facts["handlers"], facts["image_sources"])


def ink_fraction(png: Path) -> float:
    """Share of pixels that differ from the page's background (its most common colour)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int32)
    packed = pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    background = np.array([values[counts.argmax()] >> s & 255 for s in (16, 8, 0)])
    return float(np.any(np.abs(pixels - background) > 16, axis=1).mean())
