"""The chat page (/chat/) as a person uses it: Debian's Chromium, headless, driven by its
ChromeDriver through Selenium, against a real chatterd process on the run's PostgreSQL and
an Ollama double in a process of its own (programmed per model: slow tokens, hostile
replies, failures).  One browser serves the whole module; each test signs up its own user.

Nothing here downloads a browser or a driver: both paths are given explicitly (so Selenium
Manager never runs), and the browser runs with its background networking off.

The run writes screenshots of the chat view (desktop and 390x844) and the figures of
docs/web.md (time to the first visible token through the page and through curl, this
module's duration) to tests/artifacts/.
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.test_nginx import MAIN_CONF, NGINX_CONF, render, substitutions, tool
from tests.web_page import (api, assistants, authenticate, button, choose_model,
                            csp_violations, current_app_id, field, last_reply_state,
                            list_titles, sign_up, start_browser, stored_messages,
                            type_message, wait, wait_reply_ended, wait_signed_in, wait_visible)
from tests.web_processes import LONG, Process, Stack, unused_port

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CONTEXT_TOKENS = 600
USER_STREAMS = 2
TURN_WAIT = 3

# The double's models.  "slow" streams a long reply a token every 0.2 s, so a test can act
# in the middle of it ("steady" the same reply faster, to watch it whole); "hostile"
# answers with everything model output must never do.
SLOW_REPLY = " ".join(f"word{i}" for i in range(60)) + "\n\n- a list item\n- another one\n"
HOSTILE_REPLY = """Hostile reply <script>window.__canary = "script"</script> ends.

<img src=x onerror="window.__canary = 'img'">

[click me](javascript:window.__canary='link') and [data](data:text/html;base64,PHNjcmlwdD5wYXJlbnQuX19jYW5hcnk9J2RhdGEnPC9zY3JpcHQ+)

<a href="javascript:window.__canary='raw-link'">raw link</a>
<iframe src="javascript:parent.__canary='iframe'"></iframe>
<svg onload="window.__canary='svg'"><circle r="5"/></svg>
<form action="https://example.invalid/"><button>go</button></form>
<style>body { display: none }</style>

```html
<script>window.__canary = "code"</script>
```

