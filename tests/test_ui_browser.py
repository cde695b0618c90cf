"""The web UI in a real browser: Playwright driving Debian's Chromium against real `mldbg ui` / `mldbg serve`
processes on loopback.

Every page is loaded, the numbers it shows are checked against the API (and the confusion matrix against
scikit-learn), filters are clicked, and each page is saved as a screenshot in ``test-artifacts/ui/``.
A test fails on any console error, uncaught exception, or request that leaves the loopback server.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from server_utils import running_server
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix
from test_detection_eval import _record, _tracer as detection_tracer, random_scene
from test_server import _train, _tracer

from mldbg_callbacks.evaluator import Evaluator

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]
RESULT = "all"


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui_store(tmp_path_factory) -> Path:
    """Two classification versions (digits, 3 epochs, evaluated on all epochs) and one 2D detection run."""
    store = tmp_path_factory.mktemp("ui") / "store"
    x, y = load_digits(return_X_y=True)
    digits = x[:600].astype(np.float32), y[:600], np.array([f"d{i:04d}" for i in range(600)])
    for version, seed in (("v1", 0), ("v2", 1)):
        tracer = _tracer(store, version_name=version)
        _train(tracer, digits, epochs=3, seed=seed)
        tracer.wait_for_save()
        Evaluator("digits", version, store=store).request_evaluation(result_name=RESULT, n_epoch=None)
    tracer = detection_tracer(store, num_classes=4)
    _record(tracer, random_scene(np.random.default_rng(0)), "val", 0)
    tracer.wait_for_save()
    Evaluator("det", "v1", store=store).request_evaluation(result_name="r1")
    return store


@pytest.fixture(scope="module")
def ui(ui_store):
    with running_server(ui_store, command="ui") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: run scripts/setup_system.sh (Debian packages chromium, chromium-driver)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh browser context; console errors, page errors and non-loopback requests fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []

    def guard(route):
        url = route.request.url
        if url.startswith(("blob:", "data:", "file:")) or urlparse(url).hostname == "127.0.0.1":
            return route.continue_()
        problems.append(f"request outside the loopback server: {url}")
        return route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    marker = request.node.get_closest_marker("http_errors")  # statuses the test provokes on purpose
    expected = {f"status of {status}" for status in (marker.args if marker else ())}

    def console(message):
        if message.type == "error" and not any(status in message.text for status in expected):
            problems.append(f"console: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    yield page
    context.close()
    assert not problems, problems


def show(page, url: str) -> None:
    page.goto(url)
    rendered(page)


def rendered(page) -> None:
    """Wait until the UI has drawn the page of the current address."""
    page.wait_for_function("() => document.getElementById('app').dataset.route === location.hash", timeout=30_000)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def api(server, path: str, key: str | None = None, **params):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.get(server.url + path, params=params, headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def shown_table(page, testid: str) -> list[dict]:
    """The rows of a table as {column: text}, read from the page."""
    return page.locator(f"[data-testid={testid}]").evaluate(
        """table => [...table.tBodies[0].rows].map(row => Object.fromEntries(
               [...row.cells].map(cell => [cell.dataset.column, cell.textContent.trim()])))""")


def number(text: str) -> float | None:
    text = text.replace("▲", "").replace("▼", "").strip()
    if text == "–":
        return None
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def assert_same(shown: str, value) -> None:
    if isinstance(value, str):
        assert shown == value
    elif isinstance(value, bool):
        assert shown == ("yes" if value else "no")
    elif value is None:
        assert shown == "–"
    else:
        assert number(shown) == pytest.approx(value, rel=1e-3, abs=6e-4), (shown, value)  # 4 digits, or 0.1 %


def assert_table_matches(page, testid: str, rows: list[dict]) -> None:
    shown = shown_table(page, testid)
    assert len(shown) == len(rows)
    for seen, row in zip(shown, rows):
        for column, value in row.items():
            assert_same(seen[column], value)


def assert_heatmaps_match(page, maps: list[dict]) -> None:
    """One figure per matrix of the API, with its title, each cell showing the API's number."""
    figures = page.locator("[data-testid=heatmap]")
    assert figures.count() == len(maps)
    for index, matrix in enumerate(maps):
        figure = figures.nth(index)
        assert figure.locator("figcaption").inner_text() == matrix["title"]
        cells = figure.locator("text.cell").evaluate_all(
            "cells => cells.map(c => [c.dataset.row, c.dataset.column, c.textContent])")
        assert len(cells) == len(matrix["index"]) * len(matrix["columns"])
        for row, column, text in cells:
            assert_same(text, matrix["values"][matrix["index"].index(row)][matrix["columns"].index(column)])


