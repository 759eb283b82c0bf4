"""The search page's JSON API (``python -m thi.app``) on a tiny run over SynthPEDES with the
simulated MLLM, through FastAPI's TestClient: each query kind against the run's own scores,
one THI step per answer against an independent Eq. 6, sessions, export and bad input."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from thi.app.attributes import attributes_to_text  # noqa: E402
from thi.app.engine import SessionStore  # noqa: E402

LAM = 0.8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_path, synth_root):
    """An RDE run (random tiny CLIP) on SynthPEDES, evaluated on its test split."""
    from conftest import write_untrained_run

    return write_untrained_run(tmp_path_factory.mktemp("apprun"), tiny_clip_path, synth_root)


def _args(run_dir, synth_root, *extra):
    from thi.app.__main__ import build_parser

    return build_parser().parse_args(["--run", run_dir, "--root", synth_root, "--dataset",
                                      "SynthPEDES", "--backend", "simulated", "--device", "cpu",
                                      "--no-progress", *extra])


@pytest.fixture(scope="module")
def engine(run_dir, synth_root):
    from thi.app.loader import build_engine

    return build_engine(_args(run_dir, synth_root))


@pytest.fixture(scope="module")
def api(engine):
    from thi.app import create_app

    with TestClient(create_app(engine), base_url="http://127.0.0.1:7860",
                    raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def evald(run_dir):
    from thi.cli import load_eval_dir

    return load_eval_dir(run_dir, "SynthPEDES", None)


def _search(api, **fields):
    files = fields.pop("files", None)
    r = api.post("/api/search", data=fields, files=files)
    assert r.status_code == 200, r.text
    return r.json()


def _png(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ranks(scores):
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def test_text_search_is_the_runs_own_ranking(api, evald):
    q = 5
    d = _search(api, kind="text", text=evald["captions"][q], target_pid=int(evald["q_pids"][q]))
    row = evald["similarity"][q]
    order = _ranks(row)[:20]
    assert [r["gallery_index"] for r in d["results"]] == order.tolist()
    assert [r["rank"] for r in d["results"]] == list(range(1, 21))
    np.testing.assert_allclose([r["score"] for r in d["results"]], row[order], atol=1e-4)
    assert d["results"][0]["image_url"] == f"/api/image/{order[0]}"
    g_pids = evald["g_pids"]
    best = min(np.flatnonzero(_ranks(row) == g)[0] for g in np.flatnonzero(g_pids == evald["q_pids"][q]))
    assert d["target"] == {"pid": int(evald["q_pids"][q]), "rank": int(best) + 1,
                           "previous_rank": None, "start_rank": int(best) + 1}
    assert d["round"] == 0 and d["refined_text"] is None
    assert api.get(d["results"][0]["image_url"]).content == _png(evald["image_paths"][order[0]])


def test_confirm_is_one_thi_step_with_eq6(api, engine, evald, synth_root):
    """Confirming an image: VQA + aggregation by the MLLM (same answers as THI's own requests),
    the refined text re-encoded, Eq. 6 with the anchor at 1; a second confirmation keeps both."""
    from thi.pipeline import refine_query
    from offline.simulated import SimulatedClient

    q = 3
    text = evald["captions"][q]
    d = _search(api, kind="text", text=text, target_pid=int(evald["q_pids"][q]))
    base = evald["similarity"][q].astype(np.float64)
    g = d["results"][4]["gallery_index"]
    r = api.post("/api/feedback", json={"session": d["session"], "gallery_index": g,
                                        "answer": "yes"})
    assert r.status_code == 200, r.text
    step = r.json()
    fresh = SimulatedClient(os.path.join(synth_root, "SynthPEDES"))
    subtexts, refined = refine_query(fresh, text, evald["image_paths"][g])
    assert refined and step["refined_text"] == refined and step["step"]["subtexts"] == subtexts
    s_bar = engine.score_texts([refined])[0].astype(np.float64)
    s_bar[g] = 1.0
    expect = LAM * base + (1 - LAM) * s_bar
    order = _ranks(expect)[:20]
    assert [x["gallery_index"] for x in step["results"]] == order.tolist()
    np.testing.assert_allclose([x["score"] for x in step["results"]], expect[order], atol=1e-4)
    moved = {x["gallery_index"]: x["previous_rank"] for x in step["results"]}
    assert moved[g] == 5  # it was 5th before the answer
    assert step["round"] == 1 and step["step"]["action"] == "confirm"
    assert step["step"]["by"] == "person"
    assert next(x for x in step["results"] if x["gallery_index"] == g)["confirmed"]

    g2 = next(x["gallery_index"] for x in step["results"] if x["gallery_index"] != g)
    step2 = api.post("/api/feedback", json={"session": d["session"], "gallery_index": g2,
                                            "answer": "yes"}).json()
    _, refined2 = refine_query(fresh, refined, evald["image_paths"][g2])
    assert step2["refined_text"] == refined2
    s_bar2 = engine.score_texts([refined2])[0].astype(np.float64)
    s_bar2[[g, g2]] = 1.0
    expect2 = LAM * base + (1 - LAM) * s_bar2
    assert [x["gallery_index"] for x in step2["results"]] == _ranks(expect2)[:20].tolist()
    assert [h["action"] for h in step2["history"]] == ["confirm", "confirm"]


def test_not_this_one_sets_the_image_aside(api, evald):
    q = 7
    d = _search(api, kind="text", text=evald["captions"][q])
    before = [x["gallery_index"] for x in d["results"]]
    after = api.post("/api/feedback", json={"session": d["session"], "gallery_index": before[0],
                                            "answer": "no"}).json()
    assert [x["gallery_index"] for x in after["results"]] == before[1:] + [
        int(_ranks(evald["similarity"][q])[20])]
    assert [x["previous_rank"] for x in after["results"][:3]] == [2, 3, 4]
    assert after["refined_text"] is None and after["step"]["action"] == "reject"
    # scores are untouched; the image is ranked last
    big = api.post("/api/search", data={"kind": "text", "text": evald["captions"][q],
                                        "top_k": "100"}).json()
    assert len(big["results"]) == min(100, len(evald["image_paths"]))


def test_the_mllm_judges_the_next_candidate_on_request(api, evald, synth_root):
    from thi.pipeline import loc_request
    from utils.mllm.parsing import parse_yes_no
    from offline.simulated import SimulatedClient

    fresh = SimulatedClient(os.path.join(synth_root, "SynthPEDES"))
    q = 11
    text = evald["captions"][q]
    d = _search(api, kind="text", text=text)
    seen = []
    for _ in range(3):
        nxt = next(x["gallery_index"] for x in d["results"]
                   if not x["confirmed"] and not x["rejected"])
        d = api.post("/api/feedback", json={"session": d["session"], "answer": "mllm"}).json()
        assert d["step"]["gallery_index"] == nxt and d["step"]["by"] == "mllm"
        said = parse_yes_no(fresh.generate([loc_request(text, evald["image_paths"][nxt])])[0])
        assert d["step"]["action"] == ("confirm" if said else "reject")
        seen.append(d["step"]["action"])
        if said:
            break


def test_attribute_query_is_the_sentence_of_its_fields(api, engine):
    fields = {"gender": "female", "hair": "long black", "upper": "red short-sleeved t-shirt",
              "bag": "gray backpack", "hat": "no", "others": "yes"}
    sentence = attributes_to_text(fields)
    assert sentence == ("The person is female. The person has long black hair. The person is "
                        "wearing a red short-sleeved t-shirt. The person carries a gray "
                        "backpack. The person does not wear a hat. There are other people in "
                        "the background.")
    d = _search(api, kind="attributes", **{f"attr_{k}": v for k, v in fields.items()})
    assert d["query_text"] == sentence
    row = engine.score_texts([sentence])[0]
    assert [x["gallery_index"] for x in d["results"]] == _ranks(row)[:20].tolist()
    same = _search(api, kind="attributes", attributes=json.dumps(fields))
    assert same["results"] == d["results"]


def test_attribute_sentences_parse_back_to_synthpedes_attributes():
    from offline.synth_text import parse_caption

    # a whole sentence keeps the person's wording; a phrase goes into the question's sentence
    assert attributes_to_text({"held": "She holds a red cup in her hand",
                               "bag": "a black leather backpack", "glasses": "yes",
                               "hair": "no"}) == (
        "The person wears glasses. She holds a red cup in her hand. The person carries a "
        "black leather backpack.")

    fields = {"gender": "male", "hair": "short brown", "upper": "blue long-sleeved jacket",
              "lower": "short black shorts", "pattern": "plaid", "shoes": "red boots",
              "glasses": "black", "scarf": "no", "held": "a phone", "bag": "no", "hat": "red",
              "belt": "no", "action": "running", "background": "a park", "others": "no"}
    said = parse_caption(attributes_to_text(fields))
    assert said == {"gender": "male", "hair_length": "short", "hair_color": "brown",
                    "upper_type": "jacket", "upper_color": "blue", "sleeve": "long",
                    "lower_type": "shorts", "lower_color": "black", "lower_length": "short",
                    "pattern": "plaid", "shoes_style": "boots", "shoes_color": "red",
                    "glasses": "black", "scarf": "none", "held": "phone", "bag": "none", "bag_color": "none",
                    "hat": "red", "belt": "none", "action": "running", "background": "park",
                    "others": "none"}


def test_image_queries_and_the_fusion_weight(api, evald):
    g = 9
    png = _png(evald["image_paths"][g])
    img = _search(api, kind="image", files={"image": ("q.png", png, "image/png")})
    assert img["results"][0]["gallery_index"] == g  # the image finds itself
    assert img["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert img["query_text"] == ""
    text = evald["captions"][0]
    txt = _search(api, kind="text", text=text, top_k="100")
    img = _search(api, kind="image", files={"image": ("q.png", png, "image/png")}, top_k="100")
    fused = _search(api, kind="text_image", text=text, image_weight="0.3", top_k="100",
                    files={"image": ("q.png", png, "image/png")})
    assert fused["image_weight"] == 0.3
    s_txt = {x["gallery_index"]: x["score"] for x in txt["results"]}
    s_img = {x["gallery_index"]: x["score"] for x in img["results"]}
    for x in fused["results"]:
        assert x["score"] == pytest.approx(0.3 * s_img[x["gallery_index"]]
                                           + 0.7 * s_txt[x["gallery_index"]], abs=1e-4)
    # an image-only session is refined by the MLLM's description of the confirmed image
    d = api.post("/api/feedback", json={"session": img["session"], "gallery_index": g,
                                        "answer": "yes"}).json()
    assert d["refined_text"] and d["results"][0]["gallery_index"] == g


@pytest.mark.parametrize("fields,files,status,message", [
    ({"kind": "text", "text": "   "}, None, 400, "text is empty"),
    ({"kind": "poem", "text": "a man"}, None, 400, "unknown query kind"),
    ({"kind": "attributes"}, None, 400, "at least one attribute"),
    ({"kind": "attributes", "attr_tail": "long"}, None, 400, "unknown attribute field"),
    ({"kind": "attributes", "attributes": "{nope"}, None, 400, "JSON object"),
    ({"kind": "image"}, None, 400, "needs an image"),
    ({"kind": "image"}, {"image": ("x.png", b"this is not a png", "image/png")}, 400,
     "not an image"),
    ({"kind": "image"}, {"image": ("x.png", b"", "image/png")}, 400, "is empty"),
    ({"kind": "text_image", "text": "a man", "image_weight": "2"}, "IMG", 400, "image_weight"),
    ({"kind": "text_image", "text": "a man", "image_weight": "heavy"}, "IMG", 400,
     "image_weight"),
    ({"kind": "text", "text": "a man", "target_pid": "abc"}, None, 400, "target_pid"),
    ({"kind": "text", "text": "a man", "target_pid": "999999"}, None, 400, "has no image"),
    ({"kind": "text", "text": "a man", "top_k": "0"}, None, 400, "top_k"),
    ({"kind": "text", "text": "x" * 2001}, None, 400, "at most 2000"),
])
def test_bad_search_input_gets_a_4xx_with_a_message(api, evald, fields, files, status,
                                                     message):
    if files == "IMG":
        files = {"image": ("q.png", _png(evald["image_paths"][0]), "image/png")}
    r = api.post("/api/search", data=fields, files=files)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_bad_feedback_and_lookups_get_a_4xx(api, evald):
    sid = _search(api, kind="text", text=evald["captions"][0])["session"]
    g_size = len(evald["image_paths"])
    cases = [
        ({"session": "nope", "gallery_index": 0, "answer": "yes"}, 404, "unknown session"),
        ({"session": sid, "gallery_index": g_size, "answer": "yes"}, 404, "out of range"),
        ({"session": sid, "gallery_index": -1, "answer": "no"}, 404, "out of range"),
        ({"session": sid, "gallery_index": 0, "answer": "maybe"}, 400, "answer must be"),
        ({"session": sid, "answer": "yes"}, 400, "gallery_index is missing"),
    ]
    for body, status, message in cases:
        r = api.post("/api/feedback", json=body)
        assert r.status_code == status and message in r.json()["detail"], (body, r.text)
    assert api.post("/api/feedback", json={"session": sid, "gallery_index": 1,
                                           "answer": "yes"}).status_code == 200
    r = api.post("/api/feedback", json={"session": sid, "gallery_index": 1, "answer": "yes"})
    assert r.status_code == 400 and "already confirmed" in r.json()["detail"]
    r = api.post("/api/feedback", json={"session": sid, "gallery_index": 1, "answer": "no"})
    assert r.status_code == 400 and "confirmed" in r.json()["detail"]
    assert api.post("/api/feedback", content=b"{not json",
                    headers={"content-type": "application/json"}).status_code == 422
    assert api.post("/api/search", content=b"kind=text",
                    headers={"content-type": "text/plain"}).status_code == 400
    assert api.get(f"/api/image/{g_size}").status_code == 404
    assert api.get("/api/image/abc").status_code == 400
    assert api.get("/api/session/nope").status_code == 404
    assert api.get("/api/example/100000").status_code == 404


def test_sessions_are_independent_and_bounded(api, engine, evald):
    a = _search(api, kind="text", text=evald["captions"][1])
    b = _search(api, kind="text", text=evald["captions"][1])
    assert a["session"] != b["session"]
    api.post("/api/feedback", json={"session": a["session"], "answer": "no",
                                    "gallery_index": a["results"][0]["gallery_index"]})
    b_now = api.get(f"/api/session/{b['session']}").json()
    assert b_now["rejected"] == [] and b_now["rounds"] == []
    store = SessionStore(capacity=2)
    old, engine.sessions = engine.sessions, store
    try:
        ids = [_search(api, kind="text", text="a man")["session"] for _ in range(3)]
        assert len(store) == 2
        r = api.get(f"/api/session/{ids[0]}")
        assert r.status_code == 404 and "2 most recent" in r.json()["detail"]
        assert api.get(f"/api/session/{ids[2]}").status_code == 200
    finally:
        engine.sessions = old


def test_export_is_replayed_by_python_m_thi(api, run_dir, synth_root, evald, tmp_path):
    from thi.cli import main

    q = 2
    d = _search(api, kind="text", text=evald["captions"][q], target_pid=int(evald["q_pids"][q]))
    g = d["results"][1]["gallery_index"]
    api.post("/api/feedback", json={"session": d["session"], "gallery_index": g, "answer": "yes"})
    exported = api.get(f"/api/session/{d['session']}").json()
    assert exported["queries"] == [{"text": evald["captions"][q], "pid": int(evald["q_pids"][q])}]
    assert exported["anchors"] == [g] and exported["refined"]
    path = tmp_path / "my_search.json"
    path.write_text(json.dumps(exported))
    assert main(["--run", run_dir, "--target", "SynthPEDES", "--root", synth_root, "--backend",
                 "simulated", "--device", "cpu", "--no-progress", "--rounds", "2",
                 "--queries", str(path)]) == 0
    import glob

    found = glob.glob(os.path.join(run_dir, "thi", "SynthPEDES", "best", "*", "queries", "my_search"))
    assert len(found) == 1, found  # RUN/thi/TARGET/<MLLM label>/queries/<file name>
    out = found[0]
    rows = [json.loads(x) for x in open(os.path.join(out, "queries.jsonl"))]
    assert [r["caption"] for r in rows] == [evald["captions"][q]]
    assert json.load(open(os.path.join(out, "rounds.json")))["rounds"][-1]["metrics"]
    bad = tmp_path / "image_only.json"
    bad.write_text(json.dumps({"queries": [{"text": "", "pid": None}]}))
    with pytest.raises(SystemExit, match="no text"):
        main(["--run", run_dir, "--backend", "simulated", "--device", "cpu", "--queries",
              str(bad)])


def test_gallery_features_are_computed_when_the_eval_folder_is_missing(run_dir, synth_root,
                                                                       evald):
    from model import load_run
    from thi.app.loader import gallery_from_dataset, gallery_from_eval_dir

    assert gallery_from_eval_dir(run_dir, "RSTPReid") is None
    model, cfg = load_run(run_dir, "cpu")
    g = gallery_from_dataset(model, cfg, "SynthPEDES", synth_root, torch.device("cpu"), None,
                             progress=False)
    assert g["image_paths"] == evald["image_paths"]
    np.testing.assert_array_equal(g["g_pids"], evald["g_pids"])
    for k in ("bge", "tse"):
        np.testing.assert_allclose(g["feats"][k], evald["gallery_feats"][k], atol=1e-5)
    assert [c for c, _ in g["examples"]] == evald["captions"]


def test_page_and_info(api, evald):
    page = api.get("/")
    assert page.status_code == 200 and 'id="search"' in page.text
    info = api.get("/api/info").json()
    assert info["gallery_size"] == len(evald["image_paths"]) and info["has_mllm"]
    assert len(info["attributes"]) == 15 and info["kinds"] == ["text", "attributes",
                                                               "text_image", "image"]
    ex = api.get("/api/example/4").json()
    assert ex == {"index": 4, "text": evald["captions"][4], "pid": int(evald["q_pids"][4])}


# ---------------------------------------------------------------- issue 27: safety, scripts

def _huge_png(width: int, height: int) -> bytes:
    """A valid one-colour PNG of width x height (1-bit grey): tiny on disk, huge decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                               0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_pixel_bomb_is_refused_from_its_header_before_decoding(api, monkeypatch):
    from PIL import ImageFile

    from thi.app.server import MAX_IMAGE_PIXELS

    bomb = _huge_png(13000, 13000)
    assert len(bomb) < 1024 * 1024  # far under the upload's byte cap
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    r = api.post("/api/search", data={"kind": "image"},
                 files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413, r.text
    assert "13000x13000" in r.json()["detail"] and f"at most {MAX_IMAGE_PIXELS // 10**6}" in \
        r.json()["detail"]
    assert loads == []  # refused from the header: nothing was decoded
    assert MAX_IMAGE_PIXELS == 24_000_000  # the limit README states
    ok = _huge_png(300, 700)
    r = api.post("/api/search", data={"kind": "image"}, files={"image": ("ok.png", ok, "image/png")})
    assert r.status_code == 200 and loads and set(loads) == {(300, 700)}


def test_a_16_bit_upload_is_read_like_the_dataset_reads_it(api, evald):
    """A 16-bit grey PNG is scaled to 8 bits (utils/images.to_rgb), as the dataset loader reads
    it; PIL's own convert("RGB") clips it to white, and the query would find other people."""
    grey = np.asarray(Image.open(evald["image_paths"][9]).convert("L"), dtype=np.uint16)
    as_png = {}
    for mode, values in (("L", grey.astype(np.uint8)), ("I;16", grey * 257)):
        buf = io.BytesIO()
        Image.fromarray(values, mode if mode == "L" else None).save(buf, format="PNG")
        as_png[mode] = buf.getvalue()
    assert Image.open(io.BytesIO(as_png["I;16"])).mode.startswith("I")
    res = {mode: _search(api, kind="image", top_k="20", files={"image": ("q.png", png, "image/png")})
           for mode, png in as_png.items()}
    eight = [(x["gallery_index"], round(x["score"], 4)) for x in res["L"]["results"]]
    sixteen = [(x["gallery_index"], round(x["score"], 4)) for x in res["I;16"]["results"]]
    assert sixteen == eight


def test_the_whole_request_body_is_capped(api):
    from thi.app.access import MAX_BODY_BYTES

    big = b"x" * (MAX_BODY_BYTES + 1)
    r = api.post("/api/search", content=big, headers={"content-type": "multipart/form-data; "
                                                                      "boundary=zz"})
    assert r.status_code == 413 and "request body" in r.json()["detail"]

    def stream():  # no Content-Length: chunked, cut off while reading
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536

    r = api.post("/api/search", content=stream(),
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "request body" in r.json()["detail"]


def test_rounds_per_session_and_the_history_a_response_carries_are_bounded(api, engine, evald):
    from thi.app.server import HISTORY_SHOWN

    old = engine.max_rounds
    engine.max_rounds = HISTORY_SHOWN + 5
    try:
        d = _search(api, kind="text", text=evald["captions"][3], top_k="100")
        order = [x["gallery_index"] for x in d["results"]]
        for i in range(HISTORY_SHOWN + 5):
            d = api.post("/api/feedback", json={"session": d["session"], "answer": "no",
                                                "gallery_index": order[i]}).json()
        assert d["round"] == HISTORY_SHOWN + 5 and len(d["history"]) == HISTORY_SHOWN
        assert d["history"][-1]["round"] == HISTORY_SHOWN + 5
        r = api.post("/api/feedback", json={"session": d["session"], "answer": "no",
                                            "gallery_index": order[HISTORY_SHOWN + 5]})
        assert r.status_code == 400 and f"its {HISTORY_SHOWN + 5} answers" in r.json()["detail"]
        assert len(api.get(f"/api/session/{d['session']}").json()["rounds"]) == HISTORY_SHOWN + 5
    finally:
        engine.max_rounds = old


@pytest.mark.parametrize("headers,status", [
    ({"host": "evil.example"}, 421),                                  # DNS rebinding
    ({"host": "evil.example:7860"}, 421),
    ({"origin": "http://evil.example"}, 403),                         # a cross-site form post
    ({"origin": "null"}, 403),
    ({"referer": "http://evil.example/page.html"}, 403),
    ({"sec-fetch-site": "cross-site"}, 403),
    ({"origin": "http://127.0.0.1:7860", "sec-fetch-site": "same-origin"}, 200),
    ({"referer": "http://127.0.0.1:7860/"}, 200),
    ({"host": "localhost:7860"}, 200),
])
def test_only_our_host_and_same_origin_posts_are_served(api, headers, status):
    r = api.post("/api/search", data={"kind": "text", "text": "a man in a red coat"},
                 headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["detail"]
    if "host" in headers:  # a rebound name cannot read anything either
        assert api.get("/api/info", headers=headers).status_code == status


def test_beyond_loopback_a_token_is_required_and_paths_are_relative(engine, api, evald,
                                                                     synth_root, run_dir):
    from thi.app import create_app
    from thi.app.access import plan_access

    assert plan_access("127.0.0.1").token is None and plan_access("127.0.0.1").notes == []
    wide = plan_access("0.0.0.0")
    assert wide.token and len(wide.token) >= 20 and wide.hosts is None
    assert "WARNING" in wide.notes[0] and wide.token in " ".join(wide.notes)
    assert plan_access("0.0.0.0").token != wide.token
    assert plan_access("0.0.0.0", token="s3cret-token").token == "s3cret-token"
    with TestClient(create_app(engine, host="0.0.0.0", token="s3cret-token"),
                    base_url="http://192.168.1.5:7860") as c:
        assert c.get("/").status_code == 401
        assert c.get("/api/info").status_code == 401
        assert c.post("/api/search", data={"kind": "text", "text": "a man"}).status_code == 401
        assert c.get("/api/info", headers={"authorization": "Bearer wrong-token"}
                     ).status_code == 401
        assert c.get("/favicon.ico").status_code == 200
        assert c.get("/api/info", headers={"authorization": "Bearer s3cret-token"}
                     ).status_code == 200
        page = c.get("/?token=s3cret-token")  # the printed URL: the page keeps it as a cookie
        assert page.status_code == 200 and "icl_token" in page.headers["set-cookie"]
        assert "httponly" in page.headers["set-cookie"].lower()
        assert c.get("/api/info").status_code == 200  # the cookie now goes along
    info = api.get("/api/info").json()
    assert info["run"] == os.path.basename(run_dir)
    assert run_dir not in json.dumps(info) and synth_root not in json.dumps(info)
    d = _search(api, kind="text", text=evald["captions"][0])
    g = d["results"][0]["gallery_index"]
    api.post("/api/feedback", json={"session": d["session"], "gallery_index": g, "answer": "yes"})
    exported = api.get(f"/api/session/{d['session']}").json()
    assert exported["anchor_images"] == [os.path.relpath(evald["image_paths"][g], synth_root)]
    assert exported["run"] == os.path.basename(run_dir)
    assert synth_root not in json.dumps(exported) and run_dir not in json.dumps(exported)


def test_odd_inputs_get_a_clear_4xx(api, evald):
    nested = "[" * 4000 + "]" * 4000
    r = api.post("/api/search", data={"kind": "attributes", "attributes": nested})
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    r = api.post("/api/search", content=('{"kind": "text", "text": ' + nested + "}").encode(),
                 headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = api.post("/api/search", data={"kind": "attributes",
                                      "attributes": json.dumps({"gender": {"a": [1]}})})
    assert r.status_code == 400 and "text answer" in r.json()["detail"]
    r = api.post("/api/search", data={"kind": "text"},
                 files={"text": ("t.txt", b"a man in a red coat", "text/plain")})
    assert r.status_code == 400 and "text must be text" in r.json()["detail"]
    sid = _search(api, kind="text", text=evald["captions"][0])["session"]
    r = api.post("/api/feedback", json={"session": sid, "gallery_index": True, "answer": "no"})
    assert r.status_code == 422 and "gallery_index" in r.json()["detail"]
    assert api.get("/api/session/" + sid).json()["rejected"] == []
    for url in ("/api/image/1_0", "/api/image/+1", "/api/example/1_0", "/api/image/%201"):
        r = api.get(url)
        assert r.status_code == 400 and "digits only" in r.json()["detail"], url
    huge = "s" * 100_000
    for r in (api.post("/api/feedback", json={"session": huge, "gallery_index": 0,
                                              "answer": "no"}),
              api.get("/api/session/" + huge[:30000]),  # httpx caps a URL at 64 KB
              api.get("/api/results/" + huge[:30000])):
        assert 400 <= r.status_code < 500 and len(r.content) < 500, r.text[:200]
    r = api.post("/api/search", data={"kind": "image"},
                 files={"image": ("x.png", b"this is not a png", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    assert "object at" not in r.json()["detail"] and "<" not in r.json()["detail"]
    r = api.post("/api/search", data={"kind": "text", "text": "a man", "top_k": "1_0"})
    assert r.status_code == 400 and "top_k" in r.json()["detail"]


def test_json_body_searches_like_the_form(api, evald):
    q = 6
    form = _search(api, kind="text", text=evald["captions"][q], target_pid=str(int(evald["q_pids"][q])),
                   top_k="30")
    r = api.post("/api/search", json={"kind": "text", "text": evald["captions"][q],
                                      "target_pid": int(evald["q_pids"][q]), "top_k": 30})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == form["results"] and r.json()["target"] == form["target"]
    fields = {"gender": "female", "hair": "long black", "bag": "no"}
    by_form = _search(api, kind="attributes", **{f"attr_{k}": v for k, v in fields.items()})
    by_json = api.post("/api/search", json={"kind": "attributes", "attributes": fields}).json()
    assert by_json["query_text"] == by_form["query_text"] == attributes_to_text(fields)
    assert by_json["results"] == by_form["results"]
    for body, message in [({"kind": "image", "image": "aGVsbG8="}, "as a file"),
                          ({"kind": "text", "text": "a man", "top_k": True}, "top_k"),
                          ({"kind": "text", "text": 5}, "text must be text"),
                          ({"kind": "text", "text": "a man", "colour": "red"}, "unknown field"),
                          (["kind", "text"], "object")]:
        r = api.post("/api/search", json=body)
        assert r.status_code == 400 and message in r.json()["detail"], (body, r.text)


def test_rounds_flag_docs_offline_and_favicon(api, run_dir, synth_root):
    from thi.app.__main__ import build_parser
    from thi.app.loader import build_engine

    helptext = " ".join(build_parser().format_help().split())
    assert "answers per search session" in helptext and "paper: 5" not in helptext
    assert build_engine(_args(run_dir, synth_root, "--rounds", "3")).max_rounds == 3
    docs = api.get("/api/docs")
    assert docs.status_code == 200 and "/api/search" in docs.text and "/api/feedback" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()
    assert api.get("/api/openapi.json").status_code == 200
    icon = api.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_image_paths_follow_root_when_the_run_was_copied(tmp_path):
    from thi.app.paths import relocate_image_paths, shown_path

    old = ["/old/data/SynthPEDES/imgs/0001.png", "/old/data/SynthPEDES/imgs/0002.png"]
    new, note = relocate_image_paths(old, str(tmp_path), "/old/data", "SynthPEDES")
    assert new == [str(tmp_path / "SynthPEDES/imgs/0001.png"),
                   str(tmp_path / "SynthPEDES/imgs/0002.png")] and note
    # the saved root_dir unknown (or different): cut at the dataset folder when files are gone
    new2, _ = relocate_image_paths(old, str(tmp_path), "/elsewhere", "SynthPEDES")
    assert new2 == new
    assert relocate_image_paths(["SynthPEDES/a.png"], "/data", None, "SynthPEDES")[0] == [
        "/data/SynthPEDES/a.png"]
    assert relocate_image_paths(old, None, "/old/data", "SynthPEDES") == (old, None)
    assert shown_path(new[0], str(tmp_path)) == "SynthPEDES/imgs/0001.png"
    assert shown_path("/secret/place/x.png", str(tmp_path)) == "x.png"