A fine link: [example](https://example.invalid/page).
"""
BEHAVIORS = {
    "llama3.2": {"token_delay": 0.03},
    "quick": {"token_delay": 0.0},
    # Silent for longer than chatterd's --status-grace (2 s), so the stream has started
    # (200, keepalives), then the connection is reset before any token: a failed turn with
    # no answer text, kept as a record outside the conversation.
    "late": {"header_delay": 3.0, "reset_after": 0},
    "slow": {"token_delay": 0.2, "reply": SLOW_REPLY},
    "steady": {"token_delay": 0.08, "reply": SLOW_REPLY},
    "hostile": {"token_delay": 0.005, "reply": HOSTILE_REPLY},
    "overloaded": {"status": 503, "error": "server busy, please try again"},
    "breaks": {"token_delay": 0.02, "error": "CUDA error: out of memory", "error_after": 3},
}


# -- fixtures ----------------------------------------------------------------------------

FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def stack():
    started = time.monotonic()
    s = Stack(BEHAVIORS, [
        # Small enough for a test to fill: a budget of 450 tokens (a quarter is kept for
        # the reply), which the other tests' conversations stay well within.
        f"--context-tokens={CONTEXT_TOKENS}",
        # Two streams per user at once: a third is a 429 the page must show.
        f"--user-streams={USER_STREAMS}",
        # A turn waits this long for the conversation's running one, then is a 409.
        f"--turn-wait={TURN_WAIT}"])
    yield s
    s.close()
    FIGURES["module_seconds"] = round(time.monotonic() - started, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "web-figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chatterd-chromium-")
    driver = start_browser(profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, stack):
    """The browser on a clean slate: no cookies for the page, a desktop-sized window."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(stack.base + "/chat/")
    browser.delete_all_cookies()
    browser.get(stack.base + "/chat/")
    wait_visible(browser, By.ID, "auth-view")
    return browser


# -- tests -------------------------------------------------------------------------------

def test_sign_up_log_out_log_in_and_a_wrong_password(page, stack):
    username = sign_up(page, "ada")
    assert page.execute_script("return document.cookie") == "", "the session cookie is HttpOnly"
    assert page.execute_script("return localStorage.length + sessionStorage.length") == 0
    button(page, "Log out").click()
    wait_visible(page, By.ID, "auth-view")
    status, _ = api(page, "GET", "/auth/me")
    assert status == 401
    authenticate(page, "Log in", username, "not the password at all")
    wait(page, lambda d: d.find_element(By.ID, "auth-error").text, "the login error")
    assert "wrong username or password" in page.find_element(By.ID, "auth-error").text
    assert not page.find_element(By.ID, "chat-view").is_displayed()
    authenticate(page, "Log in", username)
    wait_signed_in(page, username)
    page.refresh()  # the session survives a reload: it is the cookie, nothing else
    wait_signed_in(page, username)
    assert page.execute_script("return localStorage.length + sessionStorage.length") == 0


def test_the_reply_streams_in_and_the_stored_conversation_is_what_is_shown(page, stack):
    sign_up(page, "stream")
    choose_model(page, "steady")
    type_message(page, "Tell me a long story")
    observed = []  # distinct texts of the reply seen while it streamed
    while True:
        state = last_reply_state(page)
        if state.get("status"):
            break
        if state.get("count") and state["text"] and (not observed or observed[-1] != state["text"]):
            observed.append(state["text"])
        time.sleep(0.05)  # the observer's own pace; the page is not waited on here
    assert state["status"] == "complete", state
    assert len(observed) >= 3, f"the reply appeared in {len(observed)} step(s): {observed}"
    for earlier, later in zip(observed, observed[1:]):
        assert later.startswith(earlier) and len(later) > len(earlier), (earlier, later)
    assert SLOW_REPLY.startswith(observed[-1])

    app_id = current_app_id(page)
    stored = stored_messages(page, app_id)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "Tell me a long story"), ("assistant", SLOW_REPLY)]
    shown = page.execute_script("""return [...document.querySelectorAll('#messages [data-role]')]
        .map(li => [li.dataset.role, li.querySelector('.body').innerHTML])""")
    # The finished reply is rendered markdown (the list is a list) ...
    assert page.find_elements(By.CSS_SELECTOR, "#messages [data-role='assistant'] ul > li")
    # ... and a reload, which renders from storage, shows exactly the same.
    page.refresh()
    wait(page, lambda d: len(assistants(d)) == 1, "the stored reply after a reload")
    again = page.execute_script("""return [...document.querySelectorAll('#messages [data-role]')]
        .map(li => [li.dataset.role, li.querySelector('.body').innerHTML])""")
    assert again == shown
    assert list_titles(page), "the conversation is listed"


def test_stop_keeps_the_partial_reply_marked_and_the_next_message_works(page, stack):
    sign_up(page, "stop")
    choose_model(page, "slow")
    type_message(page, "Go on and on")
    wait(page, lambda d: len(last_reply_state(d).get("text") or "") > 20, "a few tokens")
    button(page, "Stop").click()
    state = wait_reply_ended(page, 1)
    assert state["status"] == "interrupted", state
    partial = state["text"]
    assert partial and len(partial) < len(SLOW_REPLY), partial
    mark = page.find_element(By.CSS_SELECTOR, "#messages [data-role='assistant'] .mark")
    assert "nterrupted" in mark.text
    assert button(page, "Stop").get_attribute("disabled") is not None
    assert button(page, "Send").get_attribute("disabled") is None

    app_id = current_app_id(page)
    choose_model(page, "llama3.2")
    type_message(page, "And now?")
    state = wait_reply_ended(page, 2)
    assert state["status"] == "complete", state
    stored = stored_messages(page, app_id)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert SLOW_REPLY.startswith(stored[1]["content"]) and stored[1]["content"]
    assert stored[1]["content"].strip() in partial.strip() or partial.strip() in stored[1]["content"]

    page.refresh()  # the interrupted reply is still there, still marked
    wait(page, lambda d: len(assistants(d)) == 2, "the stored replies after a reload")
    first = assistants(page)[0]
    assert first.get_attribute("data-status") == "interrupted"
    assert "nterrupted" in first.find_element(By.CSS_SELECTOR, ".mark").text


