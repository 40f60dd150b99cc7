"""Model versions: the revision a worker loads is resolved to a commit, which is part of the fingerprint and
of the image's metadata, so a new revision never returns an image cached for an old one; /models lists the
presets, the versions serving them and the workers on each."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest
from gradio_client import Client

import app as app_module
from inference.images import read_parameters
from inference.presets import ModelIdentity, get_preset
from inference.request import GenerationRequest
from inference.revisions import DigestMemo, folder_digest, pin, resolve_commit
from storage.keys import fingerprint
from tests.conftest import get_json, start_app, stop_app
from tests.services import S3_KEY, S3_SECRET

REPO = "crafterse/tiny-sdxl"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=2, guidance_scale=5.0)


def hub_cache(root: Path, model: Path, commits: tuple[str, ...], main: str) -> Path:
    """A Hugging Face cache as snapshot_download leaves it: snapshots/<commit>/ and refs/main."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    for commit in commits:
        shutil.copytree(model, repo / "snapshots" / commit)
    point_main(root, main)
    return root


def point_main(root: Path, commit: str) -> None:
    refs = root / ("models--" + REPO.replace("/", "--")) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def test_a_local_folder_is_pinned_to_a_digest_of_its_files(tiny_model, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model.taesd, folder)
    before = resolve_commit(str(folder), "main", "config.json")
    assert before == folder_digest(folder) and before.startswith("sha256:")
    assert resolve_commit(str(folder), "main", "config.json") == before  # the same files, the same digest
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert resolve_commit(str(folder), "main", "config.json") != before
    snapshot = tmp_path / "snapshots" / COMMIT_A
    shutil.copytree(tiny_model.taesd, snapshot)
    assert resolve_commit(str(snapshot), "main", "config.json") == COMMIT_A  # a folder of the HF cache


def test_folder_digests_are_remembered_across_restarts(tiny_model, tmp_path) -> None:
    folder, memo_path = tmp_path / "model", tmp_path / "cache" / "folder-digests.json"
    shutil.copytree(tiny_model.taesd, folder)
    memo = DigestMemo(memo_path)
    digest = folder_digest(folder, memo)
    memo.save()
    assert digest == folder_digest(folder) and memo_path.is_file()
    # A restart stats the files and reads none: proven by bytes changed under an unchanged size and time...
    weights = max(folder.iterdir(), key=lambda path: path.stat().st_size)
    stat = weights.stat()
    weights.write_bytes(bytes(stat.st_size))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_digest(folder, DigestMemo(memo_path)) == digest
    os.utime(weights)  # ...while a file written anew (a new time) is read again
    assert folder_digest(folder, DigestMemo(memo_path)) != digest
    shutil.rmtree(folder)  # deleted weights leave the memo at its next save
    other = tmp_path / "other"
    shutil.copytree(tiny_model.taesd, other)
    memo = DigestMemo(memo_path)
    folder_digest(other, memo)
    memo.save()
    assert all(key.startswith(str(other.resolve())) for key in DigestMemo(memo_path).entries)


