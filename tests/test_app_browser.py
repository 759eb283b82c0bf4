"""The search page in a real headless browser (Debian's chromium driven by playwright) against
``python -m thi.app`` on a tiny *trained* run over SynthPEDES with the simulated MLLM: type a
test description, confirm a candidate of the target identity and see the target move up; set
a candidate aside (and undo it); let the MLLM judge; each query kind; bad input; show more;
stale results after an error; the MLLM button for image-only queries; a second identity
confirmed; images of a run copied from another machine (its eval folder names a data root
that does not exist here).

Set ICL_APP_SCREENSHOTS=DIR to keep the screenshots (docs/img/ holds the README's)."""
from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest

from thi.app.launch import start_server

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    message = f"{what} is missing (CI installs it: see .ci/run)"
    if os.environ.get("ICL_REQUIRE_ALL") == "1":
        pytest.fail(f"ICL_REQUIRE_ALL=1 but {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_clip_path, synth_root):
    """RDE on the tiny random CLIP trained from scratch on SynthPEDES (InfoNCE, the demo's
    settings, 4 epochs) and evaluated on the test split."""
    from processor.evaluate import evaluate_run
    from processor.trainer import train
    from utils.config import load_config

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config("configs/synthpedes_tiny.yaml",
                      [f"root_dir={synth_root}", f"output_dir={out}",
                       f"pretrain_choice={tiny_clip_path}", "num_epoch=4", "eval_period=4",
                       "device=cpu", "seed=0", "log_period=1000", "test_batch_size=64"])
    run = str(out / "run")
    train(cfg, run, progress=False)
    evaluate_run(run, device="cpu", progress=False)
    return run


OLD_ROOT = "/gone/old-machine/data"


@pytest.fixture(scope="module")
def copied_run(trained_run, synth_root, tmp_path_factory):
    """The trained run as copied from another machine: its config's root_dir and its eval
    folder's image paths name ``OLD_ROOT``; the data is at ``synth_root`` (``--root``) here."""
    import shutil

    run = str(tmp_path_factory.mktemp("copied") / "run")
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("mllm_cache", "thi"))
    for rel in ("config.yaml", os.path.join("eval", "SynthPEDES", "image_paths.json")):
        path = os.path.join(run, rel)
        with open(path) as f:
            text = f.read()
        assert synth_root in text, rel
        with open(path, "w") as f:
            f.write(text.replace(synth_root, OLD_ROOT))
    return run


