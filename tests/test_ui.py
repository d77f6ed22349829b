"""The browser UI in real headless Chromium (Debian's chromium + chromedriver, driven by selenium) against a
real server: streaming, stop, regenerate, edit, copy, history across reloads, raw mode, readable errors, safe
markdown (an XSS payload stays text), the SSE parser on split UTF-8, phone width and dark theme.

The served model is the "base" test checkpoint: greedy decoding writes "hello" until max_tokens, so every
expected reply is known exactly. Screenshots go to artifacts/ (gitignored)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from nanochat.checkpoint import CHECKPOINT_DIRS, save_checkpoint
from nanochat.tokenizer import Tokenizer
from tests.engine_helpers import known_logits_gpt
from tests.server_fixtures import LONG_WORD, REPO, serve_checkpoint, shared_server_base_dir

selenium = pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "artifacts"
SMALL_CONTEXT = 256

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no chromium + chromedriver on PATH; install them with "
                              "`apt-get install -y chromium chromium-driver` (tests/run.sh does this as root)"),
]


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    return shared_server_base_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(server_root):
    with serve_checkpoint(server_root, "base", max_queue=4) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,860", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def small_server(server_root, tmp_path_factory):
    """The "hello" model with the demo's 256-token context, logging what each request sent (under root/log)."""
    root = tmp_path_factory.mktemp("ui_small_context")
    shutil.copytree(server_root / "tokenizer", root / "tokenizer")
    tokenizer = Tokenizer.load(root / "tokenizer")
    (hello,) = tokenizer.encode(LONG_WORD)
    model = known_logits_gpt(tokenizer.vocab_size, {hello: 12.0}, max_seq_len=SMALL_CONTEXT)
    save_checkpoint(root / CHECKPOINT_DIRS["base"] / "d1", 7, model, optimizers=[], meta={}, rank_state={},
                    keep_last=-1)
    with serve_checkpoint(root, "base", log_dir=root / "log") as live:
        live.root = root
        live.tokenizer = tokenizer
        yield live


def fresh_page(browser, url: str, **settings):
    """The page at `url` with fresh storage and deterministic settings (greedy); fails on console errors."""
    browser.set_window_size(1280, 860)
    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear();")
    set_settings(browser, **settings)
    reload(browser)
    browser.get_log("browser")  # drop messages from earlier pages
    yield browser
    # HTTP error statuses are logged by Chromium as "network" entries; the error test provokes one on purpose
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    assert not errors, f"browser console errors: {errors}"


@pytest.fixture
def page(browser, server):
    """The long-context model's page, 12 tokens per reply."""
    yield from fresh_page(browser, server.url, max_tokens=12)


@pytest.fixture
def small_page(browser, small_server):
    """The 256-token model's page with the default 512 tokens per reply: more than the whole context."""
    yield from fresh_page(browser, small_server.url, max_tokens=512)


def set_settings(driver, **overrides) -> None:
    settings = {"temperature": 0, "top_k": 0, "max_tokens": 12, "system_prompt": "", "api_key": "", **overrides}
    driver.execute_script("localStorage.setItem('nanochat.settings', arguments[0]);", json.dumps(settings))


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.02,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def reload(driver) -> None:
    """Reload and wait for the model name, the last thing the page fills in when it starts."""
    driver.refresh()
    wait(driver, lambda d: d.find_element(By.ID, "model-name").text.startswith("nanochat-"))


