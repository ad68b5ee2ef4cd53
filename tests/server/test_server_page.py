"""The chat page at / in a real headless Chromium: a typed message gets a streamed reply."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from candle_phi import Phi3Generator
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serving import EVENT_TIMEOUT_S, Served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# CI installs Debian's chromium and chromium-driver and sets this, so that there a missing
# browser fails instead of skipping.
REQUIRED = os.environ.get("CANDLE_PHI_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or DRIVER is None:
        if REQUIRED:
            pytest.fail("chromium and chromedriver are needed: apt install chromium-driver")
        pytest.skip("no chromium/chromedriver (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_a_typed_message_gets_a_streamed_reply(served: Served, browser: webdriver.Chrome) -> None:
    gen: Phi3Generator = served.generator
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    # The page sends temperature from its field; 0 makes the reply the greedy one.
    stream = gen.chat(messages, max_tokens=None, temperature=0, repeat_penalty=1.0)  # type: ignore[arg-type]
    expected = stream.read()
    browser.get(served.url + "/")
    assert "candle-phi" in browser.title
    browser.find_element(By.ID, "system").send_keys("Be brief.")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "input").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, EVENT_TIMEOUT_S)
    # While it streams, the stop button is live; the reply's text grows in place.
    wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))
    replies = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
    assert [r.text for r in replies] == [expected.strip()]
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "Hello there"
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")


def test_stop_ends_a_reply_and_keeps_what_was_shown(
    served_slow: Served, browser: webdriver.Chrome
) -> None:
    before, steps = served_slow.generator.active_streams, served_slow.generator.pass_counts[1]
    browser.get(served_slow.url + "/")
    browser.find_element(By.ID, "input").send_keys("Tell me a long story")
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, EVENT_TIMEOUT_S)
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    wait.until(lambda b: len(reply.text) > 0)  # text has streamed in
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text == "stopped")
    served_slow.wait_idle()  # the server cancelled the generation: the page left
    assert reply.text
    assert served_slow.generator.active_streams == before
    # Not stopped, the reply would have filled the 4096-token context.
    assert served_slow.generator.pass_counts[1] - steps < 2000
