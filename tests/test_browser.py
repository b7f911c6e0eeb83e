"""The course as a learner meets it, in JupyterLab in a real (headless) Chromium.

Two kinds of test, so that no notebook is executed twice for the same proof (nbval already
runs every cell of every notebook and compares each output with the committed one):

- every chapter notebook is OPENED as committed: no error output, every figure rendered,
  its printed results on the page, no widget error (widget views need a live kernel: the
  explorers' logic is tested in tests/test_widgets_viz.py, their views below);
- the learner's own path - the menu Run > Run All Cells, in JupyterLab's kernel - on the
  notebooks that exercise what only the browser can show: `mpiexec -n 4` started from the
  lab's kernel (00), widgets built live and answering (01, 03), figures rendered by
  matplotlib's inline backend (00, 01, 03), with the same checks after the run.

Screenshots land in test-artifacts/browser/. The notebooks live on a copy, so JupyterLab's
autosave never touches the committed files.

Needs Debian's chromium (`make test` installs it when it can, as root) and the playwright
Python package (never `playwright install`: its browser download fails here). Without
Chromium every test here is SKIPPED with the reason, and `make test` prints a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
# Run All in the browser: MPI from the lab's kernel (00), live widgets (01, 03), figures
RUN_ALL = ("00_setup", "01_attention", "03_positional_encoding")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("TFCOURSE_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LAB_SETTINGS = {
    # render every cell (JupyterLab 4 otherwise only renders the visible ones)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # no "Would you like to receive official Jupyter news?" toast
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}
RUN_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: browser tests NOT run "
                       "(install Debian's `chromium` package, or run `make test` as root)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server from this venv on a copy of notebooks/; yields (base_url, token)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO_ROOT / "notebooks", root / "notebooks")
    settings = root / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), "tfcourse-browser-test"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(bin_dir / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root / 'notebooks'}",
               f"--LabApp.user_settings_dir={settings}",
               f"--LabApp.workspaces_dir={root / 'workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            assert server.poll() is None, "jupyter lab exited during start-up"
            time.sleep(0.5)
    else:
        pytest.fail("JupyterLab did not answer within 60 s")
    yield base, token
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def expected_from_committed(path: Path) -> tuple[int, list[str]]:
    """(number of PNG figures, printed lines that must appear) of the committed notebook.

    Lines from cells whose output is not compared (NBVAL_IGNORE_OUTPUT) or that hold
    measured values ("~") are left out: they differ from run to run."""
    nb = nbformat.read(path, as_version=4)
    figures, lines = 0, []
    for cell in nb.cells:
        if cell.cell_type != "code" or "NBVAL_IGNORE_OUTPUT" in cell.source:
            continue
        for output in cell.outputs:
            figures += "image/png" in output.get("data", {})
            if output.output_type == "stream" and output.name == "stdout":
                lines += [line.strip() for line in output.text.splitlines()
                          if line.strip() and "~" not in line]
    return figures, lines


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def run_all_cells(page, timeout_s: float, attempts: int = 3) -> list[str]:
    """Menu Run > Run All Cells, then wait until every code cell has an execution count.

    If no cell has started ("[*]" or a count) 30 s after the click, the kernel was not ready
    to take the request (seen in CI right after start-up: every prompt back to "[ ]"), so the
    click is repeated, at most `attempts` times; a run that starts and then fails still fails."""
    deadline = time.monotonic() + timeout_s
    prompts: list[str] = []
    for _ in range(attempts):
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        started_by = time.monotonic() + 30
        while time.monotonic() < deadline:
            prompts = [p.strip() for p in
                       page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]
            if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
                return prompts
            if time.monotonic() > started_by and all(p == "[ ]:" for p in prompts):
                break  # nothing started: ask again
            time.sleep(0.5)
        else:
            break
    page.screenshot(path=str(ARTIFACTS / "run-all-timeout.png"))
    pytest.fail(f"notebook did not finish within {timeout_s} s; prompts: {prompts}")


def open_notebook(page, base: str, token: str, path: Path) -> None:
    page.on("dialog", lambda dialog: dialog.dismiss())
    # a workspace of its own: only this notebook is open (no tabs restored from others)
    page.goto(f"{base}/lab/workspaces/{path.stem}/tree/{path.name}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=60_000)


def wait_until_rendered(page, path: Path, live_widgets: bool, timeout_s: float = 30) -> None:
    """Wait (at most timeout_s) until the committed number of figures, and the explorers'
    widget views, are on the page - no fixed sleeps; check_page then says what is missing."""
    figures, _ = expected_from_committed(path)
    want_widgets = live_widgets and "_explorer()" in path.read_text()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (page.locator(".jp-RenderedImage img").count() >= figures
                and (not want_widgets or page.locator(".jupyter-widgets").count() > 0)):
            return
        time.sleep(0.2)


def check_page(page, path: Path, screenshot: str, live_widgets: bool) -> None:
    """No error output, figures and printed results on the page, and (`live_widgets`, after a
    run) the explorers' widget views rendered."""
    page.screenshot(path=str(ARTIFACTS / screenshot))
    errors = page.locator(".jp-OutputArea-output[data-mime-type="
                          "'application/vnd.jupyter.stderr']").all_inner_texts()
    assert errors == [], f"{path.name}: error output in the browser:\n{errors[0][:2000]}"
    text = normalise(page.locator(".jp-Notebook").inner_text())
    for bad in ("Loading widget", "Error displaying widget", "Traceback"):
        assert bad not in text, f"{path.name}: '{bad}' on the page"
    figures, lines = expected_from_committed(path)
    rendered = page.locator(".jp-RenderedImage img").count()
    assert rendered >= figures, f"{path.name}: {rendered} figures rendered, {figures} expected"
    missing = [line for line in lines if normalise(line) not in text]
    assert missing == [], f"{path.name}: printed lines missing from the page: {missing[:5]}"
    if live_widgets and "_explorer()" in path.read_text():
        assert page.locator(".jupyter-widgets").count() > 0, "no widget view rendered"


