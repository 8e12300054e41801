"""The web page in a real browser (Debian's chromium, driven by playwright): a file
uploaded is transcribed with its subtitles offered, and the live mode streams the
microphone (a clip played as the fake capture device) and shows the clip's words."""

from __future__ import annotations

import shutil

import pytest

from helpers import SPEECH_DIR, joined

playwright = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright: "
                                                              "pip install -e '.[test]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the page test drives Debian's chromium: "
                                                         "apt-get install chromium")

from test_server import _InProcess, _wait_ready  # noqa: E402

from maxwhisper.server import ServerSettings  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def page_server(tiny_en):
    s = _InProcess(ServerSettings(model="tiny.en", max_batch=4), lambda: tiny_en)
    _wait_ready(s.url)
    yield s
    s.close()


def _browser(p, *extra):
    return p.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, *extra])


def test_upload_shows_the_transcript_and_subtitles(page_server):
    with playwright.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page()
        page.goto(page_server.url)
        page.wait_for_selector("text=ready")
        page.set_input_files("#file", str(SPEECH_DIR / "03.wav"))
        page.click("button[type=submit]")
        page.wait_for_selector("a.download >> text=VTT", timeout=120_000)
        assert "Wednesday" in page.inner_text("#transcript")
        assert page.get_attribute("a.download >> text=SRT", "download") == "03.srt"
        browser.close()


def test_live_mode_shows_the_words_of_the_microphone(page_server, tmp_path):
    import soundfile as sf

    audio, _ = joined(["03", "04"], gap_s=1.0)
    clip = tmp_path / "mic.wav"
    sf.write(clip, audio, 16000, subtype="PCM_16")
    with playwright.sync_playwright() as p:
        browser = _browser(p, f"--use-file-for-fake-audio-capture={clip}")
        page = browser.new_page()
        page.goto(page_server.url)
        page.wait_for_selector("text=ready")
        page.click("#start")
        page.wait_for_selector("#live-status >> text=listening", timeout=60_000)
        page.wait_for_function("document.getElementById('committed').textContent.includes('Wednesday')",
                               timeout=120_000)
        page.wait_for_function("document.getElementById('committed').textContent.includes('children')",
                               timeout=120_000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.click("#stop")
        browser.close()
