"""The pipeline as a user watches it: a real luigid, its API and visualiser, reports and the leaderboard.

A tiny RunAll runs once against a `luigid` on a free loopback port. The scheduler's API must
then show every task DONE with its last progress, and headless Chromium (Debian's chromium and
chromium-driver, driven through Selenium) must render the visualiser, a report and the
leaderboard. Screenshots go to $TEST_ARTIFACTS (default build/test-artifacts/).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from dataclasses import dataclass

import luigi
import luigi.configuration
import pytest

from tasks.services import start_scheduler, stop_scheduler
from tasks import Report, RunAll, Train
from tests.conftest import REPO, free_port, install_luigi_config, restore_luigi_config, tiny_config

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
# Longer than any step takes on a loaded machine: reached only by a hang.
HANG_S = 300
FAMILIES = {"Download", "PlanConversion", "ConvertShard", "Convert", "Train", "Evaluate", "Predict", "Report",
            "RunAll", "RunRecord"}


@dataclass
class ScheduledRun:
    ui: str
    succeeded: bool
    results: Path
    report: Path
    train_dir: Path


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, mnist_subset):
    root = tmp_path_factory.mktemp("scheduled")
    port = free_port()
    ui = start_scheduler(root / "luigid", port=port)
    original = luigi.configuration.LuigiConfigParser.instance()
    install_luigi_config(tiny_config(root, mnist_subset.as_uri()))
    try:
        succeeded = luigi.build([RunAll()], scheduler_host="127.0.0.1", scheduler_port=port, log_level="WARNING")
        yield ScheduledRun(ui, succeeded, root / "results", Path(Report().marker),
                           Path(Train().directory))
    finally:
        restore_luigi_config(original)
        stop_scheduler(root / "luigid")


def scheduler_api(ui: str, method: str, **data) -> dict:
    url = f"{ui}/api/{method}?data={urllib.parse.quote(json.dumps(data))}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["response"]


def test_every_task_is_done_on_the_scheduler_with_its_last_progress(scheduled_run):
    assert scheduled_run.succeeded
    tasks = scheduler_api(scheduled_run.ui, "task_list", status="", upstream_status="", search="")
    assert {task["name"] for task in tasks.values()} == FAMILIES
    assert {task["status"] for task in tasks.values()} == {"DONE"}

    by_family: dict[str, list[dict]] = {}
    for task in tasks.values():
        by_family.setdefault(task["name"], []).append(task)

    [train] = by_family["Train"]
    assert re.fullmatch(r"12/12 steps - loss \d+\.\d{4}", train["status_message"])
    assert train["progress_percentage"] == 100
    [record] = by_family["RunRecord"]
    tracking = urllib.parse.urlsplit(record["tracking_url"])
    assert tracking.netloc == "127.0.0.1:6006" and scheduled_run.train_dir.name.replace("-", r"\-") in \
        urllib.parse.unquote(tracking.query)
    assert all(re.fullmatch(r"(\d+)/\1 images - \w+ shard \d", shard["status_message"])
               for shard in by_family["ConvertShard"])
    [download] = by_family["Download"]
    assert re.fullmatch(r"(\d+)/\1 bytes - mnist_subset\.tar\.gz", download["status_message"])
    # One batch for the loss and the model's metrics, one for the predictions the accuracy comes from.
    assert by_family["Evaluate"][0]["status_message"] == "2/2 batches"
    assert by_family["Predict"][0]["status_message"] == "1/1 batches - 18 images"


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI {message}; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Without the background-networking flags Chromium keeps dialling out, which a closed network refuses.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1800"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    # ChromeDriver gives up on a renderer that has not answered within the page-load timeout, a
    # screenshot included: on a busy machine a busy renderer is no failure, so this bound only
    # catches a hang. What each step needs is waited for as a condition (`wait_for`).
    session.set_page_load_timeout(HANG_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield session
    session.quit()


def wait_for(session, condition, timeout_s: float = HANG_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The visualiser redraws its table as the scheduler's answers arrive: a row read mid-redraw is stale.
    return WebDriverWait(session, timeout_s, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda _: condition())


def page_ready(session) -> bool:
    """Whether the page and every image on it have finished loading."""
    return session.execute_script("return document.readyState === 'complete' && "
                                  "Array.from(document.images).every(i => i.complete);")


def screenshot(session, name: str) -> None:
    wait_for(session, lambda: page_ready(session))
    session.save_screenshot(str(ARTIFACTS / name))


def images_rendered(session) -> list[bool]:
    return session.execute_script(
        "return Array.from(document.images, i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);")


@pytest.mark.browser
def test_visualiser_lists_every_pipeline_task_as_done(scheduled_run, browser):
    browser.get(f"{scheduled_run.ui}/static/visualiser/index.html")
    # The task table fills in from the scheduler's API after the page loads; show every row.
    wait_for(browser, lambda: any(row.text.startswith("DONE")
                                  for row in browser.find_elements("css selector", "#taskTable tbody tr")))
    browser.execute_script("$('#taskTable').DataTable().page.len(-1).draw();")
    rows = wait_for(browser, lambda: [row.text for row in browser.find_elements("css selector", "#taskTable tbody tr")
                                      if row.text.startswith("DONE")])
    screenshot(browser, "visualiser.png")

    listed = {row.split("\n")[0].split()[1] for row in rows}
    assert listed == FAMILIES
    assert len(browser.find_elements("css selector", "#taskTable tbody tr")) == len(rows), "a task is not DONE"


@pytest.mark.browser
def test_report_and_leaderboard_render_metrics_and_images(scheduled_run, browser):
    metrics = json.loads((scheduled_run.report.parent.parent / "metrics.json").read_text())

    browser.get(scheduled_run.report.as_uri())
    screenshot(browser, "report.png")
    cards = browser.find_element("css selector", "#metrics").text
    assert f"{metrics['accuracy']:.4f}" in cards and f"{metrics['loss']:.4f}" in cards
    rendered = images_rendered(browser)
    wrong = sum(row["precision"] < 1 or row["recall"] < 1 for row in metrics["per_class"].values())
    assert rendered and all(rendered), rendered
    shown_wrong = len(browser.find_elements("css selector", "#misclassified img"))
    charts = browser.find_elements("css selector", "#curves img")
    assert len(rendered) == 1 + len(charts) + shown_wrong, "the confusion matrix, the charts, the mistakes"
    assert (shown_wrong > 0) == (wrong > 0), "misclassified images are shown exactly when there are mistakes"
    assert [chart.get_attribute("alt") for chart in charts] == ["loss over training", "accuracy over training"]
    assert all(chart.size["width"] > 300 and chart.size["height"] > 150 for chart in charts)
    per_class = browser.find_element("css selector", "#per-class").text
    assert all(name in per_class for name in metrics["per_class"])

    browser.get((scheduled_run.results / "leaderboard.html").as_uri())
    screenshot(browser, "leaderboard.png")
    [row] = browser.find_elements("css selector", "#leaderboard tbody tr")
    assert scheduled_run.train_dir.name in row.text and f"{metrics['accuracy']:.4f}" in row.text
    row.find_element("link text", "report").click()
    wait_for(browser, lambda: browser.current_url == scheduled_run.report.as_uri() and page_ready(browser))
    assert all(images_rendered(browser))
