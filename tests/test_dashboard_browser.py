"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): log in with a token, read every deployment's status word, open one (cold-start phases, alerts, events), press Scale, follow a rollout to its end."""
from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import PY, ROOT, deployment_yaml
from gateway.haproxy_config import ACTIVATOR
from gateway.haproxy_plane import runtime_dir
from gateway.haproxy_runtime import RuntimeApi

ARTIFACTS = ROOT / ".pytest-artifacts"


def make_token(s, name: str, role: str) -> str:
    """A token of the API's own (controller.auth), made by the serve's admin as an operator would."""
    resp = s.post("/api/tokens", json={"name": name, "role": role})
    assert resp.status_code == 200, resp.text
    return resp.json()["token"]


@pytest.fixture
def browser():
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, ("the dashboard test needs Debian's chromium and chromium-driver "
                                     "(apt-get install chromium chromium-driver; .ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager never tries to download anything.
    drv = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def shot(drv, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    drv.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def text(drv, css: str) -> str | None:
    """The shown text of the first element matching `css` (None: no such element), read in one
    step inside the page. The live regions are replaced (innerHTML) every 2 s, so an element
    found by one WebDriver call may be gone by the next (StaleElementReferenceException): on a
    loaded machine a refresh between `find_element` and `.text` was the flake of this file."""
    got = drv.execute_script("var e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css)
    return None if got is None else got.strip()


def status_of(drv, name: str) -> str | None:
    return text(drv, f'tr[data-name="{name}"] .status')


def haproxy_gateway_requests(s) -> int:
    """Requests HAProxy handed to the gateway (its activator backend: everything not routed
    straight to an instance, the dashboard included)."""
    raw = RuntimeApi(str(runtime_dir(s.state_dir) / "haproxy.sock")).command("show stat")
    rows = csv.DictReader(io.StringIO(raw.lstrip("# ")))
    return sum(int(r["stot"] or 0) for r in rows if r["pxname"] == ACTIVATOR and r["svname"] == "BACKEND")


HELLO_ALERT = "alerts: [{metric: restarts, above: 5, for: 1m}]"


def test_log_in_see_status_words_open_a_deployment_and_scale_it(serve, browser, data_plane):
    """Both data planes: in haproxy mode every page and action goes through HAProxy."""
    crash = f"{PY} -c 'import sys; print(\"no weights\"); sys.exit(4)' ${{PORT}}"
    s = serve({
        "hello.yaml": deployment_yaml("hello", min_replicas=1, max_replicas=3, extra_spec=HELLO_ALERT),
        "lazy.yaml": deployment_yaml("lazy"),
        "crashy.yaml": deployment_yaml("crashy", crash, min_replicas=1),
        "paused.yaml": deployment_yaml("paused", state="stopped"),
    })
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="hello running")
    assert f"data plane {data_plane}" in s.log()
    operator = make_token(s, "ui-operator", "operator")
    through_haproxy = haproxy_gateway_requests(s) if data_plane == "haproxy" else 0
    drv = browser
    wait = WebDriverWait(drv, 60, poll_frequency=0.2)

    drv.get(s.url + "/ui/")
    assert "Log in" in drv.find_element(By.TAG_NAME, "h1").text  # nothing readable without a session
    drv.get(s.url + "/ui/login?token=wrong-token-123")
    assert "not known" in drv.find_element(By.ID, "login-error").text

    drv.get(s.url + f"/ui/login?token={operator}")
    wait.until(lambda d: d.current_url.rstrip("/").endswith("/ui"))
    assert drv.find_element(By.ID, "role").text == "operator"
    cookie = next(c for c in drv.get_cookies() if c["name"] == "autodeploy_ui")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert drv.execute_script("return document.cookie") == ""  # scripts cannot read the session
    expected = {"hello": "Running", "lazy": "Standby", "crashy": "Failing", "paused": "Stopped"}
    wait.until(lambda d: all(status_of(d, n) == w for n, w in expected.items()))  # live refresh included
    # The cause, from its log: its row may be redrawn by a refresh while crashy restarts again.
    failing = wait.until(lambda d: (t := text(d, 'tr[data-name="crashy"] .error')) and "exited with code 4" in t
                         and t.endswith("no weights") and t)
    assert "exited with code 4" in failing
    names = drv.execute_script(  # in one step: the rows are redrawn by the live refresh
        "return Array.prototype.map.call(document.querySelectorAll('a.dep-link'), function (a) {"
        " return a.innerText.trim(); });")
    assert names == sorted(expected)
    shot(drv, f"1-list-{data_plane}")
    if data_plane == "haproxy":  # only the browser asked since: pages, login, scripts, live fragments
        assert haproxy_gateway_requests(s) - through_haproxy >= 5

    drv.find_element(By.LINK_TEXT, "hello").click()
    wait.until(lambda d: text(d, "#dep-name") == "hello")
    assert text(drv, "#instance-count") == "1"
    assert text(drv, "#status-word") == "Running"
    assert drv.find_elements(By.CSS_SELECTOR, "svg#chart-latency") and drv.find_elements(By.CSS_SELECTOR,
                                                                                         "svg#chart-rate")
    wait.until(lambda d: text(d, "#log") not in (None, "", "no instance running"))
    iid = s.instances("hello")[0]["id"]
    # The sections an operator reads at 3 a.m.: how the instance started (phases), the alert
    # rule's state, and the events. Read in one step each: the live refresh redraws them.
    starts = wait.until(lambda d: (t := text(d, "#cold-starts")) and iid in t and t)
    assert "minReplicas" in starts and "ready" in starts, starts
    assert re.search(r"\d+(\.\d+)? ?ms", starts), starts  # the phase columns carry durations
    alerts = wait.until(lambda d: text(d, "#alerts"))
    assert "ok" in alerts and "restarts > 5 for 1m" in alerts, alerts
    events = wait.until(lambda d: (t := text(d, "#events")) and "ready" in t and t)
    assert iid in events and "applied" in events, events
    shot(drv, f"2-deployment-{data_plane}")

    box = drv.find_element(By.ID, "replicas")
    box.clear()
    box.send_keys("2")
    drv.find_element(By.ID, "scale").click()
    wait.until(lambda d: "keeping 2 instance" in (text(d, "#notice") or ""))
    wait.until(lambda d: text(d, "#instance-count") == "2")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#instances tr[data-instance]")) == 2)
    assert len(s.instances("hello")) == 2
    audit = [e["message"] for e in s.status("hello")["events"] if e["kind"] == "audit"]
    assert any(m.startswith("scale(") and "by token ui-operator (operator) via the dashboard: done" in m
               for m in audit), audit  # the audit trail names the dashboard session's token
    assert "replicas" in (text(drv, "#drift") or "")  # the scale shows as drift from the file
    shot(drv, f"3-scaled-{data_plane}")

    # A new revision committed to the file: the page follows its rollout to the end.
    (s.deployments / "hello.yaml").write_text(
        deployment_yaml("hello", min_replicas=1, max_replicas=3, extra_spec=HELLO_ALERT).replace("version: v1",
                                                                                              "version: v2"))
    rolled = wait.until(lambda d: (t := text(d, "#rollout")) and "succeeded" in t and t)
    assert "rolling" in rolled and re.search(r"revision 1\s*→\s*2\b", rolled), rolled
    shot(drv, f"4-rolled-out-{data_plane}")


def test_viewer_cannot_act_and_a_forged_action_is_refused(serve, browser):
    import requests
    s = serve({"hello.yaml": deployment_yaml("hello", min_replicas=1)})
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="hello running")
    viewer_token, operator_token = make_token(s, "ui-viewer", "viewer"), make_token(s, "ui-op", "operator")
    drv = browser
    drv.get(s.url + f"/ui/login?token={viewer_token}")
    drv.get(s.url + "/ui/d/hello")
    assert not drv.find_elements(By.ID, "scale")
    cookie = next(c for c in drv.get_cookies() if c["name"] == "autodeploy_ui")["value"]
    csrf = drv.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")  # the logout form's
    viewer = requests.post(s.url + "/ui/d/hello/scale", data={"replicas": 2, "csrf": csrf},
                           cookies={"autodeploy_ui": cookie}, allow_redirects=False, timeout=10)
    assert viewer.status_code == 403 and viewer.json()["code"] == 1052
    anonymous = requests.post(s.url + "/ui/d/hello/scale", data={"replicas": 2}, allow_redirects=False, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 1051
    operator = requests.get(s.url + f"/ui/login?token={operator_token}", allow_redirects=False, timeout=10)
    op_cookie = operator.cookies["autodeploy_ui"]
    no_csrf = requests.post(s.url + "/ui/d/hello/stop", cookies={"autodeploy_ui": op_cookie},
                            allow_redirects=False, timeout=10)
    assert no_csrf.status_code == 403 and no_csrf.json()["code"] == 1053
    assert s.status("hello")["state"] == "running"
    s.post("/api/tokens/revoke", json={"name": "ui-op"})
    assert requests.get(s.url + f"/ui/login?token={operator_token}", allow_redirects=False,
                        timeout=10).status_code == 401  # a revoked token no longer logs in
    shot(drv, "4-viewer")
