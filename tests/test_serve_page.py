"""The chat page in headless Chromium: type a message, send it, and both panes fill with their model's answer.

The server runs in-process (uvicorn in a thread on 127.0.0.1:<free port>, with an API key the
browser gives as its Basic-auth password) with the tiny model behind both panes: the character
with no system prompt, the base with a persona system prompt. Each pane must show exactly what
the API answers for its own conversation.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SYSTEM_PROMPT = "You are Captain Rook, a gruff but warm pirate captain."  # the tiny model's context is short
MAX_TOKENS = 12
KEY = "page-key"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"headless Chromium is not installed ({CHROMIUM} "
                                "is absent): apt-get install chromium chromium-driver")


@pytest.fixture
def page_server(tiny_model_dir):
    """The app on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    from character_baker.core.config import ModelsConfig
    from character_baker.stages.serving.app import ServeSettings, create_app
    from character_baker.stages.serving.bridge import GenerationBridge
    from character_baker.stages.serving.target import Pane, ServedModel, ServeTarget

    target = ServeTarget(
        models=(ServedModel("pirate", str(tiny_model_dir)), ServedModel("base", str(tiny_model_dir))),
        panes=(Pane("Captain Rook (baked)", "pirate"),
               Pane("base + constitution", "base", SYSTEM_PROMPT)),
        models_config=ModelsConfig(device="cpu"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    settings = ServeSettings(port=port, max_tokens=MAX_TOKENS, api_key=KEY)
    bridge = GenerationBridge.load(target, max_concurrency=2, max_tokens=MAX_TOKENS)
    server = uvicorn.Server(uvicorn.Config(create_app(bridge, target, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver, with a throwaway profile and no background traffic."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def api_answer(url: str, model: str, messages: list[dict]) -> str:
    """What the API answers, greedy, for one pane's conversation."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content


def test_both_panes_answer_the_same_message(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = page_server
    browser.get(url.replace("http://", f"http://reader:{KEY}@") + "/")  # the API key as the Basic-auth password
    wait = WebDriverWait(browser, 90)
    wait.until(lambda driver: driver.find_element(By.ID, "send").is_enabled())
    assert [pane.get_attribute("data-model") for pane in browser.find_elements(By.CSS_SELECTOR, ".pane")] == [
        "pirate", "base"]
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == str(MAX_TOKENS)
    browser.find_element(By.ID, "message").send_keys("Who are you?")
    browser.find_element(By.ID, "send").click()

    def finished(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, ".bubble.assistant")
        settled = all(answer.get_attribute("data-state") in ("done", "error") for answer in answers)
        return answers if len(answers) == 2 and settled else False

    answers = wait.until(finished)
    assert [answer.get_attribute("data-state") for answer in answers] == ["done", "done"], \
        [answer.get_property("textContent") for answer in answers]
    shown = [answer.get_property("textContent") for answer in answers]
    user = {"role": "user", "content": "Who are you?"}
    expected = [api_answer(url, "pirate", [user]),
                api_answer(url, "base", [{"role": "system", "content": SYSTEM_PROMPT}, user])]
    assert all(expected) and shown == expected
    assert browser.find_element(By.ID, "status").text == "ready"
    assert [bubble.text for bubble in browser.find_elements(By.CSS_SELECTOR, ".bubble.user")] == ["Who are you?"] * 2
