"""The dashboard notebook, the pool panel's Find section against a stand-in of the Hugging Face hub, and the
chat panel's image upload to a tiny vision model, in JupyterLab in a real Chromium (Debian's, driven by
Playwright): what a user sees.

Skips where no ``chromium`` is installed (``.ci/run`` installs it); Playwright never downloads a
browser here. A screenshot of the dashboard is saved under the test's tmp folder (path printed).
"""

import contextlib
import json
import re
import shutil
import time

import pytest
from helpers import ROOT, make_lab
from hub_stand_in import HubStandIn

TOKEN = "browser-test-token"
SETTINGS = {  # JupyterLab's settings for the test: start the notebook's kernel, ask nothing, fetch nothing
    "notebook-extension/tracker": {"autoStartDefaultKernel": True},
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
# counts each change to the chat panel that shows words with the cursor of an unfinished answer:
# a partial answer may show for less than Playwright's polling interval on a busy machine
WATCH_PARTIALS = r"""() => {
    window.partialAnswers = 0;
    new MutationObserver(() => {
        const shown = document.querySelector(".widget-tab .widget-output")?.textContent ?? "";
        if (/\w\s*▌/.test(shown)) window.partialAnswers++;
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install -y chromium)"),
]


# records every width the Find section's download bar takes, in order (a tiny download is over in a second)
WATCH_BAR = r"""() => {
    window.barWidths = [];
    const bar = [...document.querySelectorAll(".widget-hprogress")]
        .find(e => e.textContent.includes("Download")).querySelector(".progress-bar");
    new MutationObserver(records => {
        for (const r of records) window.barWidths.push(r.oldValue);
        window.barWidths.push(bar.getAttribute("style"));
    }).observe(bar, {attributes: true, attributeFilter: ["style"], attributeOldValue: true});
}"""


def write_settings(tmp_path):
    for name, values in SETTINGS.items():
        path = tmp_path / "jupyter" / "jupyterlab_settings_dir" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def button(page, text):
    """The button reading ``text`` (after its icon, which counts in its accessible name)."""
    return page.get_by_role("button", name=re.compile(rf"(^|\W){text}$"))


@contextlib.contextmanager
def notebook_page(sync_api, url: str, notebook: str):
    """Chromium on ``notebook`` in the lab at ``url``, its cells run; yields (the page, the errors it logs)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(f"{url}/lab/tree/{notebook}?token={TOKEN}")
        run_all_cells(page, sync_api.expect)
        yield page, errors
        browser.close()


def run_all_cells(page, expect):
    """Run the open notebook's cells once its kernel is idle; return when the last one has run."""
    expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=60_000)
    for menu, item in (("Edit", "Clear Outputs of All Cells"), ("Run", "Run All Cells")):
        page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    expect(prompts.last).to_have_text(f"[{prompts.count()}]:", timeout=150_000)
    assert "Traceback" not in page.locator(".jp-Notebook").inner_text()


@pytest.fixture
def lab(tmp_path, demo_home):
    """``make lab`` as users run it: JupyterLab on working copies of the notebooks, with their pictures.

    The kernel gets a home of its own, with the demo model linked: its audit log holds only what
    this test does (the screenshot goes into the README).
    """
    pytest.importorskip("jupyterlab", reason="JupyterLab is in the demo extra")
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for model in (demo_home / "models").iterdir():
        (home / "models" / model.name).symlink_to(model.resolve(), target_is_directory=True)
    write_settings(tmp_path)
    with make_lab(tmp_path / "lab", tmp_path / "jupyter", TOKEN, {"MLX_NB_HOME": str(home)}) as url:
        yield url


