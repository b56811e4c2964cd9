"""The page in a real headless browser (Debian's chromium driven by Playwright) against a real
``atlas serve`` (uvicorn on a free port) over a real Neo4j: the prompt list, a circuit, a click
on a node, a paths query. Screenshots go to ``tests/artifacts/web/`` (or
``$ATLAS_TEST_ARTIFACTS/web``). Set-up installs chromium; without it this test fails, unless
``ATLAS_SKIP_BROWSER`` is set."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas.graph import NodeKind
from atlas.render import select_nodes
from atlas.services._proc import free_port
from atlas.store import read
from tests import REPO_ROOT
from tests.web.conftest import World, fingerprint

pytestmark = pytest.mark.timeout(600)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def artifacts() -> Path:
    root = Path(os.environ.get("ATLAS_TEST_ARTIFACTS") or REPO_ROOT / "tests" / "artifacts")
    out = root / "web"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[str]:
    """``atlas serve``'s app under uvicorn on a free loopback port."""
    import uvicorn

    from atlas.web.app import create_app

    port = free_port()
    app = create_app(world.settings, driver=world.driver)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def browser_page(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("ATLAS_SKIP_BROWSER"):
            pytest.skip("ATLAS_SKIP_BROWSER is set and /usr/bin/chromium is missing")
        pytest.fail(
            "/usr/bin/chromium is missing: run dev/setup.sh (it installs chromium), "
            "or set ATLAS_SKIP_BROWSER=1 to skip the browser test",
            pytrace=False,
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 950},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            context.close()


def test_prompt_list_circuit_node_and_paths_in_a_browser(
    world: World, server: str, browser_page: Any
) -> None:
    from playwright.sync_api import expect

    page = browser_page
    shots = artifacts()
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on(
        "request",
        lambda req: (
            None
            if req.url.startswith((server, f"blob:{server}", "data:"))
            else outside.append(req.url)
        ),
    )
    before = fingerprint(world.driver)

    # the prompt list, then a job filter
    page.goto(server + "/")
    rows = page.locator("#prompt-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 4
    page.screenshot(path=str(shots / "01-prompts.png"), full_page=True)
    page.select_option("#prompt-filters select[name=job]", world.job_id)
    page.click("#prompt-filters button[type=submit]")
    expect(rows).to_have_count(2)

    # open a circuit
    g = world.graphs[0]
    page.locator("#prompt-table tbody tr", has_text=g.prompt_id[:12]).click()
    page.wait_for_url(f"**#/prompt/{g.prompt_id}")
    nodes = page.locator('#circuit svg g[id^="node-"]')
    nodes.first.wait_for()
    back, _ = read.export_graph(world.driver, g.prompt_id)
    assert nodes.count() == len(select_nodes(back, 60))
    assert page.locator("#prompt-text").inner_text() == g.metadata.prompt
    page.screenshot(path=str(shots / "02-circuit.png"), full_page=True)

    # zoom and pan change the view box
    svg = page.locator("#circuit svg")
    box0 = svg.get_attribute("viewBox")
    page.click("#circuit .controls button[title='zoom in']")
    assert svg.get_attribute("viewBox") != box0
    page.click("#circuit .controls button[title='whole circuit']")
    assert svg.get_attribute("viewBox") == box0

    # click the labelled feature's node: its card
    layer, index = world.labelled
    nid = next(
        back.node_ids()[i]
        for i in range(back.n_nodes)
        if back.kind[i] == NodeKind.FEATURE
        and (int(back.layer[i]), int(back.feature[i])) == (layer, index)
    )
    page.locator(f'#circuit svg g[id="node-{nid}"]').click()
    expect(page.locator("#node-title")).to_have_text("finger count")
    expect(page.locator("#circuit svg .selection-ring")).to_have_count(1)
    panel = page.locator("#node-panel").inner_text()
    assert f"{layer}/{index}" in panel and "logit lens" in panel and "strongest inputs" in panel
    page.screenshot(path=str(shots / "03-node.png"), full_page=True)

    # a paths query: its routes table and picture
    page.goto(server + "/#/queries")
    answer = read.prompt_circuit(world.driver, g.prompt_id)["token_texts"]
    top = max(
        (i for i in range(g.n_nodes) if g.kind[i] == NodeKind.LOGIT),
        key=lambda i: float(g.logit_prob[i]),
    )
    target = "logit:" + answer[int(g.token_id[top])].strip()
    page.fill("#form-paths input[name=from]", "supernode:Hand")
    page.fill("#form-paths input[name=to]", target)
    page.fill("#form-paths input[name=max_hops]", "3")
    page.click("#form-paths button[type=submit]")
    routes = page.locator("#paths-aggregate tbody tr")
    routes.first.wait_for()
    want = read.paths(world.driver, "supernode:Hand", target, max_hops=3, limit=20)
    assert routes.count() == len(want["aggregate"][:20])
    picture = page.locator("#picture-paths")
    expect(picture).to_have_js_property("complete", True)
    assert picture.evaluate("img => img.naturalWidth") > 0
    page.locator("#result-paths").screenshot(path=str(shots / "04-paths.png"))

    # the other views load without errors (screenshots for people to look at)
    for name, hash_ in [
        ("05-feature", f"#/feature/{layer}/{index}"),
        ("06-supernode", "#/supernode/Hand"),
        ("07-intervention", f"#/intervention/{world.intervention_id}"),
        ("08-features", "#/features"),
    ]:
        page.goto(server + "/" + hash_)
        expect(page.locator("#view")).not_to_contain_text("Loading")
        for img in page.locator("#view img").all():
            expect(img).to_have_js_property("complete", True)
        assert not page.locator("#view .error").count(), page.locator("#view").inner_text()[:300]
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    # an image prompt: thumbnails in its circuit, and its rollout heatmap
    page.goto(server + f"/#/prompt/{world.image.prompt_id}")
    expect(page.locator('#circuit svg g[id^="thumb-"]').first).to_be_attached()
    page.fill("#heatmap-form input[name=tokens]", "0,3")
    page.click("#heatmap-form button[type=submit]")
    heat = page.locator("#heatmap-picture")
    expect(heat).to_have_js_property("complete", True)
    assert heat.evaluate("img => img.naturalWidth") == 64 * 6  # enlarged to >= 384 px
    page.screenshot(path=str(shots / "09-image-prompt.png"), full_page=True)

    assert not errors, errors
    assert not outside, outside
    assert fingerprint(world.driver) == before
