"""The pipeline as a user watches it: a real luigid, its API and visualiser, reports and the leaderboard.

A tiny RunAll runs once against a `luigid` on a free loopback port. The scheduler's API must
then show every task DONE with its last progress, each with its own significant parameters and
its upstream tasks as Family@version, in a graph that follows the stages; headless Chromium
(Debian's chromium and chromium-driver, driven through Selenium) must render the visualiser's
task list and graph readably, a report and the leaderboard. Screenshots go to $TEST_ARTIFACTS
(default build/test-artifacts/).
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
from tasks import Report, RunAll, Stage, Train
from tasks.runs import whole_dag
from tests.conftest import REPO, free_port, install_luigi_config, restore_luigi_config, tiny_config

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
# Longer than any step takes on a loaded machine: reached only by a hang.
HANG_S = 300
FAMILIES = {"Download", "PlanConversion", "ConvertShard", "Convert", "Train", "Evaluate", "Predict", "Report",
            "Bless", "RunAll", "RunRecord"}
# The longest a task's details may be in the visualiser's task list: at the test's 1400 px window
# its Details column wraps at about 40 characters, so a task reads in at most five lines. The
# longest today is Train's (about 150: its own significant parameters, the model params among
# them, and its Convert); the Report row, upstream tasks escaped inside strings, was over 800.
READABLE_DETAILS = 200
# Tasks in the graph: each family once, ConvertShard once per shard (3 splits x tiny_config's 2 shards).
TASKS = len(FAMILIES) - 1 + 6
# A task as the scheduler shows another (an upstream one, or the stage a part belongs to): Family@version.
SHOWN_UPSTREAM = re.compile(r"[A-Z]\w+@[0-9a-f]{12}")


@dataclass
class ScheduledRun:
    ui: str
    succeeded: bool
    results: Path
    report: Path
    train_dir: Path
    root_id: str
    versions: dict[str, str]


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, mnist_subset):
    root = tmp_path_factory.mktemp("scheduled")
    port = free_port()
    ui = start_scheduler(root / "luigid", port=port)
    original = luigi.configuration.LuigiConfigParser.instance()
    install_luigi_config(tiny_config(root, mnist_subset.as_uri()))
    try:
        succeeded = luigi.build([RunAll()], scheduler_host="127.0.0.1", scheduler_port=port, log_level="WARNING")
        versions = {task.get_task_family(): task.version for task in whole_dag(RunAll()) if isinstance(task, Stage)}
        yield ScheduledRun(ui, succeeded, root / "results", Path(Report().marker),
                           Path(Train().directory), RunAll().task_id, versions)
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


def test_the_scheduler_shows_significant_parameters_and_upstream_versions(scheduled_run):
    tasks = scheduler_api(scheduled_run.ui, "task_list", status="DONE", upstream_status="", search="")
    by_family = {task["name"]: task for task in tasks.values()}
    version = scheduled_run.versions

    def upstream(*families: str) -> str:
        return ", ".join(f"{family}@{version[family]}" for family in families)

    # Their own significant parameters, nothing insignificant (batch_size, rerun), and each upstream by version.
    assert by_family["Evaluate"]["params"] == {"split": "test", "upstream": upstream("Train")}
    assert by_family["Report"]["params"] == {"upstream": upstream("Evaluate", "Predict", "Bless")}
    assert by_family["RunRecord"]["params"] == {"upstream": upstream("Evaluate", "Report", "Predict", "Bless")}
    assert by_family["RunAll"]["display_name"] == f"RunAll(upstream={upstream('Train')})"
    assert by_family["Train"]["params"]["upstream"] == upstream("Convert")
    assert json.loads(by_family["Train"]["params"]["params"]) == {"conv_filters": [8], "dense_units": 16}
    assert "save_checkpoints_steps" not in by_family["Train"]["params"]
    assert "source_url" not in by_family["Download"]["params"]
    # Convert's parts by what is their own and the Convert they belong to.
    assert by_family["PlanConversion"]["params"] == {"of": upstream("Convert")}
    assert sorted((shard["params"]["split"], shard["params"]["index"], shard["params"]["of"])
                  for shard in tasks.values() if shard["name"] == "ConvertShard") == \
        [(split, str(index), upstream("Convert")) for split in ("test", "train", "validation") for index in (0, 1)]
    for task in tasks.values():
        assert "\\" not in task["display_name"], task["display_name"]
        shown = task["params"].get("upstream") or task["params"].get("of")
        assert (shown is None) == (task["name"] == "Download"), task["params"]
        assert shown is None or all(map(SHOWN_UPSTREAM.fullmatch, shown.split(", "))), shown

    # The graph follows the stages: the record requires the stages, Convert its shards.
    graph = scheduler_api(scheduled_run.ui, "dep_graph", task_id=scheduled_run.root_id)
    deps = {task["name"]: sorted(graph[dep]["name"] for dep in task["deps"]) for task in graph.values()}
    assert deps["RunRecord"] == ["Bless", "Convert", "Download", "Evaluate", "Predict", "Report", "Train"]
    assert deps["Convert"] == ["ConvertShard"] * 6


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


def task_table(session, ui: str) -> list[list[str]]:
    """The text of each cell of the visualiser's task list, every task listed and shown."""
    session.get(f"{ui}/static/visualiser/index.html")

    def rows():
        return session.find_elements("css selector", "#taskTable tbody tr")

    # The task table fills in from the scheduler's API after the page loads; show every row.
    wait_for(session, lambda: any(row.text.startswith("DONE") for row in rows()))
    session.execute_script("$('#taskTable').DataTable().page.len(-1).draw();")
    return wait_for(session, lambda: len(cells := [[cell.text for cell in row.find_elements("css selector", "td")]
                                                   for row in rows()]) == TASKS and cells)


