"""`gill demo` in a real headless browser: Debian's Chromium driven by selenium through Debian's chromedriver.

The page is served on a free loopback port in this process (the same `serve` that `gill demo` calls), on the bundled
shapes-world model when it is installed. The test uploads an image, sends a message, waits for the answer's text and
image, sends a second turn and waits for its answer below the first, checks that the page asked nothing of any other
host, resets the chat, and saves a screenshot (`GILL_DEMO_SCREENSHOT=path` writes a copy there: how docs/demo.png is
made).

Skipped, with the reason, when gradio, selenium, chromium or chromedriver is missing (a fresh clone); CI installs them
(`.ci/run`: chromium and chromium-driver with apt; `scripts/setup.sh --test`: gradio and selenium) and sets
GILL_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from urllib.parse import urlparse

import pytest

CHROMIUM = os.environ.get("GILL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GILL_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# A screenshot run (docs/demo.png) uses a taller window, so that both turns fit in the chat.
WINDOW_SIZE = "1280,1800" if os.environ.get("GILL_DEMO_SCREENSHOT") else "1280,1000"
WAIT_PAGE_S, WAIT_ANSWER_S = 60, 90  # bounds, far above what an idle machine needs (a few seconds each)
# The shapes-world model was trained on context chains like these; it answers each with a caption and an image.
USER_TEXT = "now the same shape in blue :"
SECOND_TEXT = "now a triangle :"


def _missing() -> str | None:
    for module, extra in (("gradio", "demo"), ("selenium", "test")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'gill-pipeline[{extra}]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {package})"
    return None


if _missing() and os.environ.get("GILL_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"GILL_REQUIRE_BROWSER=1 but the browser test cannot run: {_missing()}")
pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test: {_missing()}")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_demo():
    """The demo page on a free loopback port; the server is closed on the way out, whatever happened."""
    from gill_pipeline.commands.options import default_model, load_pipeline
    from gill_pipeline.demo import build_demo, serve

    model = default_model()
    pipe = load_pipeline(model, "cpu", None)
    pipe.set_progress_bar_config(disable=True)
    # Few denoising steps keep the turn short; everything else is the model's preset, as `gill demo` uses it. A
    # screenshot run (docs/demo.png) uses the preset's steps too.
    settings = {} if os.environ.get("GILL_DEMO_SCREENSHOT") else {"steps": 2}
    demo = build_demo(pipe, model=model, settings=settings)
    port = free_loopback_port()
    try:
        serve(demo, host="127.0.0.1", port=port, block=False)
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()
        shutil.rmtree(demo.gill_backend.images_dir, ignore_errors=True)


@contextlib.contextmanager
def chromium():
    """Headless Chromium through chromedriver, with a fresh profile; both processes end on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gill_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--window-size={WINDOW_SIZE}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # Every request the page makes, to check below that it stays on this machine.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(WAIT_PAGE_S)
        driver.set_script_timeout(WAIT_PAGE_S)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        with contextlib.suppress(Exception):
            service.stop()  # chromedriver, if quit could not reach it
        shutil.rmtree(profile, ignore_errors=True)


def requested_hosts(driver) -> set[str]:
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def test_demo_in_a_real_browser(tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from gill_pipeline.bundled.presets import example_image
    from gill_pipeline.commands.options import default_model

    # The model's own example picture (for the shapes world: a small red circle), under a name found again below.
    upload = tmp_path / "upload.png"
    example_image(default_model()).save(upload)
    start = time.perf_counter()
    with served_demo() as (url, demo), chromium() as driver:
        served_at = time.perf_counter()
        driver.get(url)
        text_box = WebDriverWait(driver, WAIT_PAGE_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#gill-input textarea")
        )
        # The paper clip's file input (hidden, as file inputs are): selenium hands it the file as a user's pick would.
        driver.find_element(By.CSS_SELECTOR, "#gill-input input[type=file]").send_keys(str(upload))
        WebDriverWait(driver, WAIT_PAGE_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gill-input img"))

        def answer_images(d) -> list:
            return [
                img for img in d.find_elements(By.CSS_SELECTOR, "#gill-chatbot img")
                if "/image_" in (img.get_attribute("src") or "")
            ]

        def send_and_wait(text: str, images_before: int) -> list:
            """Sends a turn; waits (bounded) until the answer is complete with a new image loaded in the page."""
            # The box is locked while a turn is answered.
            WebDriverWait(driver, WAIT_PAGE_S).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "#gill-input textarea").is_enabled()
            )
            text_box = driver.find_element(By.CSS_SELECTOR, "#gill-input textarea")
            text_box.send_keys(text)
            text_box.send_keys(Keys.ENTER)

            def answered(d):
                images = answer_images(d)
                done = "Answered in" in d.find_element(By.ID, "gill-status").text
                loaded = images and d.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", images[-1]
                )
                return images if done and loaded and len(images) > images_before else False

            try:
                return WebDriverWait(driver, WAIT_ANSWER_S).until(answered)
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / "timeout.png"))
                pytest.fail(
                    f"no answer to {text!r} after {WAIT_ANSWER_S} s; the page shows: "
                    f"{driver.find_element(By.TAG_NAME, 'body').text!r} (screenshot: {tmp_path / 'timeout.png'})"
                )

        # Turn 1: the uploaded image and a message.
        first = send_and_wait(USER_TEXT, 0)
        chatbot = driver.find_element(By.ID, "gill-chatbot")
        page_text = chatbot.text
        assert USER_TEXT in page_text
        user_images = [
            img for img in driver.find_elements(By.CSS_SELECTOR, "#gill-chatbot img")
            if "upload" in (img.get_attribute("src") or "")
        ]
        assert user_images, "the uploaded image is not shown in the chat"
        # The answer: images labelled with their source and the decision head's probabilities, and text.
        # (gradio does not put a file's alt_text on the <img>; the caption below each image carries it.)
        assert "image, p(generate)=" in page_text and "p(retrieve)=" in page_text
        assert all(os.path.basename(urlparse(img.get_attribute("src")).path).endswith(".png") for img in first)
        answer_text = [
            line for line in page_text.split(USER_TEXT, 1)[1].splitlines()
            if line.strip() and "p(generate)=" not in line
        ]
        assert answer_text, f"no answer text in the chat: {page_text!r}"

        # Turn 2, text only: the conversation goes on below the first turn.
        send_and_wait(SECOND_TEXT, len(first))
        answered_at = time.perf_counter()
        page_text = chatbot.text
        assert page_text.index(USER_TEXT) < page_text.index(SECOND_TEXT)
        assert "image, p(generate)=" in page_text.split(SECOND_TEXT, 1)[1]
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "demo.png"))
        if os.environ.get("GILL_DEMO_SCREENSHOT"):
            driver.save_screenshot(os.environ["GILL_DEMO_SCREENSHOT"])

        # Nothing but this machine was asked for anything (gradio analytics, fonts, CDNs).
        hosts = requested_hosts(driver)
        assert hosts <= {"127.0.0.1"}, f"the page reached other hosts: {sorted(hosts)}"

        # Reset empties the chat.
        driver.find_element(By.CSS_SELECTOR, "#gill-reset").click()
        WebDriverWait(driver, WAIT_PAGE_S).until(
            lambda d: USER_TEXT not in d.find_element(By.ID, "gill-chatbot").text
        )
    print(
        f"browser test: served after {served_at - start:.1f} s, answered in the page after "
        f"{answered_at - served_at:.1f} s, {time.perf_counter() - start:.1f} s in all"
    )