def test_a_reply_that_failed_before_its_first_token(page, stack):
    sign_up(page, "late")
    choose_model(page, "late")
    type_message(page, "Are you there?")
    state = wait_reply_ended(page, 1)
    assert state["status"] == "failed" and state["text"] == "", state
    live_mark = assistants(page)[0].find_element(By.CSS_SELECTOR, ".mark").text
    assert live_mark.startswith("Failed: "), live_mark
    stored = stored_messages(page, current_app_id(page))
    assert [(m["role"], m["content"], m["status"]) for m in stored] == [
        ("user", "Are you there?", "failed"), ("assistant", "", "failed")], stored
    assert stored[1]["error"]
    page.refresh()  # the record, shown as it was live
    wait(page, lambda d: assistants(d) and assistants(d)[0].get_attribute("data-status") == "failed",
         "the stored record after a reload")
    assert assistants(page)[0].find_element(By.CSS_SELECTOR, ".mark").text == \
        f"Failed: {stored[1]['error']}"


def test_reload_in_the_middle_of_a_stream_continues_the_reply(page, stack):
    sign_up(page, "reload")
    choose_model(page, "slow")
    type_message(page, "A long one, please")
    wait(page, lambda d: len(last_reply_state(d).get("text") or "") > 20, "a few tokens")
    app_id = current_app_id(page)
    running = json.loads(page.execute_script("return sessionStorage.getItem('chatterd.running')"))
    assert sorted(running) == ["appID", "before", "text", "turn"] and running["appID"] == app_id
    page.refresh()  # the turn goes on generating; the reloaded page resumes its stream
    first = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages [data-role='user']")
                 and len(t := last_reply_state(d).get("text") or "") > 0 and t, "the resumed reply")
    wait(page, lambda d: len(last_reply_state(d).get("text") or "") > len(first) + 10,
         "the reply growing after the reload")
    state = wait_reply_ended(page, 1)
    assert state["status"] == "complete", state
    assert current_app_id(page) == app_id
    stored = stored_messages(page, app_id)
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"), ("assistant", "complete")], stored
    assert stored[1]["content"] == SLOW_REPLY
    shown = assistants(page)[0].find_element(By.CSS_SELECTOR, ".body").text
    # The whole reply exactly once: the list's items, and word0 (shown before the reload too).
    assert shown.count("word0 ") == 1 and shown.count("word59") == 1, shown
    assert shown.startswith("word0 word1") and "another one" in shown, shown
    assert page.execute_script("return sessionStorage.getItem('chatterd.running')") is None
    page.refresh()  # after it: the stored reply, the same, with no mark
    wait(page, lambda d: len(assistants(d)) == 1, "the conversation after a second reload")
    assert assistants(page)[0].find_element(By.CSS_SELECTOR, ".body").text == shown
    assert not assistants(page)[0].find_elements(By.CSS_SELECTOR, ".mark")


def test_stop_after_a_reload_and_an_unknown_remembered_turn(page, stack):
    sign_up(page, "reloadstop")
    choose_model(page, "slow")
    type_message(page, "A long one, please")
    wait(page, lambda d: len(last_reply_state(d).get("text") or "") > 20, "a few tokens")
    app_id = current_app_id(page)
    page.refresh()
    wait(page, lambda d: len(last_reply_state(d).get("text") or "") > 40, "the resumed reply")
    button(page, "Stop").click()  # stops the turn the reloaded page resumed
    state = wait_reply_ended(page, 1)
    assert state["status"] == "interrupted", state
    stored = stored_messages(page, app_id)
    assert stored[1]["status"] == "interrupted" and SLOW_REPLY.startswith(stored[1]["content"])
    assert len(stored[1]["content"]) < len(SLOW_REPLY), stored

    # A remembered turn chatterd does not know (404) leaves the stored conversation as it is.
    page.execute_script("sessionStorage.setItem('chatterd.running', JSON.stringify("
                        "{turn: '999999999', appID: arguments[0], text: 'ghost', before: 2}))",
                        app_id)
    page.refresh()
    wait(page, lambda d: page.execute_script(
        "return sessionStorage.getItem('chatterd.running')") is None
         and len(assistants(d)) == 1 and assistants(d)[0].get_attribute("data-status") == "interrupted",
         "the stored conversation after a failed resume")
    assert [e.text for e in page.find_elements(By.CSS_SELECTOR, "#messages [data-role='user'] .body")] \
        == ["A long one, please"]


