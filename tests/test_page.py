"""The page at ``/`` in a real headless Chromium: type, pick, click Speak; audio streams, plays,
and the WAV it offers for download is the server's own WAV for the same seed."""

from __future__ import annotations

import base64
import shutil

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_helpers import Server, write_voice  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-page")
    write_model_dir(model, seed=3)
    voice = write_voice(tmp_path_factory.mktemp("voice"))
    srv = Server(model, "--slots", "2", "--voice", f"myvoice={voice}", log=model / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_speak_streams_plays_and_offers_the_wav(server, browser):
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: len(Select(d.find_element(By.ID, "voice")).options) == 2)
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("How are you today?")
    Select(browser.find_element(By.ID, "speaker")).select_by_visible_text("1")
    for field, value in (("seed", "7"), ("maxms", "640"), ("topk", "40")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "speak").click()
    WebDriverWait(browser, 120).until(lambda d: d.execute_script("return window.csm.state") in ("done", "error"))
    state = browser.execute_script("return window.csm")
    assert state["state"] == "done", state
    expected = httpx.post(f"{server.url}/v1/audio/speech", timeout=120, json={
        "input": "How are you today?", "voice": "1", "seed": 7, "max_audio_length_ms": 640, "topk": 40}).content
    samples = (len(expected) - 44) // 2
    assert state["samples"] == samples and state["seed"] == "7" and state["chunks"] >= 1
    # It played: chunks were scheduled on the AudioContext and its clock ran past the start.
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return audioContext.currentTime") > 0.2)
    assert browser.execute_script("return audioContext.state") == "running"
    duration = WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("const a = document.getElementById('player'); "
                                   "return isFinite(a.duration) && a.duration > 0 ? a.duration : null"))
    assert abs(duration - samples / 24_000) < 1e-3
    offered = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => {
            let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s)); });""")
    assert base64.b64decode(offered) == expected
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], a = document.getElementById('player');
        a.play().then(() => setTimeout(() => done(a.currentTime), 400)).catch(e => done(String(e)));""")
    assert isinstance(played, float) and played > 0


def test_bad_input_shows_the_error(server, browser):
    browser.get(server.url + "/")
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "speak").click()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return window.csm.state") == "error")
    assert "empty" in browser.find_element(By.ID, "status").text
