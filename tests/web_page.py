"""Driving the chat page the way a person does, by what they see: labelled fields, named
buttons, the messages' roles (tests/test_web.py).  Also the one headless Chromium those
tests share: Debian's browser and its ChromeDriver, both paths given, so nothing (Selenium
Manager included) downloads a browser or a driver, and the browser's background networking
is off.
"""

import json
import os
import uuid
from typing import Any, Callable

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.web_processes import LONG

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900")
PASSWORD = "correct horse battery"


def start_browser(profile: str) -> WebDriver:
    """Headless Chromium with a fresh profile in *profile*, its console log kept."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), (
            f"{path} is missing: the browser tests need Debian's chromium and chromium-driver; "
            "run scripts/install-test-deps (as root on Debian), which installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.accept_insecure_certs = True  # the nginx test's self-signed certificate
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(LONG)
    driver.set_script_timeout(LONG)
    return driver


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str,
         timeout: float = LONG) -> Any:
    try:
        # The page re-renders (the list after each change, everything after Log out): an
        # element found a moment ago may be gone; the condition is then asked again.
        return WebDriverWait(driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        raise AssertionError(f"waited {timeout} s for {what}; the page shows:\n"
                             + driver.find_element(By.TAG_NAME, "body").text) from None


def wait_visible(driver: WebDriver, by: str, value: str) -> WebElement:
    return wait(driver, lambda d: (e := d.find_element(by, value)).is_displayed() and e,
                f"{value} to show")


def field(driver: WebDriver, label: str) -> WebElement:
    """The control whose <label> reads *label* (as a screen reader would find it)."""
    labels = [e for e in driver.find_elements(By.XPATH, f"//label[normalize-space()='{label}']")
              if e.is_displayed()]
    assert len(labels) == 1, f"expected one visible label {label!r}, found {len(labels)}"
    return driver.find_element(By.ID, labels[0].get_attribute("for"))


def button(driver: WebDriver, name: str) -> WebElement:
    found = [e for e in driver.find_elements(By.XPATH, f"//button[normalize-space()='{name}']")
             if e.is_displayed()]
    assert len(found) == 1, f"expected one visible button {name!r}, found {len(found)}"
    return found[0]


def new_username(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def authenticate(driver: WebDriver, action: str, username: str, password: str = PASSWORD) -> None:
    field(driver, "Username").clear()
    field(driver, "Username").send_keys(username)
    field(driver, "Password").clear()
    field(driver, "Password").send_keys(password)
    button(driver, action).click()


def sign_up(driver: WebDriver, label: str = "user") -> str:
    username = new_username(label)
    authenticate(driver, "Sign up", username)
    wait_signed_in(driver, username)
    return username


def wait_signed_in(driver: WebDriver, username: str) -> None:
    wait(driver, lambda d: d.find_element(By.ID, "chat-view").is_displayed()
         and d.find_element(By.ID, "whoami").text == username, f"{username} signed in")
    wait(driver, lambda d: d.execute_script(
        "const s = document.getElementById('model'); return s.options.length && s.value"),
        "the model picker to fill")


def choose_model(driver: WebDriver, model: str) -> None:
    picker = field(driver, "Model")
    picker.find_element(By.CSS_SELECTOR, f"option[value='{model}']").click()
    assert picker.get_attribute("value") == model


def type_message(driver: WebDriver, text: str) -> None:
    box = field(driver, "Message")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def assistants(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#messages [data-role='assistant']")


def last_reply_state(driver: WebDriver) -> dict:
    return driver.execute_script("""
        const all = document.querySelectorAll("#messages [data-role='assistant']");
        const li = all[all.length - 1];
        if (!li) return {count: 0};
        const body = li.querySelector('.body');
        return {count: all.length, text: body.textContent, status: li.dataset.status || null,
                streaming: Boolean(li.querySelector('.streaming'))};""")


def wait_reply_ended(driver: WebDriver, count: int) -> dict:
    return wait(driver, lambda d: (s := last_reply_state(d))["count"] == count
                and s["status"] and s, f"assistant reply #{count} to end")


def current_app_id(driver: WebDriver) -> str:
    path = driver.execute_script("return location.pathname")
    assert path.startswith("/chat/c/"), path
    return driver.execute_script("return decodeURIComponent(location.pathname.slice(8))")


def api(driver: WebDriver, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A same-origin fetch from the page, with its session cookie, as app.js makes them."""
    result = driver.execute_async_script("""
        const [method, path, body, done] = arguments;
        const init = {method, credentials: 'same-origin', headers: {}};
        if (body !== null) { init.headers['Content-Type'] = 'application/json';
                             init.body = JSON.stringify(body); }
        fetch(path, init).then(async (r) => done([r.status, await r.text()]),
                               (e) => done([0, String(e)]));""", method, path, body)
    status, text = result
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def stored_messages(driver: WebDriver, app_id: str) -> list[dict]:
    status, data = api(driver, "GET", f"/conversations/{app_id}")
    assert status == 200, (status, data)
    return data if isinstance(data, list) else data["messages"]


def csp_violations(driver: WebDriver) -> list[str]:
    """The browser console's Content-Security-Policy complaints since the last call."""
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"]]


def list_titles(driver: WebDriver) -> list[str]:
    return [a.text for a in driver.find_elements(By.CSS_SELECTOR, "nav#conversations a")]
