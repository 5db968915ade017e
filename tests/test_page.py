"""
The chat page in a real headless Chromium (Debian's chromium + chromedriver), driven by
selenium against serve.py on loopback with the tiny model of test_serve.py: type, watch the
reply stream in, stop, edit, regenerate, slash commands, safe Markdown, "model not loaded",
and screenshots at desktop and phone width (saved under the test's tmp dir for a look).
"""
import os
import shutil
import time

import pytest

import serve
from test_serve import build_tiny_home, request, scripted_app, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import StaleElementReferenceException   # noqa: E402
from selenium.webdriver.common.by import By                    # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait        # noqa: E402

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Base URL and app of a one-worker server on the tiny model."""
    home = str(tmp_path_factory.mktemp("home"))
    old = os.environ.get("SLIMCHAT_HOME")
    try:
        app = serve.build_app(build_tiny_home(home, workers=1))
    finally:
        os.environ.pop("SLIMCHAT_HOME") if old is None else os.environ.__setitem__("SLIMCHAT_HOME", old)
    server, port = start_server(app)
    yield f"http://127.0.0.1:{port}/", app
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=20):
    # render() rebuilds the message list (when a reply starts and ends), so a found element may go stale
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition())


def open_page(driver, url, keep=False):
    """Load the page, by default with no conversation kept from an earlier test (localStorage)."""
    driver.get(url)
    if not keep:
        driver.execute_script("localStorage.clear()")
        driver.refresh()
    wait(driver, lambda: driver.find_element(By.ID, "status").text not in ("", "connecting…"))


def type_and_send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys("\n")   # Enter sends


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def finished_reply(driver):
    """The last reply once streaming ended (its Regenerate button appears then)."""
    wait(driver, lambda: replies(driver) and replies(driver)[-1].find_elements(By.CSS_SELECTOR, ".regen"))
    return replies(driver)[-1]


def test_chat_edit_regenerate(browser, site):
    """Send, see the streamed reply, edit the message and resend, then regenerate the reply."""
    url, app = site
    open_page(browser, url)
    assert browser.find_element(By.ID, "status").text == app.model_id
    type_and_send(browser, "hello there")
    reply = finished_reply(browser)
    first = reply.find_element(By.CSS_SELECTOR, ".body").text
    assert first.strip()
    assert "token limit" in reply.find_element(By.CSS_SELECTOR, ".note").text   # the tiny model never stops
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "hello there"

    browser.find_element(By.CSS_SELECTOR, ".msg.user .edit").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    box = browser.find_element(By.ID, "input")
    assert box.get_attribute("value") == "hello there"
    box.send_keys(" again\n")
    second = finished_reply(browser).find_element(By.CSS_SELECTOR, ".body").text
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user .body")] == ["hello there again"]

    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .regen").click()
    wait(browser, lambda: finished_reply(browser).find_element(By.CSS_SELECTOR, ".body").text != second)
    assert len(replies(browser)) == 1 and len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1


def test_stop_button(browser, site):
    """Stop ends a long reply at once, keeps what arrived, and the server's worker is free again."""
    url, app = site
    open_page(browser, url)
    tokens_before = app.pool.workers[0].tokens
    browser.execute_script("state.settings.max_tokens = 4000;")   # ~3 s of streaming on an idle CPU
    type_and_send(browser, "tell me everything")
    stop = browser.find_element(By.ID, "stop")
    # some reply text is on screen while Stop is showing: the reply is streaming in. The page
    # keeps the streaming reply's body node, so this check is not a race with its re-renders.
    wait(browser, lambda: stop.is_displayed()
         and replies(browser)[-1].find_element(By.CSS_SELECTOR, ".body").text.strip("…"))
    stop.click()
    reply = finished_reply(browser)
    assert reply.find_element(By.CSS_SELECTOR, ".note").text == "(stopped)"
    assert reply.find_element(By.CSS_SELECTOR, ".body").text.strip()
    deadline = time.time() + 3
    while app.pool.available() != 1 and time.time() < deadline:
        time.sleep(0.05)
    assert app.pool.available() == 1
    assert app.pool.workers[0].tokens - tokens_before < 4000   # generation ended before the cap