@pytest.fixture
def hub_lab(tmp_path, tiny_model_path):
    """JupyterLab whose kernel's hub is a stand-in serving a tiny model slowly (a bar has time to move),
    with an empty home and a notebook showing the pool panel; yields (its URL, the stand-in, the home)."""
    import nbformat

    pytest.importorskip("jupyterlab", reason="JupyterLab is in the demo extra")
    hub = HubStandIn()
    hub.add("mlx-community/tiny-chat", tiny_model_path, downloads=900)
    hub.add("mlx-community/tiny-other", tiny_model_path, downloads=5)
    hub.pace = 0.2
    home = tmp_path / "home"
    (tmp_path / "lab").mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from mlx_manager_nb.widgets import pool_panel\npool_panel()")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(notebook, tmp_path / "lab" / "find.ipynb")
    write_settings(tmp_path)
    env = {"MLX_NB_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_TOKEN_PATH": str(tmp_path / "no-token"),
           "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    try:
        with make_lab(tmp_path / "lab", tmp_path / "jupyter", TOKEN, env) as url:
            yield url, hub, home
    finally:
        hub.close()


def test_the_dashboard_notebook_in_jupyterlab(lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the test extra")
    expect = sync_api.expect
    started = time.monotonic()
    committed = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(f"{lab}/lab/tree/02_dashboard.ipynb?token={TOKEN}")
        picture = page.locator("img[alt=\"The dashboard's Audit tab\"]")  # shown before the notebook runs
        expect(picture).to_be_visible(timeout=60_000)
        assert picture.evaluate("img => img.complete && img.naturalWidth") > 0, "the picture did not load"

        # the new kernel runs every cell: the last code cell's prompt then counts them all
        run_all_cells(page, expect)

        # every panel is a rendered widget, not a repr or an error
        dash = page.locator(".widget-tab").first
        expect(dash).to_be_visible()
        for title in ("Pool", "Chat", "Server", "Audit"):
            expect(dash.locator(".lm-TabBar-tab", has_text=title)).to_be_visible()
        notebook = page.locator(".jp-Notebook")
        assert "Error displaying widget" not in notebook.inner_text()
        assert "Tab(children=" not in notebook.inner_text() and "VBox(children=" not in notebook.inner_text()

        def tab(title: str) -> None:
            dash.locator(".lm-TabBar-tab", has_text=title).click()

        # a question from the chat panel streams an answer, rendered as Markdown
        tab("Chat")
        dash.get_by_role("button", name="Clear").click()
        conversation = dash.locator(".widget-output").first
        expect(conversation).to_contain_text("No messages yet")
        dash.get_by_placeholder("Message").fill("What is the capital of France? Answer in one sentence.")
        page.evaluate(WATCH_PARTIALS)
        dash.get_by_role("button", name="Send").click()
        expect(conversation.locator(".jp-RenderedMarkdown", has_text="Paris")).to_be_visible(timeout=60_000)
        expect(conversation).not_to_contain_text("▌", timeout=30_000)
        assert page.evaluate("window.partialAnswers") > 0  # words arrived before the answer ended
        speed = dash.locator(".widget-label", has_text=" tokens · ")
        expect(speed).to_have_text(re.compile(r"\d+ tokens · [\d.–]+ tok/s · stop$"))

        # Stop ends a long answer and keeps its count; the audit panel shows the request at once
        dash.locator(".widget-inline-hbox", has_text="Max tokens").locator("input").fill("400")
        dash.get_by_placeholder("Message").fill("Write a long story about a dragon and a knight.")
        dash.get_by_role("button", name="Send").click()
        expect(dash.locator(".widget-label", has_text="≈")).to_be_visible(timeout=30_000)  # the live rate
        dash.get_by_role("button", name="Stop").click()
        expect(speed).to_have_text(re.compile(r"[1-9]\d* tokens · [\d.–]+ tok/s · stopped$"), timeout=15_000)
        expect(dash.get_by_role("button", name="Send")).to_be_enabled()
        tab("Audit")
        expect(dash.locator("tr", has_text="chat_panel").filter(has_text="cancelled").first).to_be_visible(
            timeout=10_000)

        # the server tab: both base URLs, and a snippet's Copy button copies it
        tab("Server")
        dash.get_by_role("button", name="Start server").click()
        expect(dash.get_by_text("OpenAI:")).to_be_visible(timeout=15_000)
        snippet = dash.locator(".mlx-snippet", has_text="openai").first
        snippet.get_by_role("button", name="Copy").click()
        expect(snippet.get_by_role("button", name="Copied")).to_be_visible()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert 'base_url="http://127.0.0.1:' in copied and 'api_key="unused"' in copied

        tab("Audit")
        time.sleep(0.5)  # the newest rows in place
        shot = tmp_path / "dashboard.png"
        dash.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(shot))
        print(f"\nscreenshot of the dashboard: {shot} ({time.monotonic() - started:.0f} s in the browser)")
        tab("Server")
        dash.get_by_role("button", name="Stop server").click()
        expect(dash.get_by_text("Server stopped.")).to_be_visible(timeout=15_000)
        page.keyboard.press("Control+s")  # saving writes the outputs into the working copy only
        expect(page.locator(".jp-mod-dirty")).to_have_count(0, timeout=15_000)
        browser.close()
    assert errors == []
    assert {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")} == committed
    ran = tmp_path / "lab" / "02_dashboard.ipynb"
    assert ran.read_bytes() != committed[ROOT / "notebooks" / ran.name]  # the lab saved its own copy


def test_the_pool_panels_find_section_searches_downloads_and_removes(hub_lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the test extra")
    expect = sync_api.expect
    url, hub, home = hub_lab
    stored = home / "models" / "mlx-community--tiny-chat"
    with notebook_page(sync_api, url, "find.ipynb") as (page, errors):
        # a search shows the stand-in's repos, most downloaded first, with what a pull fetches
        page.get_by_placeholder("search the Hugging Face hub, e.g. qwen").fill("tiny")
        button(page, "Search").click()
        row = page.locator("tr", has_text="mlx-community/tiny-chat")
        expect(row).to_be_visible(timeout=30_000)
        expect(row).to_contain_text("382.2 KiB")
        expect(page.locator("tr", has_text="mlx-community/tiny-other")).to_be_visible()
        repo = page.locator(".widget-dropdown", has_text="Repo").locator("select")
        expect(repo).to_have_value("mlx-community/tiny-chat")

        # Download: the bar moves, reaches its end and turns green; the model is in the store
        page.evaluate(WATCH_BAR)
        button(page, "Download").click()
        expect(page.get_by_text("Downloaded mlx-community/tiny-chat: load it as")).to_be_visible(timeout=60_000)
        bar = page.locator(".widget-hprogress", has_text="Download").locator(".progress-bar")
        expect(bar).to_have_attribute("style", re.compile(r"width: 100%"))
        expect(bar).to_have_class(re.compile("progress-bar-success"))
        expect(page.get_by_text(re.compile(r"382\.2 KiB of 382\.2 KiB at"))).to_be_visible()
        widths = [float(w) for w in re.findall(r"width: ([\d.]+)%", " ".join(filter(None, page.evaluate(
            "window.barWidths"))))]
        assert widths == sorted(widths) and widths[-1] == 100 and any(0 < w < 100 for w in widths), widths
        assert (stored / "model.safetensors").is_file() and hub.served > 0

        # Remove asks first (its confirm button names the model and its size), then removes it
        local = page.locator(".widget-dropdown", has_text="Local").locator("select")
        label = next(o for o in local.locator("option").all_inner_texts() if o.startswith("mlx-community--tiny-chat"))
        local.select_option(label=label)
        button(page, "Remove").click()
        confirm = page.get_by_role("button", name=re.compile(r"^Remove mlx-community--tiny-chat \([\d.]+ KiB\)$"))
        expect(confirm).to_be_visible()
        assert stored.is_dir()  # nothing removed before the confirm
        confirm.click()
        expect(page.get_by_text("Removed mlx-community--tiny-chat.")).to_be_visible(timeout=15_000)
        expect(confirm).to_be_hidden()
        assert not stored.exists()
        expect(local.locator("option", has_text="mlx-community--tiny-chat")).to_have_count(0)
    assert errors == []


VISION_TOKENS = 12  # of the answer to the image


@pytest.fixture
def vision_lab(tmp_path):
    """JupyterLab with a notebook showing the chat panel over a pool holding the tiny vision model (built
    here), with an empty home; yields (its URL, the model's folder)."""
    import nbformat
    from tiny_vlm import build_tiny_vlm

    pytest.importorskip("jupyterlab", reason="JupyterLab is in the demo extra")
    vlm = build_tiny_vlm(tmp_path / "tiny-vlm")
    (tmp_path / "lab").mkdir()
    cell = (f"from mlx_manager_nb.model_pool import Pool\nfrom mlx_manager_nb.widgets import chat_panel\n"
            f"pool = Pool(keep_alive=None)\npool.load({str(vlm)!r}, alias='vlm')\npanel = chat_panel(pool)\n"
            f"panel.parts.temperature.value, panel.parts.max_tokens.value = 0.0, {VISION_TOKENS}\npanel")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(notebook, tmp_path / "lab" / "vision.ipynb")
    write_settings(tmp_path)
    with make_lab(tmp_path / "lab", tmp_path / "jupyter", TOKEN, {"MLX_NB_HOME": str(tmp_path / "home")}) as url:
        yield url, vlm


def test_the_chat_panels_image_upload_is_answered_with_its_thumbnail(vision_lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the test extra")
    from test_vision import QUESTION, chat, picture, reference

    expect = sync_api.expect
    url, vlm = vision_lab
    img = picture(7)
    img.save(tmp_path / "picture.png")  # lossless: the kernel decodes the very pixels of ``img``
    answer = reference(vlm, chat(QUESTION, img, max_tokens=VISION_TOKENS), VISION_TOKENS, splitting=False)  # a CPU
    with notebook_page(sync_api, url, "vision.ipynb") as (page, errors):
        conversation = page.locator(".widget-output").first
        expect(conversation).to_contain_text("No messages yet")
        with page.expect_file_chooser() as chooser:  # the FileUpload's input, opened by its button
            page.locator(".widget-upload").click()
        chooser.value.set_files(str(tmp_path / "picture.png"))
        expect(page.locator(".widget-upload")).to_contain_text("(1)", timeout=15_000)
        page.get_by_placeholder("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        thumbnail = conversation.locator("img[src^='data:image/png']")
        expect(thumbnail).to_have_count(1, timeout=60_000)
        assert thumbnail.evaluate("img => img.complete && [img.naturalWidth, img.naturalHeight]") == [96, 64]
        expect(conversation).to_contain_text(QUESTION)
        expect(conversation).not_to_contain_text("▌", timeout=60_000)
        shown = " ".join(conversation.inner_text().split())
        assert " ".join(re.sub(r"<[^>]*>", "", answer).split()) in shown, (answer, shown)  # Markdown drops <tags>
    assert errors == []