def test_hostile_reply_runs_nothing_and_navigates_nowhere(page, stack):
    sign_up(page, "hostile")
    choose_model(page, "hostile")
    page.execute_script("window.__canary = undefined")
    type_message(page, "Say something nasty")
    state = wait_reply_ended(page, 1)
    assert state["status"] == "complete", state
    url_before = page.current_url
    reply = assistants(page)[0]
    body = reply.find_element(By.CSS_SELECTOR, ".body")
    # Give any handler that could have been planted the chance to fire: hover and click
    # everything in the reply (a link opens a new tab at most; the page stays).
    for element in body.find_elements(By.CSS_SELECTOR, "*"):
        if element.is_displayed() and element.tag_name != "a":
            try:
                element.click()
            except Exception:
                pass
    assert page.execute_script("return window.__canary") is None
    assert page.current_url == url_before
    assert len(page.window_handles) == 1
    # Nothing active made it into the DOM ...
    counts = page.execute_script("""
        const b = arguments[0];
        const bad = [...b.querySelectorAll('*')].filter(e => [...e.attributes].some(
            a => a.name.startsWith('on') || a.name === 'style' || a.name === 'src'));
        return {script: b.querySelectorAll('script').length, img: b.querySelectorAll('img').length,
                iframe: b.querySelectorAll('iframe').length, svg: b.querySelectorAll('svg').length,
                form: b.querySelectorAll('form').length, style: b.querySelectorAll('style').length,
                handlers: bad.length,
                hrefs: [...b.querySelectorAll('a')].map(a => a.getAttribute('href'))};""", body)
    hrefs = counts.pop("hrefs")
    assert counts == {"script": 0, "img": 0, "iframe": 0, "svg": 0, "form": 0, "style": 0,
                      "handlers": 0}, counts
    # Only the markdown link and URLs in the text became links, and only to the web.
    assert "https://example.invalid/page" in hrefs
    assert all(h.startswith("https://example.invalid/") for h in hrefs), hrefs
    link = body.find_element(By.CSS_SELECTOR, "a")
    assert link.get_attribute("target") == "_blank"
    assert set(link.get_attribute("rel").split()) >= {"noopener", "noreferrer"}
    # ... raw HTML shows as the text it is, and the code block is code.
    text = body.text
    assert '<img src=x onerror="window.__canary = \'img\'">' in text
    assert "[click me](javascript:window.__canary='link')" in text or "click me" in text
    code = body.find_element(By.CSS_SELECTOR, "pre > code").text
    assert code == '<script>window.__canary = "code"</script>'
    assert page.find_element(By.TAG_NAME, "body").is_displayed()  # the <style> did nothing
    # The page itself needs nothing the policy forbids (so a violation would mean an attack).
    assert csp_violations(page) == []
    # The same after a reload, rendered from storage.
    page.refresh()
    wait(page, lambda d: len(assistants(d)) == 1, "the stored hostile reply")
    assert page.execute_script("return window.__canary") is None
    assert assistants(page)[0].find_element(By.CSS_SELECTOR, "pre > code").text == code


def test_errors_show_in_place(page, stack):
    sign_up(page, "errors")
    choose_model(page, "overloaded")
    type_message(page, "Anyone there?")
    error = wait(page, lambda d: (e := d.find_elements(By.CSS_SELECTOR, "#messages .error-item"))
                 and e[0], "the refusal in place")
    assert "503" in error.text and "server busy" in error.text, error.text
    assert field(page, "Message").get_attribute("value") == "Anyone there?", \
        "the refused message is back in the box"
    field(page, "Message").clear()
    choose_model(page, "breaks")
    type_message(page, "Try this one")
    state = wait_reply_ended(page, 1)
    assert state["status"] == "failed", state
    mark = assistants(page)[0].find_element(By.CSS_SELECTOR, ".mark")
    assert "out of memory" in mark.text