def test_tool_call_shown(browser, site):
    """A streamed calculator call and its result appear as tool boxes, and the reply (with its
    parts) goes back to the server as history on the next turn."""
    _, app = site
    server, port = start_server(scripted_app(app.tokenizer))
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        type_and_send(browser, "what is 7*6?")
        reply = finished_reply(browser)
        assert reply.find_element(By.CSS_SELECTOR, ".tool:not(.tool-result) .tool-code").text == "7*6"
        assert reply.find_element(By.CSS_SELECTOR, ".tool-result .tool-code").text == "42"
        assert [p.text for p in reply.find_elements(By.CSS_SELECTOR, ".body > p")] == ["A", "!"]
        type_and_send(browser, "and again?")
        wait(browser, lambda: len(replies(browser)) == 2
             and replies(browser)[1].find_elements(By.CSS_SELECTOR, ".regen"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert replies(browser)[1].find_element(By.CSS_SELECTOR, ".tool-result").text.endswith("42")
    finally:
        server.shutdown()
        server.server_close()


def test_finished_reply_is_drawn_once(browser, site):
    """The race behind a StaleElementReferenceException in test_tool_call_shown: a frame that the
    stream's last chunk asked for ran after the stream ended and drew the finished reply again,
    replacing the nodes a reader had just found. Frames are slowed to 0.3 s here, so such a frame
    is still pending when the stream ends, every time."""
    url, _ = site
    open_page(browser, url)
    browser.execute_script("window.requestAnimationFrame = (f) => setTimeout(f, 300);")
    type_and_send(browser, "hello")
    reply = finished_reply(browser)
    browser.execute_script("arguments[0].dataset.seen = 'yes';", reply)
    time.sleep(0.8)
    assert browser.execute_script("return document.querySelector('.msg.assistant:last-child').dataset.seen") == "yes"


def test_slash_commands(browser, site):
    url, _ = site
    open_page(browser, url)
    type_and_send(browser, "/temperature 0.5")
    type_and_send(browser, "/topk 500")
    type_and_send(browser, "/help")
    notes = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".msg.notice .body, .msg.error .body")]
    assert notes[0] == "temperature set to 0.5"
    assert "top-k must be an integer from 1 to 200" in notes[1]
    assert "/topk [v]" in notes[2]
    assert browser.execute_script("return state.settings.temperature") == 0.5
    type_and_send(browser, "/clear")
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")


def test_markdown_is_rendered_safely(browser, site):
    """Markdown becomes elements; markup and javascript: links in model text stay inert text."""
    url, _ = site
    open_page(browser, url)
    html = browser.execute_script("""
        const div = document.createElement('div');
        renderMarkdown(div, '**bold** <img src=x onerror="window.pwned=1"> `x<b>`\\n\\n' +
          '```js\\n<script>window.pwned=1</script>\\n```\\n- one\\n- two\\n\\n' +
          '[bad](javascript:alert(1)) [good](https://example.com/a)');
        document.body.appendChild(div);
        return div.innerHTML;""")
    assert "<strong>bold</strong>" in html and "<li>one</li>" in html
    assert "<img" not in html and "<script" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html and "[bad](javascript:alert(1))" in html
    assert 'href="https://example.com/a"' in html and "<code>x&lt;b&gt;</code>" in html
    assert browser.execute_script("return window.pwned") is None


