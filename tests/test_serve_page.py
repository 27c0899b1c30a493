"""The chat page in headless Chromium: pick a character, send a message, and both panes fill with their answers.

The server runs in-process (uvicorn in a thread on 127.0.0.1:<free port>, with an API key the
browser gives as its Basic-auth password) serving two characters (two persona adapters on one
tiny Llama) and the base. Each character's left pane has no system prompt; its right pane is the
base with that character's system prompt. Each pane must show exactly what the API answers for
its own conversation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_kit import app_in_thread, make_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHARACTERS = {"pirate": "You are Captain Rook, a gruff but warm pirate captain.",  # short: a tiny model's context
              "sarcastic": "You are Dry Wit, who answers everything with sarcasm."}
MAX_TOKENS = 12
KEY = "page-key"

# Both are needed: a machine with the browser but not its driver skips too, saying which is absent.
BROWSER_MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
NEEDS_BROWSER = pytest.mark.skipif(bool(BROWSER_MISSING), reason=f"needs headless Chromium and chromedriver "
                                   f"({', '.join(BROWSER_MISSING)} absent): apt-get install chromium chromium-driver")
pytestmark = NEEDS_BROWSER


@pytest.fixture
def page_server(tiny_model_dir, tmp_path):
    """The app serving two characters and the base on a free loopback port in a thread; yields its URL."""
    from character_baker.core.config import ModelsConfig
    from character_baker.stages.serving.app import ServeSettings, create_app
    from character_baker.stages.serving.bridge import GenerationBridge
    from character_baker.stages.serving.target import Character, Pane, ServedModel, ServeTarget

    adapters = {name: make_run(tmp_path / "runs", tiny_model_dir, name, seed=seed) / "adapters" / "persona"
                for seed, name in enumerate(CHARACTERS)}
    target = ServeTarget(
        models=(*(ServedModel(name, str(tiny_model_dir), adapters[name]) for name in CHARACTERS),
                ServedModel("base", str(tiny_model_dir))),
        characters=tuple(Character(Pane(f"{name} (baked)", name), Pane("base + constitution", "base", prompt))
                         for name, prompt in CHARACTERS.items()),
        models_config=ModelsConfig(device="cpu"))
    bridge = GenerationBridge.load(target, max_concurrency=4, max_queue=8, max_tokens=MAX_TOKENS)
    try:
        with app_in_thread(create_app(bridge, target, ServeSettings(max_tokens=MAX_TOKENS, api_key=KEY))) as url:
            yield url
    finally:
        bridge.close()


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


def open_page(browser, url: str):
    """Load the page with the API key as the Basic-auth password; wait until it can send."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url.replace("http://", f"http://reader:{KEY}@") + "/")
    wait = WebDriverWait(browser, 90)
    wait.until(lambda driver: driver.find_element(By.ID, "send").is_enabled())
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    return wait


def send_and_read(browser, wait, message: str) -> list[str]:
    """Send `message` and return the text of the answers once every pane has settled."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "message").send_keys(message)
    browser.find_element(By.ID, "send").click()

    def finished(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, ".bubble.assistant")
        settled = all(answer.get_attribute("data-state") in ("done", "error") for answer in answers)
        return answers if len(answers) == 2 and settled else False

    answers = wait.until(finished)
    assert [answer.get_attribute("data-state") for answer in answers] == ["done", "done"], \
        [answer.get_property("textContent") for answer in answers]
    return [answer.get_property("textContent") for answer in answers]


def pane_models(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [pane.get_attribute("data-model") for pane in browser.find_elements(By.CSS_SELECTOR, ".pane")]


def expected_answers(url: str, character: str, message: str) -> list[str]:
    user = {"role": "user", "content": message}
    return [api_answer(url, character, [user]),
            api_answer(url, "base", [{"role": "system", "content": CHARACTERS[character]}, user])]


def test_both_panes_answer_the_same_message(page_server, browser):
    from selenium.webdriver.common.by import By

    url = page_server
    wait = open_page(browser, url)
    assert pane_models(browser) == ["pirate", "base"]
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == str(MAX_TOKENS)
    shown = send_and_read(browser, wait, "Who are you?")
    expected = expected_answers(url, "pirate", "Who are you?")
    assert all(expected) and shown == expected
    assert browser.find_element(By.ID, "status").text == "ready"
    assert [bubble.text for bubble in browser.find_elements(By.CSS_SELECTOR, ".bubble.user")] == ["Who are you?"] * 2


def test_the_picker_switches_both_panes_to_another_character(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = page_server
    wait = open_page(browser, url)
    picker = browser.find_element(By.ID, "character")
    assert picker.is_displayed()
    assert [option.text for option in Select(picker).options] == list(CHARACTERS)
    Select(picker).select_by_visible_text("sarcastic")
    assert pane_models(browser) == ["sarcastic", "base"]
    prompts = browser.find_elements(By.CSS_SELECTOR, ".pane pre")
    assert [pre.get_property("textContent") for pre in prompts] == [CHARACTERS["sarcastic"]]
    shown = send_and_read(browser, wait, "Who are you?")
    expected = expected_answers(url, "sarcastic", "Who are you?")
    assert all(expected) and shown == expected
    assert shown[0] != api_answer(url, "pirate", [{"role": "user", "content": "Who are you?"}])