def test_too_many_streams_is_a_429_with_its_wait(page, stack):
    sign_up(page, "busy")
    # The user's two streams allowed, taken by this same session (as another tab would).
    page.execute_script("""
        window.__held = [];
        window.__heldStatus = [];
        for (let i = 0; i < arguments[0]; i++) {
            const control = new AbortController();
            window.__held.push(control);
            fetch('/llmchat', {method: 'POST', signal: control.signal,
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({appID: 'web-held-' + i + '-' + Math.random(), model: 'slow',
                                      stream: true, messages: [{role: 'user', content: 'hold'}]})})
              .then(r => { window.__heldStatus.push(r.status); return drain(r.body.getReader()); })
              .catch(() => {});
        }
        // Read each stream to its end, holding the reader: a stream nobody holds may be
        // collected, and cancelled, which would free its slot.
        async function drain(reader) {
            window.__readers = (window.__readers || []).concat([reader]);
            while (!(await reader.read()).done) {}
        }""", USER_STREAMS)
    try:
        held = wait(page, lambda d: len(s := d.execute_script("return window.__heldStatus")) ==
                    USER_STREAMS and s, "both streams answered")
        assert held == [200] * USER_STREAMS, held
        choose_model(page, "quick")
        type_message(page, "One more")
        error = wait(page, lambda d: (e := d.find_elements(By.CSS_SELECTOR, "#messages .error-item"))
                     and e[0], "the 429 in place")
        assert "429" in error.text and "try again in 1 s" in error.text, error.text
    finally:
        page.execute_script("window.__held.forEach(c => c.abort())")


def test_a_turn_while_another_of_the_conversation_runs_is_a_409_in_place(page, stack):
    sign_up(page, "409")
    choose_model(page, "quick")
    type_message(page, "First")
    wait_reply_ended(page, 1)
    app_id = current_app_id(page)
    # Another tab of this user answering in the same conversation, slowly.
    page.execute_script("""
        window.__other = new AbortController();
        fetch('/llmchat', {method: 'POST', signal: window.__other.signal,
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({appID: arguments[0], model: 'slow', stream: true,
                                  messages: [{role: 'user', content: 'elsewhere'}]})})
          .then(async (r) => {
              window.__otherStarted = r.status;
              window.__otherReader = r.body.getReader();  // held, so it is not collected
              while (!(await window.__otherReader.read()).done) {}
          }).catch(() => {});""", app_id)
    try:
        wait(page, lambda d: d.execute_script("return window.__otherStarted") == 200,
             "the other tab's turn running")
        type_message(page, "Second")
        error = wait(page, lambda d: (e := d.find_elements(By.CSS_SELECTOR, "#messages .error-item"))
                     and e[0], "the 409 in place", timeout=TURN_WAIT + LONG)
        assert "409" in error.text and "still being written" in error.text, error.text
        assert field(page, "Message").get_attribute("value") == "Second"
    finally:
        page.execute_script("window.__other.abort()")


def test_a_note_when_older_messages_were_left_out(page, stack):
    sign_up(page, "budget")
    choose_model(page, "quick")
    long_message = " ".join(f"w{i}" for i in range(200))  # ~200 tokens, and a reply quoting it
    type_message(page, long_message)
    wait_reply_ended(page, 1)
    assert page.find_elements(By.CSS_SELECTOR, "#messages .context-note") == []
    type_message(page, long_message)
    wait_reply_ended(page, 2)
    note = page.find_element(By.CSS_SELECTOR, "#messages .context-note")
    assert "The 2 oldest messages were left out" in note.text, note.text
    # It sits just before the turn it is about.
    following = note.find_element(By.XPATH, "following-sibling::li[1]")
    assert following.get_attribute("data-role") == "user"
    assert len(page.find_elements(By.CSS_SELECTOR, "#messages [data-role='user']")) == 2


