"""pretrain_choice: ViT-B/16 fetched on first use (issue 24); the fetch is always faked here."""
from __future__ import annotations

import hashlib
import io
import urllib.error

import pytest

from model import clip_download as cd

PAYLOAD = b"not really a CLIP archive"


class _Resp(io.BytesIO):
    headers = {"Content-Length": str(len(PAYLOAD))}


def _fake(calls):
    def opener(url):
        calls.append(url)
        return _Resp(PAYLOAD)
    return opener


@pytest.fixture
def fake_model(monkeypatch):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(cd.OPENAI_MODELS, "ViT-B/16", (sha, "ViT-B-16.pt"))
    return sha


def test_first_use_downloads_checks_and_caches(fake_model, tmp_path):
    calls = []
    path = cd.fetch_openai_clip("ViT-B/16", str(tmp_path), opener=_fake(calls))
    assert path == str(tmp_path / "ViT-B-16.pt") and open(path, "rb").read() == PAYLOAD
    assert calls == [f"https://openaipublic.azureedge.net/clip/models/{fake_model}/ViT-B-16.pt"]
    assert cd.fetch_openai_clip("ViT-B/16", str(tmp_path), opener=_fake(calls)) == path
    assert len(calls) == 1  # the cached file with the right hash: no network
    assert [p.name for p in tmp_path.iterdir()] == ["ViT-B-16.pt"]


def test_a_wrong_hash_is_refused_and_nothing_kept(monkeypatch, tmp_path):
    monkeypatch.setitem(cd.OPENAI_MODELS, "ViT-B/16", ("0" * 64, "ViT-B-16.pt"))
    with pytest.raises(cd.CLIPDownloadError, match="not OpenAI's 0000"):
        cd.fetch_openai_clip("ViT-B/16", str(tmp_path), opener=_fake([]))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ViT-B-16.pt").write_bytes(PAYLOAD)  # a cached file of another content
    with pytest.raises(cd.CLIPDownloadError, match="does not have OpenAI's sha256"):
        cd.fetch_openai_clip("ViT-B/16", str(tmp_path), opener=_fake([]))


def test_offline_names_the_url_and_the_folder(fake_model, tmp_path):
    def offline(url):
        raise urllib.error.URLError("Temporary failure in name resolution")
    with pytest.raises(cd.CLIPDownloadError) as info:
        cd.fetch_openai_clip("ViT-B/16", str(tmp_path / "cache"), opener=offline)
    msg = str(info.value)
    assert cd.model_url("ViT-B/16") in msg and str(tmp_path / "cache" / "ViT-B-16.pt") in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_clip_resolves_the_release_name(monkeypatch):
    from model import clip

    seen = []
    monkeypatch.setattr(clip, "fetch_openai_clip", lambda name: seen.append(name) or "/nowhere.pt")
    with pytest.raises(FileNotFoundError, match="/nowhere.pt"):
        clip.load_clip("ViT-B/16")
    assert seen == ["ViT-B/16"]
