"""The browser chat page (minigpt/assets/chat.html, served at / by `minigpt serve`) in Debian's headless
Chromium through selenium: streaming, Stop, New chat, context use, and the API-key prompt.

Uses only the system browser and driver (/usr/bin/chromium, /usr/bin/chromedriver; Debian packages
chromium and chromium-driver) and never lets selenium download anything; skips when they are missing.
Set MINIGPT_ARTIFACTS to a folder to keep the screenshots.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serving import free_port

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the test extra installs selenium; without it the module skips
    webdriver = None

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CONTEXT = 256

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"),
]


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import minigpt

    d = tmp_path_factory.mktemp("web") / "tiny"
    minigpt.GPT(minigpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=CONTEXT)).save_pretrained(d)
    return d


@pytest.fixture
def start_server(model_dir, tmp_path):
    """start_server(*flags) -> base URL of a `minigpt serve` on a free port, up and healthy."""
    procs = []

    def start(*flags: str) -> str:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "w+b")
        cmd = [sys.executable, "-m", "minigpt", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch", "2", *flags]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"minigpt serve exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                if _get(url + "/health")[0] == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail("minigpt serve did not answer GET /health with 200 within 60 s")

    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium manager must never fetch a browser or driver
        opts = Options()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=420,900", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    # headless windows are at least 500 px wide: emulate a phone-sized viewport instead
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": True})
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    d = Path(os.environ.get("MINIGPT_ARTIFACTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait(driver, cond, timeout: float = 20, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(), message=what)


def _el(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css)


def _count(driver, css) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, css))


def _set(driver, css, value):
    el = _el(driver, css)
    el.clear()
    el.send_keys(value)


def _open_settings(driver):
    if not _el(driver, "#settings").get_attribute("open"):
        _el(driver, "#settings summary").click()


def _stream_state(driver):
    """(last assistant text or None, stop enabled) in one round trip."""
    return driver.execute_script(
        "const a = document.querySelectorAll('#messages .msg.assistant');"
        "return [a.length ? a[a.length - 1].textContent : null, !document.getElementById('stop').disabled];")


def _reply_done(driver):
    return _el(driver, "#send").is_enabled() and not _el(driver, "#stop").is_enabled()


def test_chat_streams_stops_and_starts_over(start_server, browser, artifacts):
    url = start_server()
    model = json.loads(_get(url + "/v1/models")[1])["data"][0]
    browser.get(url + "/")
    _wait(browser, lambda: _el(browser, "#model-name").text == model["id"], what="model id in the header")
    assert f"/ {model['context_length']}" in _el(browser, "#context-use").text
    assert browser.execute_script("return [innerWidth, document.documentElement.scrollWidth]") == [420, 420]

    _open_settings(browser)
    _set(browser, "#temperature", "1")
    _set(browser, "#max-tokens", "200")
    _el(browser, "#input").send_keys("Hello there", Keys.ENTER)
    _wait(browser, lambda: _count(browser, "#messages .msg.user") == 1, what="the user bubble")
    assert _el(browser, "#input").get_attribute("value") == ""

    seen = []  # non-empty assistant texts observed, each longer than the last
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        text, streaming = _stream_state(browser)
        if text and (not seen or len(text) > len(seen[-1])):
            seen.append(text)
        if not streaming and seen:
            break
        time.sleep(0.01)
    assert len(seen) >= 2 and seen[-1].startswith(seen[0]), f"reply did not grow while streaming: {seen}"
    _el(browser, "#stop").click()
    _wait(browser, lambda: _reply_done(browser), what="stop disabled, send enabled after Stop")
    bubble = _el(browser, "#messages .msg.assistant")
    partial = bubble.get_attribute("textContent")
    assert partial.startswith(seen[-1])
    if "stopped" in bubble.get_attribute("class"):  # aborted mid-stream: nothing more arrives
        time.sleep(0.5)
        assert bubble.get_attribute("textContent") == partial
    else:  # the whole reply had already arrived
        assert bubble.get_attribute("data-finish") in ("stop", "length")
    assert _count(browser, "#messages .msg.error") == 0

    _el(browser, "#new-chat").click()
    assert _count(browser, "#messages > *") == 0

    _set(browser, "#max-tokens", "12")
    _el(browser, "#input").send_keys("Second question", Keys.ENTER)
    _wait(browser, lambda: _count(browser, "#messages .msg.assistant") == 1 and _reply_done(browser),
          what="the second reply to finish")
    assert _count(browser, "#messages .msg.user") == 1 and _count(browser, "#messages .msg.error") == 0
    assert _el(browser, "#messages .msg.assistant").get_attribute("data-finish") in ("stop", "length")
    m = re.fullmatch(r"context (\d+) / (\d+)", _el(browser, "#context-use").text)
    assert m and 0 < int(m[1]) <= int(m[2]) == model["context_length"], _el(browser, "#context-use").text
    browser.save_screenshot(str(artifacts / "chat.png"))


def test_chat_asks_for_the_api_key(start_server, browser, artifacts):
    url = start_server("--api-key", "secret")
    browser.get(url + "/")
    key = _el(browser, "#api-key")
    _wait(browser, lambda: _count(browser, "#messages .msg.error") > 0, what="an error for the missing key")
    error = _el(browser, "#messages .msg.error").get_attribute("textContent")
    assert "key" in error.lower() and key.is_displayed()
    assert browser.switch_to.active_element == key

    _set(browser, "#max-tokens", "8")
    _el(browser, "#input").send_keys("Hi", Keys.ENTER)  # refused too, kept for a retry once the key is in
    _wait(browser, lambda: _count(browser, "#messages .msg.error") > 1, what="a second 401")
    key.send_keys("secret", Keys.ENTER)
    _wait(browser, lambda: _count(browser, "#messages .msg.assistant") == 1 and _reply_done(browser),
          what="the retried request to finish")
    assert _el(browser, "#messages .msg.assistant").get_attribute("textContent")
    assert _count(browser, "#messages .msg.user") == 1
    assert _el(browser, "#model-name").text not in ("", "not connected")
    assert re.fullmatch(r"context \d+ / \d+", _el(browser, "#context-use").text)
    assert browser.execute_script("return sessionStorage.getItem('minigpt-api-key')") == "secret"
    browser.save_screenshot(str(artifacts / "chat-api-key.png"))