@pytest.mark.browser
def test_visualiser_lists_every_pipeline_task_as_done(scheduled_run, browser):
    rows = task_table(browser, scheduled_run.ui)
    screenshot(browser, "visualiser.png")

    assert {name for _, name, *_ in rows} == FAMILIES
    assert all(status.startswith("DONE") for status, *_ in rows), "a task is not DONE"


@pytest.mark.browser
def test_task_details_and_the_graph_read_without_escapes(scheduled_run, browser):
    # Name and Details, the table's second and third columns.
    rows = [row[1:3] for row in task_table(browser, scheduled_run.ui)]
    screenshot(browser, "task-list.png")

    assert {name for name, _ in rows} == FAMILIES
    for name, details in rows:
        assert "\\" not in details, f"{name}: {details}"
        assert len(details) <= READABLE_DETAILS, f"{name}: {len(details)} characters: {details}"
    details = dict(rows)
    assert details["Evaluate"] == f"split=test, upstream=Train@{scheduled_run.versions['Train']}"
    assert details["RunAll"] == f"upstream=Train@{scheduled_run.versions['Train']}"

    browser.get(f"{scheduled_run.ui}/static/visualiser/index.html#tab=graph&visType=svg"
                f"&taskId={scheduled_run.root_id}")
    nodes = wait_for(browser, lambda: len(found := browser.find_elements(
        "css selector", "#graphPlaceholder svg .graph-node-a")) == TASKS and found)
    title = browser.find_element("css selector", "#dependencyTitle").text
    screenshot(browser, "graph.png")
    assert title == f"RunAll(upstream=Train@{scheduled_run.versions['Train']})"
    assert sorted(node.get_attribute("data-task-id").split("_")[0] for node in nodes) == \
        sorted([*FAMILIES - {"ConvertShard"}, *["ConvertShard"] * 6])
    # Each node's popover lists the task's details, as the task list does.
    popovers = browser.execute_script(
        "return $('#graphPlaceholder svg g').map((i, g) => $(g).data('bs.popover')?.options.content).get();")
    assert len(popovers) == TASKS and not any("\\" in content for content in popovers), popovers


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


@pytest.mark.browser
def test_a_failed_tasks_error_shows_no_secret_of_its_source_url(luigid, file_server, luigi_config, tmp_path,
                                                                browser):
    """Luigi's scheduler keeps what a worker sends it and shows it in a failed task's error
    ("Command to re-run"): a Download's source_url, user:password and signature, is never sent."""
    from tasks import Download

    secrets = ("reader", "s3cret", "deadbeef")
    url = file_server.url("/gone.tar.gz?X-Amz-Signature=deadbeef").replace("http://", "http://reader:s3cret@")
    luigi_config(tiny_config(tmp_path, url))
    download = Download()
    assert not luigi.build([download], scheduler_host="127.0.0.1", scheduler_port=luigid, log_level="CRITICAL")
    assert file_server.requests["/gone.tar.gz?X-Amz-Signature=deadbeef"] >= 1, "the Download never ran"
    ui = f"http://127.0.0.1:{luigid}"
    error = scheduler_api(ui, "fetch_error", task_id=download.task_id)
    assert error["taskFamily"] == "Download" and error["taskParams"]["dataset"] == "tiny", error
    assert not any(secret in json.dumps(error) for secret in secrets), error

    # The task list's "Show error" button of the failed task, as a user opens it.
    browser.get(f"{ui}/static/visualiser/index.html")
    wait_for(browser, lambda: browser.find_elements("css selector", "#taskTable tbody .showError"))[0].click()
    modal = wait_for(browser, lambda: (text := browser.find_element("css selector", "#errorModal").text)
                     and "Command to re-run" in text and text)
    screenshot(browser, "error-modal.png")
    assert "luigi --module tasks.stages Download" in modal and "--dataset \"tiny\"" in modal, modal
    assert "HTTP 404" in modal and not any(secret in modal for secret in secrets), modal