LOCAL = "/v1/projects/local"
DIGITS = f"{LOCAL}/models/digits/versions/v1"


# -- pages -------------------------------------------------------------------------------------------
def test_models_and_version_pages_list_what_the_store_holds(ui, page):
    show(page, ui.url + "/")
    models = shown_table(page, "models")
    assert [(m["model_name"], m["version_name"], m["task"]) for m in models] == [
        ("det", "v1", "object_detection"), ("digits", "v1", "classification"), ("digits", "v2", "classification")]
    screenshot(page, "01-models")

    page.get_by_role("link", name="v1").nth(1).click()  # digits / v1
    rendered(page)
    summary = api(ui, DIGITS)
    grid = shown_table(page, "partitions")
    for partition in summary["partitions"]:
        row = next(r for r in grid if r["dataset_type"] == partition["dataset_type"])
        assert row[f"epoch {partition['n_epoch']}"] == str(partition["rows"])
    assert [r["result_name"] for r in shown_table(page, "results")] == [RESULT]
    screenshot(page, "02-version")


def show_result(page, server, model: str, version: str, result: str) -> tuple[str, dict]:
    """Open a result's evaluation page; returns its API path and the API's answer."""
    show(page, f"{server.url}/#/models/{model}/versions/{version}/results/{result}")
    path = f"{LOCAL}/models/{model}/versions/{version}/results/{result}"
    return path, api(server, path)


def test_evaluation_page_shows_the_apis_numbers_and_sklearns_confusion_matrix(ui, page):
    path, result = show_result(page, ui, "digits", "v1", RESULT)
    assert_table_matches(page, "metrics", result["metrics"])
    assert_table_matches(page, "categories", result["categories"])
    assert page.locator("[data-testid=categories-chart] rect").count() >= len(result["categories"])

    # every error code with its description and recommendation
    cards = page.locator("[data-testid=issue]")
    assert cards.count() == len(result["issues"])
    page.locator("[data-testid=issues] details").evaluate_all("all => all.forEach(d => d.open = true)")
    text = page.locator("[data-testid=issues]").inner_text()
    for issue in result["issues"]:
        assert issue["error_code"] in text and issue["recommendation"] in text and issue["description"] in text

    assert_heatmaps_match(page, api(ui, f"{path}/heatmaps"))

    # the test set's confusion matrix as scikit-learn computes it from the newest epoch's units
    units = api(ui, f"{path}/tables/samples", dataset_type="test", n_epoch=2, limit=10_000)["rows"]
    labels = list(range(10))
    expected = confusion_matrix([u["label"] for u in units], [u["pred"] for u in units], labels=labels)
    figure = page.locator("[data-testid=heatmap]").filter(has_text="Confusion matrix, test")
    for i in labels:
        for j in labels:
            cell = figure.locator(f"text.cell[data-row='{i}'][data-column='{j}']")
            shown = cell.text_content() if cell.count() else "0"  # a class never predicted has no column
            assert int(shown) == expected[i, j]
    screenshot(page, "03-evaluation-classification")


def test_detection_evaluation_shows_class_by_size_heatmap_and_tables(ui, page):
    path, result = show_result(page, ui, "det", "v1", "r1")
    assert_table_matches(page, "metrics", result["metrics"])
    assert_table_matches(page, "per-class", result["per_class"])
    assert_table_matches(page, "tide", result["tide"])
    maps = api(ui, f"{path}/heatmaps")
    assert {"Error rate by class x size, val", "Units by class x error code, val"} <= {m["title"] for m in maps}
    assert_heatmaps_match(page, maps)
    screenshot(page, "04-evaluation-detection")


