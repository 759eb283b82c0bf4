"""MLLM client core: interface, persistent cache (re-run, killed process, torn line, concurrent
writers), image helpers, prompt templates pinned to the released wording."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from utils.mllm import BACKENDS, BaseClient, MLLMError, Request, build_client
from utils.mllm import prompts
from utils.mllm.cache import CACHE_FILE, ResponseCache
from utils.mllm.images import image_digest, load_image, prepare_image, smart_resize

REPO = Path(__file__).resolve().parents[1]

# A scripted backend, shared by the tests and the subprocesses (exec'd there).
ECHO_SRC = textwrap.dedent('''
    import os
    from utils.mllm import BaseClient

    class Echo(BaseClient):
        """Answers text.upper(); exits the process hard on call number `die_on_call`."""
        backend = "echo"

        def __init__(self, die_on_call=None, tag="m", **kw):
            super().__init__(**kw)
            self.die_on_call, self.tag, self.seen = die_on_call, tag, []

        def identity(self):
            return "echo:" + self.tag

        def _generate(self, requests, temperature, max_tokens):
            if self.die_on_call is not None and len(self.seen) >= self.die_on_call:
                os._exit(9)  # a killed run: no cleanup, no flush
            self.seen.append([r.text for r in requests])
            return [r.text.upper() for r in requests]
''')
_ns: dict = {}
exec(ECHO_SRC, _ns)
Echo = _ns["Echo"]


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ECHO_SRC + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def reqs(*texts):
    return [Request(t) for t in texts]


# --- interface -------------------------------------------------------------------------------
def test_generate_one_call_for_all_misses_in_order_with_dedupe():
    c = Echo()
    assert c.generate(reqs("a", "b", "a", "c")) == ["A", "B", "A", "C"]
    assert c.seen == [["a", "b", "c"]]  # one backend call, duplicates asked once
    assert c.stats == {"calls": 1, "requests": 4, "cache_hits": 0, "cache_misses": 4,
                       "unusable": 0}
    assert c.generate([]) == [] and c.stats["calls"] == 1


def test_bad_arguments_are_explained():
    c = Echo()
    with pytest.raises(TypeError, match="wrap"):
        c.generate(Request("a"))
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        c.generate([Request("a"), "b"])
    with pytest.raises(ValueError, match="unknown MLLM backend 'gpt'.*openai, simulated, "
                                         "transformers, vllm"):
        build_client("gpt")
    assert set(BACKENDS) == {"vllm", "openai", "transformers", "simulated"}
    with pytest.raises(NotImplementedError):
        BaseClient().generate(reqs("x"))


def test_request_defaults():
    r = Request("hi")
    assert r.image is None and r.system == "You are a helpful assistant." == prompts.SYSTEM
    with pytest.raises(AttributeError):
        r.text = "changed"  # frozen


def test_context_manager_closes():
    closed = []

    class C(Echo):
        def close(self):
            closed.append(True)

    with C() as c:
        c.generate(reqs("a"))
    assert closed == [True]


# --- cache -----------------------------------------------------------------------------------
def test_rerun_hits_cache_with_zero_backend_calls(tmp_path):
    first = Echo(cache_dir=tmp_path)
    assert first.generate(reqs("a", "b"), temperature=0.01, max_tokens=8) == ["A", "B"]
    again = Echo(cache_dir=tmp_path)
    assert again.generate(reqs("a", "b"), temperature=0.01, max_tokens=8) == ["A", "B"]
    assert again.stats["calls"] == 0 and again.stats["cache_hits"] == 2
    assert again.seen == []
    # every part of the key matters: sampling, system prompt, model identity
    for kwargs, req in [({"temperature": 0.7}, Request("a")), ({"max_tokens": 9}, Request("a")),
                        ({}, Request("a", system="other"))]:
        c = Echo(cache_dir=tmp_path)
        c.generate([req], **{"max_tokens": 8, **kwargs})
        assert c.stats["cache_misses"] == 1, (kwargs, req)
    other_model = Echo(cache_dir=tmp_path, tag="lora")
    other_model.generate(reqs("a"), max_tokens=8)
    assert other_model.stats["calls"] == 1


def test_no_cache_dir_still_counts_misses():
    c = Echo()
    c.generate(reqs("a"))
    c.generate(reqs("a"))
    assert c.stats["cache_misses"] == 2 and c.stats["calls"] == 2 and c.stats["cache_hits"] == 0


def test_image_content_is_part_of_the_key(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 80), (1, 2, 3)).save(a)
    Image.new("RGB", (40, 80), (1, 2, 4)).save(b)
    c = Echo(cache_dir=tmp_path / "cache")
    c.generate([Request("q", image=a), Request("q", image=b), Request("q", image=str(a)),
                Request("q", image=Image.open(a).convert("RGB")),
                Request("q", image=Image.open(a).convert("RGB"))])
    # a (path twice) = 1, b = 1, the PIL copy of a = 1 (the PIL digest hashes pixels, not bytes)
    assert c.seen == [["q", "q", "q"]] and c.stats["cache_misses"] == 5
    budget = Echo(cache_dir=tmp_path / "cache", min_pixels=3136, max_pixels=3136)
    budget.generate([Request("q", image=a)])
    assert budget.stats["calls"] == 1  # another pixel budget is another answer


def test_max_batch_stores_each_chunk(tmp_path):
    c = Echo(cache_dir=tmp_path, max_batch=2)
    assert c.generate(reqs("a", "b", "c", "d", "e")) == ["A", "B", "C", "D", "E"]
    assert c.seen == [["a", "b"], ["c", "d"], ["e"]] and c.stats["calls"] == 3
    assert len(ResponseCache(tmp_path)) == 5


def test_killed_process_keeps_finished_chunks(tmp_path):
    proc = run_py(f'''
        c = Echo(die_on_call=2, cache_dir={str(tmp_path)!r}, max_batch=2)
        c.generate([__import__("utils.mllm", fromlist=["Request"]).Request(t) for t in "abcdef"])
        print("not reached")
    ''')
    assert proc.returncode == 9, proc.stderr
    assert "not reached" not in proc.stdout
    c = Echo(cache_dir=tmp_path, max_batch=2)
    assert c.generate(reqs(*"abcdef")) == list("ABCDEF")
    assert c.stats["cache_hits"] == 4 and c.seen == [["e", "f"]]


def test_torn_last_line_is_ignored_and_not_glued_to_the_next_record(tmp_path):
    Echo(cache_dir=tmp_path).generate(reqs("a", "b"))
    path = tmp_path / CACHE_FILE
    with open(path, "ab") as f:  # what a process killed mid-write leaves
        f.write(b'{"key": "0123", "answ')
    c = Echo(cache_dir=tmp_path)
    assert c.generate(reqs("a", "b", "c")) == ["A", "B", "C"]
    assert c.seen == [["c"]]
    fresh = ResponseCache(tmp_path)
    assert len(fresh) == 3 and fresh.corrupt_lines == 1
    lines = path.read_bytes().split(b"\n")
    assert lines[2] == b'{"key": "0123", "answ' and json.loads(lines[3])["answer"] == "C"


def test_other_processes_appends_are_seen_before_deciding_misses(tmp_path):
    mine = Echo(cache_dir=tmp_path)
    mine.generate(reqs("a"))
    proc = run_py(f'''
        from utils.mllm import Request
        Echo(cache_dir={str(tmp_path)!r}).generate([Request("b"), Request("c")])
    ''')
    assert proc.returncode == 0, proc.stderr
    assert mine.generate(reqs("a", "b", "c")) == ["A", "B", "C"]
    assert mine.stats["calls"] == 1 and mine.stats["cache_hits"] == 3


def test_concurrent_writers_give_a_loadable_cache(tmp_path):
    code = '''
        import sys
        from utils.mllm import Request
        c = Echo(cache_dir={d!r})
        for i in range({start}, {start} + 150):
            c.generate([Request(f"item {{i}}")])  # one locked append per answer
    '''
    procs = [subprocess.Popen([sys.executable, "-c", ECHO_SRC + textwrap.dedent(
        code.format(d=str(tmp_path), start=start))], cwd=REPO, stderr=subprocess.PIPE)
        for start in (0, 100)]  # overlapping keys 100..149
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    cache = ResponseCache(tmp_path)
    assert cache.corrupt_lines == 0 and len(cache) == 250
    lines = (tmp_path / CACHE_FILE).read_text().splitlines()
    for ln in lines:
        rec = json.loads(ln)
        assert rec["answer"].startswith("ITEM ") and rec["backend"] == "echo"
    c = Echo(cache_dir=tmp_path)
    assert c.generate(reqs(*[f"item {i}" for i in range(250)]))[-1] == "ITEM 249"
    assert c.stats["calls"] == 0


def test_unwritable_cache_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cache_dir"):
        Echo(cache_dir=blocker / "sub")


def test_backend_returning_wrong_count_is_an_error():
    class Bad(Echo):
        def _generate(self, requests, temperature, max_tokens):
            return ["only one"]

    with pytest.raises(MLLMError, match="1 answers for 2 requests"):
        Bad().generate(reqs("a", "b"))


# --- images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hw,budget,expected", [
    ((384, 128), 50176, (364, 112)),  # a person crop: floor after scaling down
    ((224, 224), 50176, (224, 224)),  # exactly the budget
    ((100, 100), 50176, (224, 224)),  # scaled up: ceil
    ((80, 40), 50176, (336, 168)),
    ((1000, 500), 50176, (308, 140)),
    ((28, 28), 28 * 28, (28, 28)),
])
def test_smart_resize_hand_computed(hw, budget, expected):
    assert smart_resize(*hw, min_pixels=budget, max_pixels=budget) == expected


def test_smart_resize_defaults_and_guards():
    assert smart_resize(500, 300) == (504, 308)  # within Qwen2-VL's default range: rounding only
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10000, 20)


def test_image_helpers(tmp_path):
    path = tmp_path / "x.png"
    Image.new("L", (128, 384), 7).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (128, 384)
    assert prepare_image(path).size == (112, 364)
    assert prepare_image(im, 3136, 3136).size == (28, 84)  # 1:3 at 56*56 px: ceil to 28 x 84
    assert image_digest(path) == image_digest(str(path)) != image_digest(im)
    assert image_digest(im) == image_digest(load_image(path))
    with pytest.raises(MLLMError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MLLMError, match="missing.png"):
        Echo().generate([Request("q", image=tmp_path / "missing.png")])


# --- prompts ---------------------------------------------------------------------------------
def test_prompts_pinned():
    assert prompts.PROMPT_VERSION == "icl-1"
    assert prompts.loc_prompt("A man in a red coat.") == (
        'Can this text accurately describe the image?\n\nText: A man in a red coat.\n\n'
        'Answer "Yes" or "No".')
    assert prompts.vqa_prompt() == prompts.T_VQA == (
        "According to the pedestrian image, answer the following questions one by one:\n\n"
        "1. The person is male or female?\n"
        "2. What hairstyle does the person have, such as hair length and color?\n"
        "3. What is this person wearing on his upper body? If clearly visible, what are the "
        "color, type, and sleeve length?\n"
        "4. What are the characteristics of this person's pants? If clearly visible, what are "
        "the color, type, and trouser leg length?\n"
        "5. Does this person have any patterns on his/her clothes or pants?\n"
        "6. What are the characteristics of this person's shoes? If clearly visible, what are "
        "the color and style?\n"
        "7. Does this person wear glasses? If clearly visible, what are the color and style?\n"
        "8. Is this person wearing a scarf? If clearly visible, what are the color and style?\n"
        "9. Does this person have something in his/her hand? If so, what is it and what color "
        "is it?\n"
        "10. Does this person carry a backpack? If clearly visible, what are the color and "
        "style?\n"
        "11. Does this person wear a hat? If clearly visible, what are the color and style?\n"
        "12. Is this person wearing a belt or waistband?\n"
        "13. What is this person doing?\n"
        "14. What is the background?\n"
        "15. Are there other people in the background of this person?")
    aggr = prompts.aggr_prompt("A woman in jeans.", ["The person is female.", "She's tall."])
    assert aggr.startswith("Aggregate the following subtexts into continuous and concise text "
                           "sentences.\n    \nExample:\nSubtexts: ['The person is wearing a black "
                           "jacket with a white stripe on the sleeve.', 'The person is male.'")
    assert ("Output: The man has short brown hair and is wearing a black jacket with a white "
            "stripe on the sleeve, a sleeveless striped shirt, a green tank top, green pants, a "
            "red scarf around his neck, and a red hat. The background features an outdoor area "
            "with some structures and other people.\n\nNow let's get started.\n") in aggr
    assert aggr.endswith("Subtexts: ['A woman in jeans.', 'The person is female.', \"She's "
                         "tall.\"]\n\nOutput aggregated sentences without any explanation.")
    assert prompts.T_AGGR.count("{subtexts}") == 1
    assert prompts.dec_prompt("A man.") == (
        "Split the following description of a pedestrian into independent attribute "
        "sub-sentences. Each sub-sentence must be a complete sentence about exactly one attribute "
        "of the person (for example gender, hair, upper clothing, lower clothing, shoes, "
        "accessories, carried items, action or background). Write one sub-sentence per line, "
        "without numbering and without any explanation.\n\nDescription: A man.")
    assert prompts.rwt_prompt("The man wears a hat.", 3) == (
        "Rewrite the following sentence about a pedestrian in 3 different ways. Keep exactly the "
        "same meaning and the same attributes, but use different wording. Write one rewrite per "
        "line, without numbering and without any explanation.\n\nSentence: The man wears a hat.")
    with pytest.raises(ValueError):
        prompts.rwt_prompt("x", 0)


def _model_dir(path, weights: bytes, adapter: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / ("adapter_config.json" if adapter else "config.json")).write_text('{"r": 8}')
    (path / ("adapter_model.safetensors" if adapter else "model.safetensors")).write_bytes(weights)
    return path


def test_folder_digest_follows_weights_not_logs_or_paths(tmp_path, monkeypatch):
    from utils.mllm import identity

    a = _model_dir(tmp_path / "a", b"w" * 1000)
    d = identity.folder_digest(a)
    (a / "trainer_log.jsonl").write_text("{}")   # training by-products are not the model
    (a / "checkpoint-10").mkdir()
    (a / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"old")
    assert identity.folder_digest(a) == d
    assert identity.folder_digest(_model_dir(tmp_path / "copy", b"w" * 1000)) == d  # same content
    (a / "model.safetensors").write_bytes(b"w" * 999 + b"x")
    assert identity.folder_digest(a) != d
    (a / "model.safetensors").write_bytes(b"w" * 1000)
    (a / "tokenizer_config.json").write_text("{}")
    assert identity.folder_digest(a) != d
    # Big shards are sampled, not read whole: a change in a sampled block is seen.
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 100)
    monkeypatch.setattr(identity, "BLOCK", 10)
    big = _model_dir(tmp_path / "big", bytes(1000))
    before = identity.folder_digest(big)
    (big / "model.safetensors").write_bytes(bytes(999) + b"\x01")  # the last block is sampled
    assert identity.folder_digest(big) != before


@pytest.mark.parametrize("backend,adapter_key", [("transformers", "adapter"), ("vllm", "lora")])
def test_local_backends_identity_holds_content_digests(tmp_path, backend, adapter_key):
    """A LoRA retrained into the same folder is another model: other cache keys."""
    from utils.mllm import build_client

    model = _model_dir(tmp_path / "base", b"base weights")
    lora = _model_dir(tmp_path / "lora", b"lora v1", adapter=True)
    kw = {"model": str(model), adapter_key: str(lora), "dtype": "float32"}
    first = build_client(backend, **kw)
    info = first.identity_info()
    assert info["backend"] == backend and info["adapter"] == str(lora.resolve())
    assert len(info["model_digest"]) == len(info["adapter_digest"]) == 16
    assert build_client(backend, **kw).identity() == first.identity()
    (lora / "adapter_model.safetensors").write_bytes(b"lora v2")
    retrained = build_client(backend, **kw)
    assert retrained.identity_info()["adapter_digest"] != info["adapter_digest"]
    assert retrained.cache_key(Request("q"), 0.01, 8) != first.cache_key(Request("q"), 0.01, 8)
    assert build_client(backend, **{**kw, "dtype": "bfloat16"}).identity() != first.identity()


def test_backend_errors_name_the_engine():
    """Every error out of generate() says which backend/model failed (issue 19, case 6)."""
    class Broken(Echo):
        def describe(self):
            return "vLLM offline engine on /models/tiny"

        def _generate(self, requests, temperature, max_tokens):
            raise RuntimeError("CUDA error: device-side assert")

    with pytest.raises(MLLMError, match=r"^vLLM offline engine on /models/tiny failed: "
                                        r"RuntimeError: CUDA error") as info:
        Broken().generate(reqs("a"))
    assert isinstance(info.value.__cause__, RuntimeError)

    class Vague(Broken):
        def _generate(self, requests, temperature, max_tokens):
            raise MLLMError("out of memory", partial={})

    with pytest.raises(MLLMError, match=r"^vLLM offline engine on /models/tiny: out of memory"):
        Vague().generate(reqs("a"))


def test_torn_cache_lines_are_counted_logged_and_returned(tmp_path, caplog):
    """Before: torn lines were skipped silently (only an attribute counted them)."""
    Echo(cache_dir=tmp_path).generate(reqs("a", "b"))
    with open(tmp_path / CACHE_FILE, "ab") as f:  # two kills mid-write, then a good record
        f.write(b'{"key": "0123", "answ\n{"key": "4567"\n')
    Echo(cache_dir=tmp_path).generate(reqs("c"))
    with caplog.at_level("WARNING", logger="utils.mllm.cache"):
        c = Echo(cache_dir=tmp_path)
    assert c.cache.corrupt_lines == 2 and c.stats["cache_skipped_lines"] == 2
    assert f"{tmp_path / CACHE_FILE}: skipped 2 torn or unreadable line(s)" in caplog.text
    assert c.generate(reqs("a", "c")) == ["A", "C"] and c.seen == []
    with open(tmp_path / CACHE_FILE, "ab") as f:  # another process's torn append
        f.write(b'{"torn\n')
    assert c.cache.refresh() == 1 and c.cache.refresh() == 0
    c.generate(reqs("a"))
    assert c.stats["cache_skipped_lines"] == 3


# --- the stage runner (utils.mllm.stages), shared by THI, RDA and the search page -------------
class Scripted(BaseClient):
    """Answers each request with ``answers[request.text]`` (default: the text upper-cased)."""
    backend = "scripted"

    def __init__(self, answers=None, **kw):
        super().__init__(**kw)
        self.answers, self.seen = dict(answers or {}), []

    def identity(self):
        return "scripted"

    def _generate(self, requests, temperature, max_tokens):
        self.seen.append([r.text for r in requests])
        return [self.answers.get(r.text, r.text.upper()) for r in requests]


STAGE_CASES = [  # stage, usable answer, unusable answer
    ("loc", "**Yes**, it is.", "Maybe, hard to say."),
    ("vqa", "1. Female.\n2. She wears a red coat.", "1. Xkqz vbnm.\n2. Qwrt plk zzxv."),
    ("aggr", "Output: The woman wears a red coat.", "Output:   "),
    ("aggr", "A man in a blue shirt.", "Zxq vbn plk trr wqx."),
    ("dec", "- He is male.\n- He wears a blue shirt.", "--\n**"),
    ("rwt", "1. The man is male.\n2. A male person.", "Qqq zzz.\nVvv xxx."),
]


@pytest.mark.parametrize("stage,good,bad", STAGE_CASES)
def test_one_usable_rule_per_stage(stage, good, bad):
    from utils.mllm.stages import usable

    assert usable(stage, good) and not usable(stage, bad) and not usable(stage, None)


def test_aggregation_answer_cleaning_is_one_rule():
    """THI stripped "Output:"/"Answer:" and collapsed spaces; RDA stripped "Output:" and quotes.
    One rule does all of it, for both."""
    from utils.mllm.stages import clean_aggregation

    assert clean_aggregation(' Answer:  "The man wears\n a red   coat." ') == \
        "The man wears a red coat."
    assert clean_aggregation("OUTPUT：“A woman.”") == "A woman."
    assert clean_aggregation(None) == ""


def test_stage_runner_counts_chunks_and_does_not_cache_unusable(tmp_path):
    from utils.mllm.stages import StageRunner

    texts = ["q1", "q2", "q3", "q4", "q5"]
    answers = {"q1": "Yes", "q2": "no.", "q3": "perhaps", "q4": "", "q5": "YES!"}
    client = Scripted(answers, cache_dir=tmp_path)
    runner = StageRunner(client, chunk_size=2)
    seen = []
    out = runner.ask("loc", reqs(*texts), on_chunk=lambda start, a: seen.append((start, list(a))))
    assert out == [answers[t] for t in texts]
    assert seen == [(0, ["Yes", "no."]), (2, ["perhaps", ""]), (4, ["YES!"])]
    c = runner.counts["loc"]
    assert (c.asked, c.uncached, c.cached, c.unusable) == (5, 5, 0, 2)
    again = StageRunner(Scripted(answers, cache_dir=tmp_path))
    again.ask("loc", reqs(*texts))
    c = again.counts["loc"]
    assert (c.asked, c.uncached, c.cached, c.unusable) == (5, 2, 3, 2)  # the unusable re-asked
    assert again.client.seen == [["q3", "q4"]]
    with pytest.raises(ValueError, match="unknown MLLM stage 'lco'"):
        runner.ask("lco", reqs("x"))


def test_stage_runner_takes_a_client_without_accept():
    from utils.mllm.stages import StageRunner

    class Bare:  # a stand-in with the plain generate() signature and no counters
        def generate(self, requests, temperature, max_tokens):
            return ["No"] * len(requests)

    runner = StageRunner(Bare())
    assert runner.ask("loc", reqs("a", "b")) == ["No", "No"]
    assert runner.counts["loc"].uncached == 2 and runner.counts["loc"].unusable == 0


def test_mostly_unusable_banner(caplog):
    import logging

    from utils.mllm.stages import BANNER, report_unusable

    logger = logging.getLogger("stage-test")
    with caplog.at_level("WARNING", logger="stage-test"):
        assert report_unusable(logger, "RDA vqa", 2, 4, "they fall back") is None  # half: quiet
        line = report_unusable(logger, "round 1, loc", 3, 4, "they count as 'No'", first="Hm")
        assert report_unusable(logger, "x", 0, 4, "nothing") is None
    assert line.startswith("MOSTLY UNUSABLE: round 1, loc: 3 of 4 MLLM answers (75%)")
    assert "(first: 'Hm')" in line and "asked again next run" in line
    assert f"{BANNER}\n{line}\n{BANNER}" in caplog.text
    assert "RDA vqa: 2 of 4 MLLM answers (50%)" in caplog.text