@pytest.fixture
def page(lab, browser):
    """A fresh browser page on the lab: yields (page, base_url, token)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield page, *lab
    page.close()


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in RUN_ALL],
                         ids=lambda p: p.stem)  # the Run All ones are checked after their run
def test_committed_notebook_renders_in_jupyterlab(path, page):
    page, base, token = page
    open_notebook(page, base, token, path)
    wait_until_rendered(page, path, live_widgets=False)
    check_page(page, path, f"{path.stem}-opened.png", live_widgets=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in RUN_ALL],
                         ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab(path, page):
    page, base, token = page
    open_notebook(page, base, token, path)
    # Run All only once the kernel is attached and idle
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=60_000)
    prompts = run_all_cells(page, RUN_TIMEOUT_S)
    assert len(prompts) == sum(c.cell_type == "code"
                               for c in nbformat.read(path, as_version=4).cells)
    wait_until_rendered(page, path, live_widgets=True)
    check_page(page, path, f"{path.stem}.png", live_widgets=True)
    if path.name == "00_setup.ipynb":
        text = normalise(page.locator(".jp-Notebook").inner_text())
        for rank in range(4):
            assert f"rank {rank} of 4 on host" in text


def test_run_all_covers_mpi_widgets_and_figures():
    """The Run All subset still holds what only the browser shows: an `mpiexec` job from the
    lab's kernel, a live widget explorer and figures."""
    chosen = [p for p in NOTEBOOKS if p.stem in RUN_ALL]
    assert len(chosen) == len(RUN_ALL)
    texts = [p.read_text() for p in chosen]
    assert any("tfcourse.hello" in t for t in texts)
    assert any("_explorer()" in t for t in texts)
    assert any("image/png" in t for t in texts)