def test_sample_browser_filters_match_the_api(ui, page):
    base = f"{DIGITS}/results/{RESULT}/tables/samples"
    show(page, f"{ui.url}/#/models/digits/versions/v1/results/{RESULT}/samples")
    assert page.get_by_test_id("samples-total").inner_text() == f"{api(ui, base, limit=1)['total']} units"

    page.get_by_test_id("filter-category").select_option("recessive_hotspot")
    rendered(page)
    expected = api(ui, base, category="recessive_hotspot", limit=50)
    assert page.get_by_test_id("samples-total").inner_text() == f"{expected['total']} units"
    rows = shown_table(page, "samples")
    assert [r["input_id"] for r in rows] == [r["input_id"] for r in expected["rows"]]
    assert {r["category"] for r in rows} == {"recessive hotspot"}
    for seen, row in zip(rows, expected["rows"]):
        for column in ("label", "pred", "error_code", "error_proba", "loss", "region"):
            assert_same(seen[column], row[column])

    code = expected["rows"][0]["error_code"]
    page.get_by_test_id("filter-error_code").select_option(code)
    rendered(page)
    page.get_by_test_id("filter-dataset_type").select_option("train")
    rendered(page)
    page.get_by_test_id("filter-label").select_option(str(expected["rows"][0]["label"]))
    rendered(page)
    page.get_by_test_id("filter-region").fill(str(expected["rows"][0]["region"]))
    page.get_by_test_id("filter-region").press("Enter")
    rendered(page)
    narrowed = api(ui, base, category="recessive_hotspot", error_code=code, dataset_type="train",
                   label=expected["rows"][0]["label"], region=expected["rows"][0]["region"], limit=50)
    assert narrowed["total"] > 0
    assert page.get_by_test_id("samples-total").inner_text() == f"{narrowed['total']} units"
    assert [r["input_id"] for r in shown_table(page, "samples")] == [r["input_id"] for r in narrowed["rows"]]
    screenshot(page, "05-samples-filtered")

    page.get_by_test_id("clear-filters").click()
    rendered(page)
    page.get_by_test_id("next").click()
    rendered(page)
    second = api(ui, base, offset=50, limit=50)
    assert [r["input_id"] for r in shown_table(page, "samples")] == [r["input_id"] for r in second["rows"]]


def test_issue_examples_link_to_their_units(ui, page):
    show(page, f"{ui.url}/#/models/digits/versions/v1/results/{RESULT}")
    card = page.locator("[data-testid=issue]").first
    example = card.locator(".ids a").first
    input_id = example.inner_text()
    example.click()
    rendered(page)
    rows = shown_table(page, "samples")
    assert rows and {r["input_id"] for r in rows} == {input_id}


def test_label_tracker_draws_one_curve_per_label_with_the_apis_values(ui, page):
    show(page, f"{ui.url}/#/models/digits/versions/v1/results/{RESULT}/label-tracker")
    curves = api(ui, f"{DIGITS}/results/{RESULT}/label_tracker", metric="loss", dataset_type="train")
    assert page.locator("[data-testid=label-tracker-chart] polyline").count() == len({r["label"] for r in curves["rows"]})
    assert_table_matches(page, "label-tracker", curves["rows"])
    screenshot(page, "06-label-tracker")

    page.get_by_test_id("filter-metric").select_option("correct")
    rendered(page)
    curves = api(ui, f"{DIGITS}/results/{RESULT}/label_tracker", metric="correct", dataset_type="train")
    assert_table_matches(page, "label-tracker", curves["rows"])


def test_compare_two_versions_side_by_side(ui, page):
    show(page, f"{ui.url}/#/models/digits/versions/v1/results/{RESULT}/compare")
    assert page.get_by_test_id("filter-with").input_value() == f"digits/v2/{RESULT}"
    frame = api(ui, f"{DIGITS}/results/{RESULT}/compare", other_model="digits", other_version="v2",
                other_result=RESULT)
    assert_table_matches(page, "compare", frame["rows"])
    bars = page.locator("[data-testid=compare-chart] text").all_text_contents()
    assert any(t.startswith("v1:all") for t in bars) and any(t.startswith("v2:all") for t in bars)
    screenshot(page, "07-compare")