def test_a_second_user_sees_nothing_of_the_first(page, stack):
    sign_up(page, "first")
    choose_model(page, "llama3.2")
    type_message(page, "My secret plan")
    wait_reply_ended(page, 1)
    app_id = current_app_id(page)
    wait(page, lambda d: len(list_titles(d)) == 1, "the first user's conversation listed")
    button(page, "Log out").click()
    wait_visible(page, By.ID, "auth-view")
    sign_up(page, "second")
    wait(page, lambda d: d.find_element(By.ID, "list-note").text, "the empty list")
    assert list_titles(page) == []
    assert "My secret plan" not in page.find_element(By.TAG_NAME, "body").text
    page.get(f"{stack.base}/chat/c/{app_id}")
    wait(page, lambda d: d.find_element(By.ID, "conversation-title").text == "No such conversation",
         "the refusal of someone else's conversation")
    assert page.find_elements(By.CSS_SELECTOR, "#messages > li") == []
    assert "My secret plan" not in page.find_element(By.TAG_NAME, "body").text
    status, _ = api(page, "GET", f"/conversations/{app_id}")
    assert status == 404


def test_rename_delete_and_new_chat_with_the_keyboard_alone(page, stack):
    sign_up(page, "keys")
    box = field(page, "Message")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert assistants(page) == [], "Shift+Enter does not send"
    box.send_keys(Keys.ENTER)
    wait_reply_ended(page, 1)
    first_id = current_app_id(page)
    wait(page, lambda d: len(list_titles(d)) == 1, "one conversation listed")
    # New chat, reached with Tab from the message box's side of the page.
    page.find_element(By.ID, "new-chat").send_keys(Keys.ENTER)
    wait(page, lambda d: d.execute_script("return location.pathname") == "/chat/", "a new chat")
    assert page.find_elements(By.CSS_SELECTOR, "#messages > li") == []
    field(page, "Message").send_keys("second conversation", Keys.ENTER)
    wait_reply_ended(page, 1)
    wait(page, lambda d: len(list_titles(d)) == 2, "two conversations listed")
    second_id = current_app_id(page)
    links = page.find_elements(By.CSS_SELECTOR, "nav#conversations a")
    assert [link.get_attribute("href").rsplit("/", 1)[1] for link in links] == [second_id, first_id], \
        "newest first"
    # Rename the first with keys only.
    rename = page.find_elements(By.CSS_SELECTOR, "nav#conversations li")[1].find_element(
        By.XPATH, ".//button[normalize-space()='Rename']")
    rename.send_keys(Keys.ENTER)
    title = field(page, "Title")
    assert page.switch_to.active_element == title
    title.send_keys(Keys.CONTROL, "a")
    title.send_keys("Renamed by keys", Keys.ENTER)
    wait(page, lambda d: "Renamed by keys" in list_titles(d), "the new title in the list")
    # Open it by its link, with Enter.
    page.find_element(By.LINK_TEXT, "Renamed by keys").send_keys(Keys.ENTER)
    wait(page, lambda d: d.find_element(By.ID, "conversation-title").text == "Renamed by keys",
         "the renamed conversation open")
    assert current_app_id(page) == first_id
    # Delete it: Delete, then confirm.
    item = [li for li in page.find_elements(By.CSS_SELECTOR, "nav#conversations li")
            if "Renamed by keys" in li.text][0]
    item.find_element(By.XPATH, ".//button[normalize-space()='Delete']").send_keys(Keys.ENTER)
    page.find_element(By.XPATH, "//button[normalize-space()='Yes, delete']").send_keys(Keys.ENTER)
    wait(page, lambda d: list_titles(d) and "Renamed by keys" not in list_titles(d),
         "the deleted conversation gone from the list")
    assert page.execute_script("return location.pathname") == "/chat/"
    status, _ = api(page, "GET", f"/conversations/{first_id}")
    assert status == 404