@pytest.fixture(scope="module")
def server(copied_run, synth_root, tmp_path_factory):
    """``python -m thi.app`` on a free port; yields its base URL."""
    _need("the playwright package", _has_playwright())
    _need(CHROMIUM, os.path.exists(CHROMIUM))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("srv") / "server.log", "w+")
    # Waits for the server's ready line on its stdout (no polling on a clock); a server that
    # exits first raises with its output.
    proc = start_server(
        [sys.executable, "-m", "thi.app", "--run", copied_run, "--root", synth_root,
         "--dataset", "SynthPEDES", "--backend", "simulated", "--device", "cpu",
         "--no-progress", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(server + "/")
        pg.wait_for_selector("body[data-ready='1']")
        yield pg
        browser.close()


def _shot(page, name):
    folder = os.environ.get("ICL_APP_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        page.screenshot(path=os.path.join(folder, name), full_page=True)


def _click(page, selector, api="/api/search"):
    """Click and wait for the page's API call to come back (and the page to render it)."""
    with page.expect_response(lambda r: api in r.url) as resp:
        page.click(selector)
    return resp.value.json()


def _cards(page):
    return page.eval_on_selector_all(
        ".cand", "els => els.map(e => [Number(e.dataset.g), Number(e.dataset.rank), "
                 "e.dataset.pid === '' ? null : Number(e.dataset.pid)])")


def _pick_query(server, run_dir, low=3, high=15):
    """A test query whose target's best rank is in [low, high] (via the API)."""
    import httpx

    captions = json.load(open(os.path.join(run_dir, "eval", "SynthPEDES", "captions.json")))
    q_pids = np.load(os.path.join(run_dir, "eval", "SynthPEDES", "q_pids.npy"))
    for q in range(len(captions)):
        d = httpx.post(server + "/api/search", data={"kind": "text", "text": captions[q],
                                                     "target_pid": str(int(q_pids[q])),
                                                     "top_k": "40"}).json()
        if low <= d["target"]["rank"] <= high:
            return captions[q], int(q_pids[q]), d
    pytest.fail(f"no test query with its target between ranks {low} and {high}")


def test_type_confirm_and_see_the_target_move_up(page, server, trained_run):
    import httpx

    text, pid, via_api = _pick_query(server, trained_run)
    # only the text kind's inputs show
    assert page.is_visible("#text") and not page.is_visible("#attr-gender")
    assert not page.is_visible("#image")
    page.fill("#text", text)
    page.fill("#target", str(pid))
    _click(page, "#search")
    start = int(page.get_attribute("#target-rank", "data-rank"))
    assert start == via_api["target"]["rank"]
    cards = _cards(page)
    assert [c[1] for c in cards] == list(range(1, 21))
    assert [c[0] for c in cards] == [r["gallery_index"] for r in via_api["results"][:20]]
    _shot(page, "app_search.png")
    # "this is the one" on the target's best-ranked image
    g = next(c[0] for c in cards if c[2] == pid)
    d = _click(page, f".cand[data-g='{g}'] .yes", "/api/feedback")
    now = int(page.get_attribute("#target-rank", "data-rank"))
    assert now < start, f"target rank {start} -> {now}"
    assert page.inner_text("#round-label") == "Round 1."
    assert page.inner_text("#refined") == d["refined_text"] != ""
    assert f"(was {start})" in page.inner_text("#target-rank")
    # the same answer through the API in another session gives the same numbers
    again = httpx.post(server + "/api/feedback", json={"session": via_api["session"],
                                                       "gallery_index": g, "answer": "yes"})
    assert again.json()["target"]["rank"] == now
    assert [c[0] for c in _cards(page)] == [r["gallery_index"] for r in again.json()["results"]]
    assert page.locator(f".cand[data-g='{g}']").get_attribute("class").count("confirmed") == 1
    _shot(page, "app_confirmed.png")

    # "not this one" on the best other candidate: it leaves the top, the rest move up by one
    before = _cards(page)
    other = next(c for c in before if c[0] != g)
    _click(page, f".cand[data-g='{other[0]}'] .no", "/api/feedback")
    after = [c[0] for c in _cards(page)]
    assert other[0] not in after
    assert after[:len(before) - 1] == [c[0] for c in before if c[0] != other[0]][:len(after) - 1]
    # the MLLM judges the next candidate
    d = _click(page, "#ask-mllm", "/api/feedback")
    assert d["step"]["by"] == "mllm"
    rows = page.locator("#history tr")
    assert rows.count() == 3
    assert "mllm" in rows.nth(2).inner_text()


def test_every_query_kind_in_the_page(page, trained_run):
    from thi.app.attributes import attributes_to_text

    image_paths = json.load(open(os.path.join(trained_run, "eval", "SynthPEDES",
                                              "image_paths.json")))
    page.check("#kind-attributes")
    assert page.is_visible("#attr-gender") and not page.is_visible("#text")
    fields = {"gender": "female", "hair": "long black", "upper": "red coat", "bag": "no"}
    for key, value in fields.items():
        page.fill(f"#attr-{key}", value)
    d = _click(page, "#search")
    assert page.inner_text("#query-text") == attributes_to_text(fields) == d["query_text"]
    _shot(page, "app_attributes.png")

    g = 6
    page.check("#kind-image")
    assert page.is_visible("#image") and not page.is_visible("#image-weight")
    page.set_input_files("#image", image_paths[g])
    _click(page, "#search")
    assert _cards(page)[0][0] == g  # the image finds itself first
    assert page.inner_text("#query-text") == "(image only)"

    page.check("#kind-text_image")
    page.fill("#text", "The person is wearing a red coat.")
    page.eval_on_selector("#image-weight", "e => { e.value = '0.7'; "
                                           "e.dispatchEvent(new Event('input')); }")
    d = _click(page, "#search")
    assert d["image_weight"] == 0.7 and d["kind"] == "text_image"
    assert _cards(page)[0][0] == g


def test_bad_input_shows_the_servers_message(page, tmp_path):
    page.check("#kind-text")
    page.fill("#text", "   ")
    _click(page, "#search")
    assert "text is empty" in page.inner_text("#error")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.check("#kind-image")
    page.set_input_files("#image", str(bad))
    _click(page, "#search")
    assert "not an image" in page.inner_text("#error")
    page.fill("#example", "99999")
    _click(page, "#load-example", "/api/example/99999")
    assert "out of range" in page.inner_text("#error")
    # a good search clears the error
    page.fill("#example", "0")
    _click(page, "#load-example", "/api/example/0")
    assert page.input_value("#text") != ""
    _click(page, "#search")
    assert page.inner_text("#error") == ""


def test_images_of_a_copied_run_show(page):
    """The eval folder names OLD_ROOT (another machine's); --root resolves the images."""
    page.check("#kind-text")
    page.fill("#text", "The person is wearing a red coat.")
    _click(page, "#search")
    page.wait_for_function("Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete)")
    widths = page.eval_on_selector_all("#results img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 20 and all(w > 0 for w in widths), widths


def test_show_more_reaches_a_target_below_rank_20_and_undo(page, server, trained_run):
    text, pid, via_api = _pick_query(server, trained_run, 21, 40)
    page.check("#kind-text")
    page.fill("#text", text)
    page.fill("#target", str(pid))
    _click(page, "#search")
    assert len(_cards(page)) == 20 and pid not in [c[2] for c in _cards(page)]
    _click(page, "#more", "/api/results/")
    cards = _cards(page)
    assert [c[1] for c in cards] == list(range(1, 41))
    assert [c[0] for c in cards] == [r["gallery_index"] for r in via_api["results"]]
    g = next(c[0] for c in cards if c[2] == pid)
    _click(page, f".cand[data-g='{g}'] .yes", "/api/feedback")  # confirm the target at 21+
    assert page.inner_text("#round-label") == "Round 1." and len(_cards(page)) == 40
    # "not this one", then undo: the image comes back where it was
    before = [c[0] for c in _cards(page)]
    other = before[1] if before[1] != g else before[2]
    _click(page, f".cand[data-g='{other}'] .no", "/api/feedback")
    assert other not in [c[0] for c in _cards(page)] and page.is_visible("#undo")
    d = _click(page, "#undo", "/api/feedback")
    assert d["step"]["action"] == "undo" and [c[0] for c in _cards(page)] == before
    assert not page.is_visible("#undo")
    assert "undo" in page.locator("#history tr").last.inner_text()


def test_results_are_marked_stale_after_an_error(page):
    page.check("#kind-text")
    page.fill("#text", "The person carries a black backpack.")
    _click(page, "#search")
    assert "stale" not in (page.get_attribute("#results", "class") or "")
    page.fill("#text", "   ")
    _click(page, "#search")
    assert "text is empty" in page.inner_text("#error")
    assert "stale" in page.get_attribute("#results", "class")
    assert page.is_visible("#stale-note")
    page.fill("#text", "The person carries a black backpack.")
    _click(page, "#search")
    assert "stale" not in page.get_attribute("#results", "class")
    assert not page.is_visible("#stale-note")


def test_mllm_judge_off_for_image_only_and_a_second_identity_warns(page, trained_run):
    image_paths = json.load(open(os.path.join(trained_run, "eval", "SynthPEDES",
                                              "image_paths.json")))
    page.check("#kind-image")
    page.set_input_files("#image", image_paths[6])
    _click(page, "#search")
    assert page.is_disabled("#ask-mllm")
    assert "image-only query" in page.inner_text("#mllm-reason")
    first = _cards(page)[0]
    _click(page, f".cand[data-g='{first[0]}'] .yes", "/api/feedback")
    assert page.is_enabled("#ask-mllm") and page.inner_text("#mllm-reason") == ""
    other = next(c for c in _cards(page) if c[2] is not None and c[2] != first[2])
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click(f".cand[data-g='{other[0]}'] .yes")
    assert asked and f"identity {other[2]}" in asked[0]
    assert page.inner_text("#round-label") == "Round 1."  # dismissed: nothing was sent
    page.once("dialog", lambda dialog: dialog.accept())
    _click(page, f".cand[data-g='{other[0]}'] .yes", "/api/feedback")
    assert page.inner_text("#round-label") == "Round 2."
    assert "two people" in page.inner_text("#warning")
