"""The page ``segformer-fast serve`` shows at ``/``, in a real headless Chromium (Debian's, driven by Selenium through
the system chromedriver; nothing is downloaded), against a real local server; and the server's shutdown on SIGTERM.

``make browser`` installs chromium and chromium-driver where apt-get can (CI runs it; ``make test`` installs no
system packages); without them the browser test is skipped, saying so (the SIGTERM test runs all the same).
"""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer

from bench_common.local_server import LocalServer, alive

#: where Debian's chromium-driver puts the driver besides /usr/bin
DRIVER_PATHS = ("/usr/lib/chromium/chromedriver",)


def find_browser():
    """(chromium, chromedriver) paths, or None."""
    browser = next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver") or next((p for p in DRIVER_PATHS if os.access(p, os.X_OK)), None)
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    folder = tmp_path_factory.mktemp("serve-page") / "b0"
    Segformer.from_config("b0", num_labels=19, seed=4).save_pretrained(folder)  # Cityscapes' colors
    local = LocalServer(folder, ["--max-batch-size", "2", "--batch-wait-ms", "5"])
    local.start()
    yield local
    left = local.stop()
    local.cleanup()
    assert not left, f"processes left running after the server stopped: {left}"


@pytest.fixture()
def browser():
    found = find_browser()
    if found is None:
        pytest.skip("no Chromium with chromedriver on this machine: `make browser` installs Debian's chromium and "
                    "chromium-driver (apt-get, as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_upload_shows_overlay_and_legend(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rng = np.random.default_rng(12)
    path = tmp_path / "street.png"
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)

    browser.get(server.url)
    WebDriverWait(browser, 60).until(lambda d: "MiT-B0" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", (
        browser.find_element(By.ID, "status").text)

    requests = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/v1/segment'))")
    assert len(requests) == 1 and requests[0].endswith("output=overlay_json"), requests  # one request per upload

    shown = browser.find_element(By.ID, "overlay")
    assert shown.is_displayed()
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", shown) == [120, 90]

    status, _, body = server.call("POST", "/v1/segment?output=json", Path(path).read_bytes(),
                                  {"Content-Type": "image/png"})
    assert status == 200
    expected = json.loads(body)["classes"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr.class")
    legend = [(int(row.get_attribute("data-id")), row.find_element(By.CSS_SELECTOR, "td.name").text,
               row.find_element(By.CSS_SELECTOR, "td.share").text) for row in rows]
    assert legend == [(entry["id"], entry["name"], f"{100 * entry['share']:.2f} %") for entry in expected]
    colors = [browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor",
                                     row.find_element(By.CSS_SELECTOR, ".swatch")) for row in rows]
    assert colors == [f"rgb({int(e['color'][1:3], 16)}, {int(e['color'][3:5], 16)}, {int(e['color'][5:7], 16)})"
                      for e in expected]
    assert browser.find_element(By.ID, "legend").is_displayed()


def test_sigterm_shuts_down_cleanly(server):
    """SIGTERM: the server exits 0 and no process it started (Ray's daemons, workers, replicas) is left."""
    processes = server.track()
    assert any("SegmentModel" in command for _, command in processes.values()), processes
    left = server.stop(signal.SIGTERM)
    assert not left, f"left running: {left}"
    assert server.process.returncode == 0, server.log_tail()
    assert not alive(processes)