def test_screenshots_desktop_and_phone(browser, site, tmp_path):
    """A conversation with Markdown, a tool call and its result, at 1280 and 390 px wide."""
    url, _ = site
    open_page(browser, url)
    type_and_send(browser, "What is 12 * 7? Show the **working**.")
    finished_reply(browser)
    browser.execute_script("""
        state.messages.push({role: 'user', text: 'And in Python?'});
        state.messages.push({role: 'assistant', parts: [
          {type: 'text', text: 'Let me compute it:'}, {type: 'python', text: '12*7'},
          {type: 'python_output', text: '84'},
          {type: 'text', text: 'So **12 × 7 = 84**. In code:\\n\\n```python\\nprint(12 * 7)\\n```\\n- fast\\n- exact'}]});
        render();""")
    assert browser.find_elements(By.CSS_SELECTOR, ".tool") and browser.find_elements(By.CSS_SELECTOR, ".code pre")
    shots = {}
    for name, (w, h) in {"desktop": (1280, 800), "phone": (390, 844)}.items():
        browser.set_window_size(w, h)
        time.sleep(0.2)
        shots[name] = str(tmp_path / f"page_{name}.png")
        assert browser.save_screenshot(shots[name])
        # nothing may stick out sideways at this width
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert browser.find_element(By.ID, "send").is_displayed()
    browser.set_window_size(1280, 800)
    print("screenshots:", shots)


def test_model_not_loaded_state(browser, tmp_path, monkeypatch):
    """No checkpoint: the page says so up front, and a message comes back with the reason."""
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    app = serve.build_app({"stage": "sft", "step": -1, "tag": "", "device": "cpu", "num_workers": 1,
                           "temperature": 0.8, "top_k": 50, "max_tokens": 32,
                           "max_rows": 1, "max_queue": 0, "cors_origins": ""})
    server, port = start_server(app)
    try:
        assert request(port, "GET", "/health")[0] == 503
        open_page(browser, f"http://127.0.0.1:{port}/")
        assert browser.find_element(By.ID, "status").text == "model not loaded"
        banner = browser.find_element(By.ID, "banner")
        assert banner.is_displayed() and "Model not loaded" in banner.text and "python sft.py" in banner.text
        type_and_send(browser, "anyone there?")
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "model not loaded" in browser.find_element(By.CSS_SELECTOR, ".msg.error .body").text
        assert browser.find_element(By.ID, "input").get_attribute("value") == "anyone there?"
    finally:
        server.shutdown()
        server.server_close()


def test_conversation_survives_reload_until_new_chat(browser, site):
    url, _ = site
    open_page(browser, url)
    type_and_send(browser, "remember me")
    text = finished_reply(browser).find_element(By.CSS_SELECTOR, ".body").text
    open_page(browser, url, keep=True)
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "remember me"
    assert finished_reply(browser).find_element(By.CSS_SELECTOR, ".body").text == text
    browser.find_element(By.ID, "new-chat").click()
    open_page(browser, url, keep=True)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    browser.execute_script("localStorage.setItem('slimchat.messages', '{not json')")
    open_page(browser, url, keep=True)   # a damaged store is dropped, not fatal
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg") and browser.find_element(By.ID, "input").is_enabled()


def test_markdown_tables(browser, site):
    """A pipe table becomes a <table> with a header row, inline Markdown and column alignment;
    pipes without a delimiter row stay text."""
    url, _ = site
    open_page(browser, url)
    cells = browser.execute_script("""
        const div = document.createElement('div');
        renderMarkdown(div, 'Scores:\\n\\n| name | **score** | note |\\n|:---|---:|:-:|\\n| ann | 3 | `ok` |\\n' +
                            '| bob | 12 | <b>x</b> |\\n\\nafter | not a table');
        const t = div.querySelector('table');
        return [[...t.querySelectorAll('th')].map(c => c.innerHTML),
                [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.innerHTML)),
                [...t.querySelectorAll('tbody tr:first-child td')].map(c => c.style.textAlign),
                [...div.querySelectorAll('p')].map(p => p.textContent)];""")
    head, rows, align, paragraphs = cells
    assert head == ["name", "<strong>score</strong>", "note"]
    assert rows == [["ann", "3", "<code>ok</code>"], ["bob", "12", "&lt;b&gt;x&lt;/b&gt;"]]
    assert align == ["", "right", "center"]
    assert paragraphs == ["Scores:", "after | not a table"]