def test_request_an_evaluation_from_the_version_page(ui, ui_store, page):
    show(page, f"{ui.url}/#/models/digits/versions/v2")
    page.get_by_test_id("result-name").fill("from-ui")
    page.get_by_test_id("evaluate").click()
    page.wait_for_function("() => location.hash.endsWith('/results/from-ui')", timeout=120_000)
    rendered(page)
    saved = Evaluator("digits", "v2", store=ui_store).get_result("from-ui")
    assert_table_matches(page, "metrics", saved.metrics_summary().to_dict("records"))


# -- the HTML report -----------------------------------------------------------------------------------
def test_html_report_file_opens_offline_and_from_the_ui(ui, ui_store, page, tmp_path):
    result = Evaluator("digits", "v1", store=ui_store).get_result(RESULT)
    path = result.to_html(tmp_path / "report.html")
    page.goto(path.as_uri())
    text = page.locator("body").inner_text()
    assert f"{result.metrics_summary()['accuracy'].iloc[-1]:.4g}" in text
    assert page.locator("svg").count() == 5  # two confusion matrices, two class x code, categories by epoch
    screenshot(page, "08-report-file")

    show(page, f"{ui.url}/#/models/digits/versions/v1/results/{RESULT}")
    with page.context.expect_page() as opened:
        page.get_by_test_id("report-link").click()
    report = opened.value
    report.wait_for_load_state()
    assert report.locator("svg").count() == 5 and "digits" in report.title()


# -- mldbg serve: the key form ---------------------------------------------------------------------------
@pytest.mark.http_errors(401, 403, 404)  # a wrong key, a revoked key, another project's run
def test_serve_asks_for_a_key_and_shows_only_that_projects_runs(ui_store, tmp_path, page):
    root = tmp_path / "server"
    shutil.copytree(ui_store, root / "team")
    with running_server(root) as server:
        team, other = server.create_key("team"), server.create_key("other")
        show_key_form = lambda: page.get_by_test_id("key-form").wait_for()  # noqa: E731
        page.goto(server.url + "/")
        show_key_form()
        assert requests.get(f"{server.url}/v1/projects/team/models", timeout=10).status_code == 401

        page.get_by_test_id("key-input").fill("mldbg_not-a-key")
        page.get_by_role("button", name="Open").click()
        assert page.get_by_test_id("key-error").inner_text() == "This key was not accepted."

        page.get_by_test_id("key-input").fill(other)  # a valid key of another project sees none of team's runs
        page.get_by_role("button", name="Open").click()
        rendered(page)
        assert page.get_by_test_id("empty").is_visible() and "project other" in page.get_by_test_id("session").inner_text()
        show(page, f"{server.url}/#/models/digits/versions/v1")
        error = page.get_by_test_id("error").inner_text()
        assert "no traces for model_name='digits'" in error and str(root) not in error  # no server path shown

        page.get_by_test_id("sign-out").click()
        show_key_form()
        page.get_by_test_id("key-input").fill(team)
        page.get_by_role("button", name="Open").click()
        rendered(page)
        page.goto(f"{server.url}/#/models/digits/versions/v1/results/{RESULT}")
        page.reload()  # the key is kept for the tab
        rendered(page)
        result = api(server, f"/v1/projects/team/models/digits/versions/v1/results/{RESULT}", key=team)
        assert_table_matches(page, "metrics", result["metrics"])
        screenshot(page, "09-serve-with-key")

        server.database().revoke_key(_key_id(server, "team"))
        page.reload()
        page.get_by_test_id("key-form").wait_for()
        assert page.get_by_test_id("key-error").inner_text() == "This key was revoked."


def _key_id(server, project: str) -> str:
    rows = [r for r in server.database().list_keys(project) if not r["revoked_at"]]
    return rows[0]["key_id"]


def test_every_asset_ships_in_the_package(ui):
    """No CDN: the page's scripts and stylesheets are the server's own files."""
    index = requests.get(ui.url + "/", timeout=10).text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)""", index)
    assert assets and all(not urlparse(a).netloc for a in assets)
    for asset in assets:
        if not asset.startswith("data:"):
            assert requests.get(f"{ui.url}/{asset}", timeout=10).ok
