"""The web chat page at / in a real headless Chromium on a live server: the reply streams into
the page, the conversation's history goes back with the next message, and Stop cancels the
request on the server (no request left, every KV block free)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from server_fixture import LiveServer

from strata import LLM

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The machines have no network; without these Chromium stalls on its own background requests.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server",
                  "--window-size=1200,800"]
# Records each chat request's JSON body, and every length the last reply's text takes on (a
# MutationObserver sees each update, however fast the tokens come).
SPY = """
window.__sent = [];
window.__lengths = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (String(url).includes('/chat/completions')) {
    window.__sent.push(JSON.parse(init.body));
    window.__lengths = [];
  }
  return realFetch(url, init);
};
new MutationObserver(() => {
  const replies = document.querySelectorAll('#messages .msg.assistant');
  const n = replies.length ? replies[replies.length - 1].textContent.length : 0;
  const seen = window.__lengths;
  if (n && seen[seen.length - 1] !== n) seen.push(n);
}).observe(document.getElementById('thread'), {childList: true, subtree: true, characterData: true});
"""
LAST_REPLY = "const r = document.querySelectorAll('#messages .msg.assistant'); " \
             "return r.length ? r[r.length - 1].textContent : null;"
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
           "`apt-get install chromium chromium-driver`, or `bash scripts/setup.sh --test`")


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="64MiB", max_model_len=512))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def set_field(driver, element_id: str, value) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", el)


def streaming(driver) -> bool:
    return driver.find_element("id", "stop").is_enabled()


def lengths(driver) -> list[int]:
    return driver.execute_script("return window.__lengths")


def test_page_streams_and_stop_aborts(server, driver):
    assert "text/html" in httpx.get(server.base_url + "/").headers["content-type"]
    driver.get(server.base_url + "/")
    wait_for(lambda: driver.find_element("id", "model-name").text == "smollm2", 10, "the model name")
    driver.execute_script(SPY)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 200)
    prompt = driver.find_element("id", "prompt")

    # Shift+Enter is a newline, not a send.
    prompt.send_keys("What is the capital", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "of France?")
    assert prompt.get_attribute("value") == "What is the capital\nof France?"
    assert driver.execute_script("return window.__sent.length") == 0
    driver.find_element("id", "send").click()
    assert streaming(driver) and not driver.find_element("id", "send").is_enabled()

    # The reply grows in place while the request runs, then the page is ready again.
    wait_for(lambda: not streaming(driver), 30, "the first reply to finish")
    first, seen = driver.execute_script(LAST_REPLY), lengths(driver)
    assert first.strip() and len(seen) >= 2 and seen == sorted(seen) and seen[-1] == len(first), seen
    sent = driver.execute_script("return window.__sent")
    assert sent[0]["stream"] is True and sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 200
    assert sent[0]["messages"] == [{"role": "user", "content": "What is the capital\nof France?"}]
    assert server.wait_idle()

    # A long answer, sent with Enter, with the history; Stop it once it streams.
    prompt.send_keys("Now write a long story about a dragon who learns to fly.", Keys.ENTER)
    wait_for(lambda: len(lengths(driver)) >= 2 and streaming(driver), 30, "the second reply to stream")
    if out := os.environ.get("STRATA_PAGE_SCREENSHOT"):   # e.g. /tmp/page.png, to look at the page
        driver.save_screenshot(out)
    driver.find_element("id", "stop").click()
    wait_for(lambda: not streaming(driver), 5, "the page to leave the streaming state")
    stopped = driver.execute_script(LAST_REPLY)
    time.sleep(1.0)
    assert driver.execute_script(LAST_REPLY) == stopped, "text kept growing after Stop"
    meta = driver.execute_script("return document.querySelector('#thread .row:last-child .meta').textContent")
    assert stopped and meta == "stopped"   # aborted mid-stream, not finished
    assert server.wait_idle(timeout=10), "the server kept the stopped request or its KV blocks"
    sent = driver.execute_script("return window.__sent")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == first
    assert driver.find_element("id", "send").is_enabled()


def test_page_shows_openai_error_message(server, driver):
    driver.get(server.base_url + "/")
    set_field(driver, "max-tokens", 100000)
    prompt = driver.find_element("id", "prompt")
    prompt.send_keys("Hello", Keys.ENTER)
    error = wait_for(lambda: driver.find_elements("css selector", "#messages .msg.error"), 10, "an error bubble")
    assert "maximum context length is 512 tokens" in error[0].text
    assert prompt.get_attribute("value") == "Hello"   # given back to retry
    assert not driver.find_elements("css selector", "#messages .msg.assistant")
    assert server.wait_idle()