def test_screenshots_and_phone_size(page, stack):
    sign_up(page, "shots")
    choose_model(page, "llama3.2")
    type_message(page, "Show me some code, please")
    wait_reply_ended(page, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / "chat-desktop.png"))
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        page.refresh()
        wait(page, lambda d: len(assistants(d)) == 1, "the conversation at phone size")
        sizes = page.execute_script("""return {inner: window.innerWidth,
            scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth}""")
        assert sizes["inner"] == 390, sizes
        assert sizes["scroll"] <= 390 and sizes["body"] <= 390, f"horizontal scrolling: {sizes}"
        for name in ("Message", "Model"):
            assert field(page, name).is_displayed()
        for name in ("Send", "Stop", "New chat", "Log out"):
            assert button(page, name).is_displayed()
        page.save_screenshot(str(ARTIFACTS / "chat-phone.png"))
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_time_to_first_visible_token_page_vs_curl(page, stack):
    sign_up(page, "ttft")
    choose_model(page, "llama3.2")
    page_ms = []
    for i in range(5):
        # From the Enter that sends to the first reply text in the DOM (a MutationObserver
        # fires after the DOM change, before the next paint).
        page.execute_script("""
            window.__ttft = null;
            window.__ttftStart = null;
            const observer = new MutationObserver(() => {
                const s = document.querySelector('#messages li:last-child .streaming');
                if (s && s.textContent && window.__ttftStart !== null) {
                    window.__ttft = performance.now() - window.__ttftStart;
                    observer.disconnect();
                }
            });
            observer.observe(document.getElementById('messages'),
                             {childList: true, subtree: true, characterData: true});
            document.getElementById('message').addEventListener('keydown', (event) => {
                if (event.key === 'Enter' && window.__ttftStart === null)
                    window.__ttftStart = performance.now();
            }, {capture: true});""")
        type_message(page, f"timing {i}")
        wait_reply_ended(page, i + 1)
        page_ms.append(page.execute_script("return window.__ttft"))
    curl_ms = []
    for i in range(5):
        body = json.dumps({"appID": f"web-ttft-{uuid.uuid4().hex}", "model": "llama3.2",
                           "stream": True, "messages": [{"role": "user", "content": f"timing {i}"}]})
        started = time.monotonic()
        curl = subprocess.Popen([tool("curl"), "-sSN", "--max-time", str(LONG), "-X", "POST",
                                 f"http://127.0.0.1:{stack.port}/llmchat", "-d", body],
                                stdout=subprocess.PIPE)
        assert curl.stdout is not None
        for line in curl.stdout:
            if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                curl_ms.append(1000 * (time.monotonic() - started))
                break
        curl.stdout.read()
        assert curl.wait(LONG) == 0
    assert all(isinstance(v, (int, float)) for v in page_ms), page_ms
    assert len(curl_ms) == 5
    FIGURES["ttft_page_ms"] = {"median": round(statistics.median(page_ms), 1),
                               "runs": [round(v, 1) for v in page_ms]}
    FIGURES["ttft_curl_ms"] = {"median": round(statistics.median(curl_ms), 1),
                               "runs": [round(v, 1) for v in curl_ms]}


def test_through_nginx_on_https(page, stack):
    """The page through the repository's nginx.conf (TLS, HTTP/2), once."""
    for name in ("nginx", "openssl"):
        tool(name)
    work = tempfile.mkdtemp(prefix="chatterd-web-nginx-")
    os.chmod(work, 0o755)
    cert, key = os.path.join(work, "chatterd.crt"), os.path.join(work, "chatterd.key")
    made = subprocess.run(
        [tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "2",
         "-keyout", key, "-out", cert], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr.decode()
    https_port, http_port = unused_port(), unused_port()
    subs = substitutions(https_port=https_port, http_port=http_port, cert=cert, key=key,
                         upstreams=[stack.port, stack.port],
                         access_log=os.path.join(work, "chatterd.access.log"))
    Path(work, "chatterd.conf").write_text(render(NGINX_CONF.read_text(), subs))
    Path(work, "nginx.conf").write_text(MAIN_CONF.format(dir=work))
    nginx = Process("nginx", [tool("nginx"), "-p", work, "-e", "stderr", "-c",
                              os.path.join(work, "nginx.conf"), "-g", "daemon off;"],
                    "start worker process", work)
    try:
        base = f"https://localhost:{https_port}"
        page.get(base + "/chat/")
        wait_visible(page, By.ID, "auth-view")
        sign_up(page, "tls")
        choose_model(page, "llama3.2")
        type_message(page, "Hello through nginx")
        state = wait_reply_ended(page, 1)
        assert state["status"] == "complete", state
        assert page.find_elements(By.CSS_SELECTOR, "#messages [data-role='assistant'] pre > code")
        protocol = page.execute_script(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol")
        assert protocol == "h2", protocol
        assert page.execute_script("return window.isSecureContext") is True
    finally:
        nginx.stop()
        shutil.rmtree(work, ignore_errors=True)