def messages(driver) -> list[tuple[str, str]]:
    """(role, shown text) per message, read in one script call: the list re-renders while a reply streams."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#messages .message')].map(n => "
        "[n.classList.contains('user') ? 'user' : 'assistant', n.querySelector('.content').innerText.trim()]);")
    return [tuple(row) for row in rows]


def last_meta(driver) -> str:
    return driver.execute_script("const m = document.querySelectorAll('#messages .message .meta');"
                                 "return m.length ? m[m.length - 1].innerText : '';")


def idle(driver) -> bool:
    return driver.find_element(By.ID, "send").is_displayed()


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def send_and_wait(driver, text: str) -> None:
    """Send, then wait for the reply to finish (its stats line appears when the stream has ended)."""
    count = len(messages(driver))
    send(driver, text)
    wait(driver, lambda d: len(messages(d)) == count + 2 and idle(d) and last_meta(d) != "")


def stats(server) -> dict:
    return httpx.get(f"{server.url}/stats").json()


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_send_streams_the_reply(page):
    set_settings(page, max_tokens=1500)
    reload(page)
    send(page, "hi there")
    lengths = set()
    wait(page, lambda d: not idle(d))
    while not idle(page):
        lengths.add(len(messages(page)[-1][1]))
    final = messages(page)
    assert final == [("user", "hi there"), ("assistant", LONG_WORD * 1500)]
    partial = {n for n in lengths if 0 < n < len(LONG_WORD) * 1500}
    assert len(partial) >= 3, f"the reply should appear piece by piece, saw lengths {sorted(lengths)}"
    assert "1500 tokens" in last_meta(page)


def test_stop_aborts_and_frees_the_worker(page, server):
    set_settings(page, max_tokens=7000)
    reload(page)
    before = stats(server)["requests_cancelled"]
    send(page, "go on forever")
    wait(page, lambda d: len(messages(d)[-1][1]) > 20)
    page.find_element(By.ID, "stop").click()
    wait(page, idle)
    stopped_at = messages(page)[-1][1]
    time.sleep(0.3)
    assert messages(page)[-1][1] == stopped_at and 0 < len(stopped_at) < len(LONG_WORD) * 7000
    assert "stopped" in last_meta(page)
    deadline = time.monotonic() + 5
    while stats(server)["workers_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    current = stats(server)
    assert current["workers_busy"] == 0 and current["requests_cancelled"] == before + 1


def test_regenerate_and_edit(page, server):
    send_and_wait(page, "first question")
    send_and_wait(page, "second question")
    assert [role for role, _ in messages(page)] == ["user", "assistant"] * 2
    served = stats(server)["requests_served"]
    page.find_element(By.CSS_SELECTOR, ".message.assistant:last-child .regenerate").click()
    wait(page, lambda d: stats(server)["requests_served"] == served + 1)
    wait(page, idle)
    assert len(messages(page)) == 4 and messages(page)[-1] == ("assistant", LONG_WORD * 12)

    page.find_elements(By.CSS_SELECTOR, ".message.user .edit")[0].click()
    editor = page.find_element(By.CSS_SELECTOR, ".message.user .editor")
    editor.clear()
    editor.send_keys("edited question")
    page.find_element(By.CSS_SELECTOR, ".save-edit").click()
    wait(page, lambda d: len(messages(d)) == 2 and idle(d))
    assert messages(page) == [("user", "edited question"), ("assistant", LONG_WORD * 12)]


def test_copy_puts_the_message_on_the_clipboard(page, server):
    page.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url,
                                                     "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    send_and_wait(page, "copy me")
    button = page.find_element(By.CSS_SELECTOR, ".message.assistant .copy")
    button.click()
    wait(page, lambda d: button.text == "Copied")
    read_clipboard = "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0]('ERR ' + e));"
    wait(page, lambda d: d.execute_async_script(read_clipboard) == LONG_WORD * 12, timeout=5)


def test_history_survives_reload(page):
    send_and_wait(page, "remember this chat")
    page.find_element(By.ID, "new-chat").click()
    send_and_wait(page, "and this one")
    reload(page)
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
    titles = [li.text for li in page.find_elements(By.CSS_SELECTOR, "#history li .open")]
    assert titles == ["and this one", "remember this chat"]
    assert messages(page)[0] == ("user", "and this one")
    page.find_elements(By.CSS_SELECTOR, "#history li .open")[1].click()
    assert messages(page) == [("user", "remember this chat"), ("assistant", LONG_WORD * 12)]
    page.find_element(By.CSS_SELECTOR, "#history li.current .delete").click()
    assert len(page.find_elements(By.CSS_SELECTOR, "#history li")) == 1 and messages(page) == []


XSS_REPLY = """Here is **bold**, *italic* and `code`.

<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>