def contrast_of_buttons(driver):
    """WCAG contrast ratio of each visible button's text against its (first opaque) background."""
    return driver.execute_script("""
        const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
        const lum = ([r, g, b]) => [r, g, b].map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92
            : ((v + 0.055) / 1.055) ** 2.4).reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
        const background = (node) => {
          for (; node; node = node.parentElement) {
            const c = rgb(getComputedStyle(node).backgroundColor);
            if (c.length < 4 || c[3] > 0) return c;
          }
          return [255, 255, 255];
        };
        $('stop').hidden = false;   // show Stop too
        const out = {};
        for (const b of document.querySelectorAll('button')) {
          const [f, g] = [lum(rgb(getComputedStyle(b).color)), lum(background(b))];
          out[(b.id || b.className) + ':' + b.textContent.trim()] = (Math.max(f, g) + 0.05) / (Math.min(f, g) + 0.05);
        }
        $('stop').hidden = true;
        return out;""")


def test_buttons_reach_contrast_in_both_schemes(browser, site):
    """Every button's text reaches WCAG AA (4.5:1) against its background, light and dark."""
    url, _ = site
    open_page(browser, url)
    type_and_send(browser, "hi")
    finished_reply(browser)   # Edit and Regenerate are on screen too
    try:
        for scheme in ("light", "dark"):
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                    {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
            ratios = contrast_of_buttons(browser)
            assert len(ratios) >= 5 and min(ratios.values()) >= 4.5, (scheme, ratios)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_server_gone_mid_reply_and_unreachable(browser, site, tmp_path):
    """serve.py killed while a reply streams: the status dot turns red, the reply shows the error,
    the typed text comes back into the box at full height; sending again to the dead server
    does the same at once; the failed turns are not sent as history later."""
    from test_serve import run_server_process
    home = str(tmp_path / "home")
    build_tiny_home(home, workers=1)   # its own files: this server gets killed
    proc, port = run_server_process(home, "--max_tokens=4000")
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        typed = "first line\nsecond line\nthird line"
        browser.execute_script("$('input').value = arguments[0]; autogrow(); send();", typed)
        wait(browser, lambda: replies(browser)[-1].find_element(By.CSS_SELECTOR, ".body").text.strip("…"))
        proc.kill()
        proc.wait()
        reply = finished_reply(browser)
        assert "error: lost the server" in reply.find_element(By.CSS_SELECTOR, ".note").text
        assert reply.find_element(By.CSS_SELECTOR, ".body").text.strip()   # what arrived stays
        status = browser.find_element(By.ID, "status")
        assert "bad" in status.get_attribute("class") and status.text == "server unreachable"
        dot = browser.execute_script("const s = getComputedStyle($('status'), '::before'); return [s.content, s.color]")
        assert dot == ['"● "', "rgb(180, 35, 24)"]   # the light scheme's --bad
        box = browser.find_element(By.ID, "input")
        assert box.get_attribute("value") == typed
        assert browser.execute_script("const b = $('input'); return b.clientHeight >= b.scrollHeight && "
                                      "b.clientHeight > 2 * parseFloat(getComputedStyle(b).lineHeight)")
        box.send_keys("\n")   # resend to the dead server
        wait(browser, lambda: len(replies(browser)) == 2 and replies(browser)[-1].find_elements(By.CSS_SELECTOR, ".regen"))
        assert "error: lost the server" in replies(browser)[-1].find_element(By.CSS_SELECTOR, ".note").text
        assert box.get_attribute("value") == typed
        assert browser.execute_script("return payload().messages") == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tiny_world_note_on_the_empty_chat(browser, site):
    """A model that learned the synthetic mirror: the empty chat says what it knows, with prompts."""
    _, app = site
    server, port = start_server(scripted_app(app.tokenizer))
    server.app.about = serve.TINY_WORLD_NOTE
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".empty .about"))
        assert "Where does Edda live?" in browser.find_element(By.CSS_SELECTOR, ".empty .about").text
    finally:
        server.shutdown()
        server.server_close()
