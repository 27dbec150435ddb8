"""A real headless Chromium for tests, driven over its own DevTools protocol (a websocket).

Debian's `chromium` (scripts/test.sh installs it) runs in a session of its own
(`start_new_session`), so stopping it kills its whole process group by the
browser's PID: its renderer and GPU helpers go too.  It listens for DevTools on
a port of its own choosing (``--remote-debugging-port=0``) and says which in
``DevToolsActivePort`` in its profile directory, so no fixed port can collide.

:class:`Page` collects what a reviewer would see in the console: console
messages of level error, uncaught exceptions, and browser log entries of level
error (a failed load, a Content-Security-Policy refusal).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
START_DEADLINE = 30.0


class Chromium:
    """One headless browser process; use as ``async with Chromium(profile_dir) as browser``."""

    def __init__(self, profile: Path, log: Path):
        self.profile, self.log = profile, log
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[dict]] = {}          # by sessionId
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        command = [CHROMIUM, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                   "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-dev-shm-usage", "--window-size=1280,1600", "about:blank"]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")      # Chromium refuses to run as root with its sandbox
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            url = await self._devtools_url()
            self.session = aiohttp.ClientSession()
            self.ws = await self.session.ws_connect(url, max_msg_size=64 * 2**20)
            self._reader = asyncio.create_task(self._read())
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _devtools_url(self) -> str:
        active = self.profile / "DevToolsActivePort"
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if active.exists():
                lines = active.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"chromium gave no DevTools port within {START_DEADLINE}s:\n{self.log.read_text()[-3000:]}")

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._events.setdefault(data.get("sessionId", ""), []).append(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30.0) -> dict[str, Any]:
        assert self.ws is not None
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise AssertionError(f"DevTools {method}: {reply['error']}")
        return reply.get("result", {})

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page

    def events(self, session: str) -> list[dict]:
        return self._events.get(session, [])

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            # The browser leads its own process group: this takes its renderers and helpers too.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.proc = None


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    async def send(self, method: str, params: dict | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        seen = len(self.browser.events(self.session))
        reply = await self.send("Page.navigate", {"url": url})
        assert not reply.get("errorText"), f"navigating to {url}: {reply['errorText']}"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(e.get("method") == "Page.loadEventFired" for e in self.browser.events(self.session)[seen:]):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{url} did not load within {timeout}s")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able); a thrown error fails the test."""
        reply = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise AssertionError(f"evaluating {expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        reply = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(reply["data"]))
        return path

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far, as text."""
        errors = []
        for event in self.browser.events(self.session):
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                     for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append("exception: " + str(details.get("exception", {}).get("description")
                                                   or details.get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        return errors