- first <b>item</b>
- second [link](https://example.com) and [bad](javascript:window.__xss=3)

```html
<script>window.__xss = 4</script>
```"""


def test_model_output_renders_as_text_never_html(page):
    conversation = {"id": "cxss", "title": "xss", "mode": "chat", "updated": 1,
                    "messages": [{"role": "user", "content": "<i>not italic</i>"},
                                 {"role": "assistant", "content": XSS_REPLY}]}
    page.execute_script("localStorage.setItem('nanochat.conversations', arguments[0]);"
                        "localStorage.setItem('nanochat.current', '\"cxss\"');", json.dumps([conversation]))
    reload(page)
    wait(page, lambda d: len(messages(d)) == 2)
    reply = page.find_element(By.CSS_SELECTOR, ".message.assistant .content")
    assert page.execute_script("return window.__xss") is None
    assert not reply.find_elements(By.CSS_SELECTOR, "img, script, b, i")
    assert '<img src=x onerror="window.__xss = 1">' in reply.text
    assert reply.find_element(By.TAG_NAME, "strong").text == "bold"
    assert reply.find_element(By.TAG_NAME, "em").text == "italic"
    assert [li.text for li in reply.find_elements(By.TAG_NAME, "li")][0] == "first <b>item</b>"
    links = reply.find_elements(By.TAG_NAME, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.com/"]
    assert reply.find_element(By.CSS_SELECTOR, "pre.code-block code").text == "<script>window.__xss = 4</script>"
    assert reply.find_element(By.CSS_SELECTOR, "pre.code-block .copy-code").text == "Copy"
    assert page.find_element(By.CSS_SELECTOR, ".message.user .content").text == "<i>not italic</i>"
    screenshot(page, "ui-markdown-light.png")


def test_sse_parser_handles_split_lines_and_utf8(page):
    result = page.execute_async_script("""
        const done = arguments[0];
        import('/ui/sse.js').then(({ createSSEParser }) => {
          const text = 'data: {"t": "é€😀"}\\r\\n\\r\\n: keep-alive\\n\\n' +
                       'data: line1\\ndata: line2\\n\\ndata: [DONE]\\n\\n';
          const bytes = new TextEncoder().encode(text);
          const outcomes = new Set();
          for (let cut = 0; cut <= bytes.length; cut++) {
            for (const step of [1, 3]) {
              const events = [];
              const parser = createSSEParser((data) => events.push(data));
              parser.push(bytes.slice(0, cut));
              for (let i = cut; i < bytes.length; i += step) parser.push(bytes.slice(i, i + step));
              parser.end();
              outcomes.add(JSON.stringify(events));
            }
          }
          done([...outcomes]);
        }).catch((e) => done(['ERROR ' + e]));
    """)
    assert result == [json.dumps(['{"t": "é€😀"}', "line1\nline2", "[DONE]"], ensure_ascii=False,
                                 separators=(",", ":"))]


def test_context_fitting_keeps_the_system_prompt_and_whole_characters(page):
    """context.js against a counting function with known answers: one token per code point, 40-token context."""
    result = page.execute_async_script("""
        const done = arguments[0];
        import('/ui/context.js').then(async ({ fitChat, fitPrompt }) => {
          const count = async (body) => ({
            count: body.prompt !== undefined ? Array.from(body.prompt).length
                                             : body.messages.reduce((n, m) => n + m.content.length, 0),
            context: 40,
          });
          const turns = ['u0'.repeat(4), 'a0'.repeat(4), 'u1'.repeat(4), 'a1'.repeat(4), 'u2'.repeat(4)]
            .map((content, i) => ({ role: i % 2 ? 'assistant' : 'user', content }));
          const chat = await fitChat(turns, 'sys', 100, count);
          const raw = await fitPrompt('😀'.repeat(50), 100, count);
          const tooLong = await fitChat([{ role: 'user', content: 'x'.repeat(40) }], '', 100, count)
            .then(() => 'sent', (e) => e.message);
          done({ chat, raw, tooLong });
        }).catch((e) => done('ERROR ' + e));
    """)
    chat, raw = result["chat"], result["raw"]
    assert [m["content"][:2] for m in chat["messages"]] == ["sy", "u1", "a1", "u2"]
    assert chat["maxTokens"] == 40 - 27 and chat["capped"], "3 + 3 × 8 tokens leave 13 (a reserve of 10 is met)"
    assert chat["notice"] == "The 2 oldest messages were left out: they no longer fit the model's 40-token context."
    assert raw["prompt"] == "😀" * 27, "cut to 90 % of the 30-token budget, never inside a surrogate pair"
    assert raw["maxTokens"] == 40 - 27
    assert result["tooLong"] == "Your message needs 40 tokens, but this model's context is 40 tokens; shorten it."


def test_server_errors_are_shown_readably(page):
    set_settings(page, temperature=5)  # the settings dialog refuses this; stored settings can still hold it
    reload(page)
    send(page, "too hot")
    banner = wait(page, lambda d: d.find_element(By.ID, "error-banner") if d.find_element(
        By.ID, "error-banner").is_displayed() else False)
    assert banner.text.startswith("Error 400: temperature: Input should be less than or equal to 2")
    assert "temperature" in page.find_element(By.CSS_SELECTOR, ".message.assistant .error-text").text


def test_raw_completion_mode(page, server):
    served = stats(server)["requests_served"]
    page.find_element(By.CSS_SELECTOR, "#mode option[value='raw']").click()
    send_and_wait(page, "Once upon a time")
    assert messages(page) == [("user", "Once upon a time"), ("assistant", LONG_WORD * 12)]
    assert page.find_element(By.CSS_SELECTOR, ".message.user .role").text == "Prompt"
    assert stats(server)["requests_served"] == served + 1
    assert page.find_element(By.CSS_SELECTOR, "#history li .badge").text == "raw"


def test_phone_width_and_dark_theme(page):
    send_and_wait(page, "Tell me about **markdown** on a phone")
    page.execute_script("localStorage.setItem('nanochat.theme', '\"dark\"');")
    page.set_window_size(390, 844)
    reload(page)
    wait(page, lambda d: len(messages(d)) == 2)
    assert page.execute_script("return document.documentElement.dataset.theme") == "dark"
    background = page.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(23, 24, 28)"
    sidebar = page.find_element(By.ID, "sidebar")
    assert sidebar.rect["x"] + sidebar.rect["width"] <= 1, "the side list is a closed drawer on a phone"
    width = page.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, "nothing may overflow the phone's width"
    screenshot(page, "ui-phone-dark.png")
    page.find_element(By.ID, "toggle-sidebar").click()
    wait(page, lambda d: d.find_element(By.ID, "sidebar").rect["x"] >= 0)
    screenshot(page, "ui-phone-dark-drawer.png")
    page.set_window_size(1280, 860)
    page.execute_script("localStorage.setItem('nanochat.theme', '\"light\"');")
    reload(page)
    wait(page, lambda d: len(messages(d)) == 2)
    screenshot(page, "ui-desktop-light.png")


def test_settings_dialog_saves_and_validates(page):
    page.find_element(By.ID, "open-settings").click()
    dialog = page.find_element(By.ID, "settings")
    assert dialog.is_displayed()
    temperature = page.find_element(By.ID, "set-temperature")
    temperature.clear()
    temperature.send_keys("5")
    page.find_element(By.ID, "settings-save").click()
    assert dialog.is_displayed(), "an out-of-range temperature must keep the dialog open"
    temperature.clear()
    temperature.send_keys("0.5")
    page.find_element(By.ID, "set-system").send_keys("Answer briefly.")
    screenshot(page, "ui-settings-light.png")
    page.find_element(By.ID, "settings-save").click()
    wait(page, lambda d: not dialog.is_displayed())
    saved = json.loads(page.execute_script("return localStorage.getItem('nanochat.settings')"))
    assert saved["temperature"] == 0.5 and saved["system_prompt"] == "Answer briefly."


def test_api_key_from_settings(browser, server_root):
    with serve_checkpoint(server_root, "base", api_key="ui-secret") as keyed:
        browser.get(f"{keyed.url}/")
        browser.execute_script("localStorage.clear();")
        browser.refresh()
        wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "API key needed (⚙)")
        send(browser, "hello?")
        banner = wait(browser, lambda d: d.find_element(By.ID, "error-banner").is_displayed())
        assert banner
        assert browser.find_element(By.CSS_SELECTOR, "#error-banner .text").text.startswith("Error 401:")
        set_settings(browser, api_key="ui-secret")
        reload(browser)
        browser.find_element(By.CSS_SELECTOR, ".message.assistant .regenerate").click()
        wait(browser, lambda d: messages(d) == [("user", "hello?"), ("assistant", LONG_WORD * 12)] and idle(d))


# ---------------------------------------------------------------------------------------------------------
# A conversation longer than the model's context (the demo's 256 tokens): never a 400, and the page says what
# the model did not see.

def logged_requests(server) -> list[dict]:
    return [json.loads(line) for path in sorted((server.root / "log").glob("*.jsonl"))
            for line in path.read_text().splitlines()]


def chat_tokens(server, messages: list[dict]) -> int:
    return len(server.tokenizer.render_for_completion({"messages": messages}))


def store_conversation(driver, conversation: dict) -> None:
    driver.execute_script("localStorage.setItem('nanochat.conversations', arguments[0]);"
                          "localStorage.setItem('nanochat.current', JSON.stringify(arguments[1]));",
                          json.dumps([conversation]), conversation["id"])
    reload(driver)


def notice(driver) -> str:
    return driver.execute_script("const n = document.querySelectorAll('#messages .message.assistant .notice');"
                                 "return n.length ? n[n.length - 1].innerText : '';")


def test_chat_longer_than_the_context_drops_the_oldest_turns(small_page, small_server):
    history = []
    for turn in range(6):
        history.append({"role": "user", "content": f"Question {turn}: the cat sat on the mat, and then what did "
                                                   f"the dog do in the garden after lunch on day {turn}?"})
        history.append({"role": "assistant", "content": f"Answer {turn}: the dog ran around the garden, dug a hole "
                                                        f"and slept in the sun until the evening of day {turn}."})
    assert chat_tokens(small_server, history + [{"role": "user", "content": "x"}]) > 2 * SMALL_CONTEXT
    store_conversation(small_page, {"id": "clong", "title": "long", "mode": "chat", "updated": 1,
                                    "messages": history})
    before = len(logged_requests(small_server))
    send_and_wait(small_page, "And what happened next?")
    assert not small_page.find_element(By.ID, "error-banner").is_displayed()
    wait(small_page, lambda d: len(logged_requests(small_server)) == before + 1)
    sent = logged_requests(small_server)[-1]
    conversation = history + [{"role": "user", "content": "And what happened next?"}]
    dropped = len(conversation) - len(sent["messages"])
    assert dropped > 0 and sent["messages"] == conversation[dropped:]
    assert notice(small_page) == (f"The {dropped} oldest messages were left out: they no longer fit the model's "
                                  f"{SMALL_CONTEXT}-token context.")
    prompt_tokens = chat_tokens(small_server, sent["messages"])
    reserve = SMALL_CONTEXT // 4
    assert prompt_tokens + reserve <= SMALL_CONTEXT < chat_tokens(small_server, conversation[dropped - 2:]) + reserve, \
        "only as many turns as needed are dropped"
    assert sent["completion_tokens"] == SMALL_CONTEXT - prompt_tokens, "the reply gets all the room left"
    assert messages(small_page)[-1] == ("assistant", LONG_WORD * sent["completion_tokens"])
    assert "context full" in last_meta(small_page)
    assert len(messages(small_page)) == len(conversation) + 1, "the page still shows the whole conversation"
    screenshot(small_page, "ui-context-dropped.png")


def test_chat_message_longer_than_the_context_is_refused_in_the_page(small_page, small_server):
    served = stats(small_server)["requests_served"]
    small_page.execute_script("document.getElementById('input').value = arguments[0];", "the cat sat " * 200)
    send(small_page, "?")
    wait(small_page, lambda d: idle(d) and d.find_element(By.ID, "error-banner").is_displayed())
    text = small_page.find_element(By.CSS_SELECTOR, "#error-banner .text").text
    assert text.startswith("Your message needs ") and text.endswith(
        f"but this model's context is {SMALL_CONTEXT} tokens; shorten it.")
    assert stats(small_server)["requests_served"] == served and stats(small_server)["requests_rejected"] == 0


def test_raw_prompt_longer_than_the_context_keeps_its_end(small_page, small_server):
    small_page.find_element(By.CSS_SELECTOR, "#mode option[value='raw']").click()
    prompt = "".join(f"Line {i}: once upon a time a cat sat on a mat. " for i in range(40)) + "The end"
    assert len(small_server.tokenizer.encode(prompt)) > 2 * SMALL_CONTEXT
    before = len(logged_requests(small_server))
    small_page.execute_script("document.getElementById('input').value = arguments[0];", prompt)
    count = len(messages(small_page))
    small_page.find_element(By.ID, "input").send_keys(Keys.ENTER)
    wait(small_page, lambda d: len(messages(d)) == count + 2 and idle(d) and last_meta(d) != "")
    assert not small_page.find_element(By.ID, "error-banner").is_displayed()
    wait(small_page, lambda d: len(logged_requests(small_server)) == before + 1)
    sent = logged_requests(small_server)[-1]
    cut = len(prompt) - len(sent["prompt"])
    assert cut > 0 and prompt[cut:] == sent["prompt"]
    assert notice(small_page) == (f"The first {cut} characters of the prompt were left out: they do not fit the "
                                  f"model's {SMALL_CONTEXT}-token context.")
    prompt_tokens = 1 + len(small_server.tokenizer.encode(sent["prompt"]))  # <|bos|> first
    assert prompt_tokens <= SMALL_CONTEXT - SMALL_CONTEXT // 4
    assert sent["completion_tokens"] == SMALL_CONTEXT - prompt_tokens
    assert messages(small_page)[0] == ("user", prompt), "the page still shows the whole prompt"