def test_a_hub_revision_resolves_through_the_cache_when_offline(tiny_model, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    root = hub_cache(tmp_path / "hub", tiny_model.sdxl, (COMMIT_A, COMMIT_B), main=COMMIT_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_commit(REPO, "main", "model_index.json") == COMMIT_A
    assert resolve_commit(REPO, COMMIT_B, "model_index.json") == COMMIT_B  # a commit names itself
    assert resolve_commit("nobody/unknown", "main", "model_index.json") is None

    preset = get_preset("base")
    request = GenerationRequest.create("a lantern", preset="base", seed=3)
    on_a = pin(ModelIdentity.resolve(preset, REPO, "main", "none"))
    assert on_a.commit_of("model") == COMMIT_A and on_a.hub_revision("model") == COMMIT_A
    # "main" and the commit it names are one model; the same name after a push is another.
    assert fingerprint(request, on_a) == fingerprint(request, pin(ModelIdentity.resolve(preset, REPO, COMMIT_A, "none")))
    point_main(root, COMMIT_B)
    on_b = pin(ModelIdentity.resolve(preset, REPO, "main", "none"))
    assert on_b.commit_of("model") == COMMIT_B and fingerprint(request, on_b) != fingerprint(request, on_a)


def test_an_unresolvable_revision_keeps_its_name_and_says_so(caplog) -> None:
    identity = ModelIdentity.resolve(get_preset("base"), "/no/such/folder", None, "none")
    with caplog.at_level("WARNING"):
        pinned = pin(identity)
    assert pinned.commits == () and pinned.as_dict() == identity.as_dict()  # fingerprints as before
    assert "could not resolve model /no/such/folder@main" in caplog.text


def test_models_groups_workers_by_version() -> None:
    one = {"model_id": "m", "revision": "main", "commit": COMMIT_A, "commits": {"model": COMMIT_A}}
    two = dict(one, commit=COMMIT_B, commits={"model": COMMIT_B})
    workers = [{"worker": "w1", "preset": "turbo", "versions": one}, {"worker": "w2", "preset": "turbo", "versions": two},
               {"worker": "w3", "preset": "turbo", "versions": one}]
    entry = app_module._preset_entry(get_preset("turbo"), workers)
    assert entry["served"] and entry["name"] == "turbo" and entry["max_steps"] == 4
    assert [(v["commit"], v["workers"]) for v in entry["versions"]] == [(COMMIT_A, ["w1", "w3"]), (COMMIT_B, ["w2"])]
    assert app_module._preset_entry(get_preset("lightning"), [])["versions"] == []


@pytest.fixture
def shared_cache_env(redis_server, s3_server) -> dict[str, str]:
    """Redis and S3: the result cache outlives a process and is shared by every Space on it."""
    return dict(MODEL_PRESET="base", WARMUP="0", REDIS_URL=redis_server.url, REDIS_NAMESPACE=f"v{secrets.token_hex(4)}",
                S3_ENDPOINT_URL=s3_server.endpoint, R2_BUCKET=s3_server.bucket(), R2_ACCESS_KEY_ID=S3_KEY,
                R2_SECRET_ACCESS_KEY=S3_SECRET)


def test_a_new_revision_never_returns_an_image_cached_for_the_old_one(tiny_model, tmp_path, shared_cache_env) -> None:
    """Two Spaces on one cache: one started while main was commit A, the other after main moved to B."""
    root = hub_cache(tmp_path / "hub", tiny_model.sdxl, (COMMIT_A, COMMIT_B), main=COMMIT_A)
    env = dict(shared_cache_env, MODEL_ID=REPO, HF_HUB_CACHE=str(root))
    old = start_app(tiny_model, tmp_path / "old", WORKER_NAME="old", **env)
    point_main(root, COMMIT_B)
    new = start_app(tiny_model, tmp_path / "new", WORKER_NAME="new", **env)
    try:
        assert get_json(f"{old.url}/healthz")[1]["model"]["commit"] == COMMIT_A
        models = get_json(f"{new.url}/models")[1]
        assert models["this_worker"]["commit"] == COMMIT_B and models["this_worker"]["revision"] == "main"
        base = next(p for p in models["presets"] if p["name"] == "base")
        assert [(v["commit"], v["workers"]) for v in base["versions"]] == [(COMMIT_B, ["new"])]
        assert not next(p for p in models["presets"] if p["name"] == "turbo")["served"]

        on_old, on_new = Client(old.url, verbose=False), Client(new.url, verbose=False)
        _, first = on_old.predict("a brass lantern", **FIELDS, seed=5, api_name="/generate")[:2]
        assert first["model_revision"] == COMMIT_A and not first["cached"]
        path, second = on_new.predict("a brass lantern", **FIELDS, seed=5, api_name="/generate")[:2]
        assert second["model_revision"] == COMMIT_B and not second["cached"]  # rendered again, by commit B
        assert second["fingerprint"] != first["fingerprint"]
        assert f"Model hash: {COMMIT_B[:10]}" in read_parameters(Path(path).read_bytes())
        # Each commit's image is still a cache hit for that commit, across the two processes' shared cache.
        assert on_old.predict("a brass lantern", **FIELDS, seed=5, api_name="/generate")[1]["model_revision"] == COMMIT_A
        again = on_new.predict("a brass lantern", **FIELDS, seed=5, api_name="/generate")[1]
        assert again["cached"] and again["fingerprint"] == second["fingerprint"]
        assert on_new.predict(api_name="/models")["this_worker"]["commit"] == COMMIT_B  # the API twin of GET /models
    finally:
        stop_app(old)
        stop_app(new)
