"""The local Hub server (tests/hub_server.py) driven by the real ``huggingface_hub`` client and transformers.

Each test uses its own repositories (``org/<test name>-<n>``), so the tests do not depend on one another and
the shared hub needs no reset; the tests of ``reset`` and pagination use a private ``LocalHub``.
"""

# ruff: noqa: E402  (the local Hub must be installed before huggingface_hub is imported)
from __future__ import annotations

try:
    from hub_server import LocalHub, git_blob_oid, install_local_hub
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "hub_server":
        raise
    from tests.hub_server import LocalHub, git_blob_oid, install_local_hub

HUB = install_local_hub()

import http.client
import itertools
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    ModelCardData,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.hub

TESTS_DIR = Path(__file__).resolve().parent
_COUNTER = itertools.count()


@pytest.fixture
def api() -> HfApi:
    return HfApi()


@pytest.fixture
def repo_id(request: pytest.FixtureRequest) -> str:
    """A fresh repository id for this test (not created yet)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:60]
    return f"org/{name}-{next(_COUNTER)}"


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _folder_files() -> dict[str, bytes]:
    rng = random.Random(1234)
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 16}).encode(),
        "README.md": b"---\nlicense: apache-2.0\ntags:\n- ctx2param\nlibrary_name: transformers\n---\n# T\n",
        "model.safetensors": rng.randbytes(3 * 1024 * 1024),  # binary, 3 MB, sent inline
        "nested/deeper/notes.txt": "unicode é ü ✓\n".encode(),
        "nested/params.json": b'{"r": 8}',
        "empty.txt": b"",
    }


def _plain_path_only(log: list[tuple[str, str, int]]) -> None:
    """No LFS batch, Xet token, or other out-of-band upload/download endpoint was ever requested."""
    for method, path, _ in log:
        assert "xet" not in path.lower() and "/info/lfs" not in path and ".git/" not in path, (method, path)


# ---------------------------------------------------------------------------------------------- setup


def test_install_is_idempotent_and_configures_client_environment() -> None:
    assert install_local_hub() is HUB
    host, port = HUB.server_address
    assert host == "127.0.0.1" and port > 0
    assert HUB.endpoint == f"http://127.0.0.1:{port}" == os.environ["HF_ENDPOINT"]
    assert HUB.endpoint == huggingface_hub.constants.ENDPOINT
    home = Path(os.environ["HF_HOME"])
    assert home == Path(HUB.home) and home.is_dir()
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    assert cache.resolve().is_relative_to(home.resolve())
    assert os.environ["HF_TOKEN"] == "dummy-token"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_install_after_client_import_raises_clear_error() -> None:
    code = textwrap.dedent(
        """
        import huggingface_hub.constants
        import hub_server
        try:
            hub_server.install_local_hub()
        except RuntimeError as e:
            print("RAISED:", e)
        else:
            print("NO ERROR")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "RAISED:" in out.stdout and "before huggingface_hub" in out.stdout, out.stdout


def test_whoami_and_token_required_for_writes(api: HfApi) -> None:
    assert api.whoami()["name"] == HUB.username
    conn = http.client.HTTPConnection(*HUB.server_address, timeout=10)
    body = json.dumps({"name": "no-token", "organization": "org"})
    conn.request("POST", "/api/repos/create", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 401
    assert "token" in json.loads(response.read())["error"]
    conn.close()
    assert "org/no-token" not in HUB.repos()


# ---------------------------------------------------------------------------------------------- repos


def test_create_repo_conflict_exist_ok_and_delete(api: HfApi, repo_id: str) -> None:
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url == f"{HUB.endpoint}/{repo_id}"
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(repo_id)
    assert info.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    assert api.repo_exists(repo_id)
    # A new repository holds .gitattributes, as on the Hub.
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert b"*.safetensors filter=lfs" in HUB.files(repo_id)[".gitattributes"]

    # No namespace: the repository lands under the token's user.
    bare = repo_id.split("/")[1] + "-bare"
    assert api.create_repo(bare).repo_id == f"{HUB.username}/{bare}"

    dataset = api.create_repo(repo_id, repo_type="dataset")
    assert dataset.repo_type == "dataset" and repo_id in HUB.repos("dataset")

    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)
    assert api.repo_exists(repo_id, repo_type="dataset")  # types are separate namespaces
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_upload_folder_list_info_download_and_snapshot(api: HfApi, repo_id: str, tmp_path: Path) -> None:
    files = _folder_files()
    _write(tmp_path / "src", files)
    api.create_repo(repo_id)
    HUB.clear_request_log()
    info = api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id, commit_message="Add tiny model")
    assert re.fullmatch(r"[0-9a-f]{40}", info.oid)

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
    stored = HUB.files(repo_id)
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == files
    assert HUB.commits(repo_id)[0]["title"] == "Add tiny model"

    model = api.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes["model.safetensors"] == 3 * 1024 * 1024 and sizes["empty.txt"] == 0
    blob_ids = {s.rfilename: s.blob_id for s in model.siblings}
    assert blob_ids["config.json"] == git_blob_oid(files["config.json"])
    assert model.card_data is not None and model.card_data.license == "apache-2.0"
    assert "ctx2param" in model.tags and model.library_name == "transformers"

    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(repo_id)}
    assert ("RepoFolder", "nested") in top and ("RepoFile", "config.json") in top
    assert not any(p.startswith("nested/") for _, p in top)
    nested = sorted(e.path for e in api.list_repo_tree(repo_id, path_in_repo="nested"))
    assert nested == ["nested/deeper", "nested/params.json"]

    snap = Path(snapshot_download(repo_id, allow_patterns=["*.json"]))  # the cache holds nothing yet
    got = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    assert got == ["config.json", "nested/params.json"]
    assert (snap / "nested" / "params.json").read_bytes() == files["nested/params.json"]

    for name, data in files.items():
        assert Path(hf_hub_download(repo_id, name)).read_bytes() == data, name
    assert api.file_exists(repo_id, "nested/deeper/notes.txt")
    assert not api.file_exists(repo_id, "nested/missing.txt")
    full = Path(snapshot_download(repo_id, local_dir=tmp_path / "full"))
    assert {
        str(p.relative_to(full)): p.read_bytes()
        for p in full.rglob("*")
        if p.is_file() and ".cache" not in p.parts
    } == {**files, ".gitattributes": stored[".gitattributes"]}

    # Everything went through preupload + inline commit and resolve: no LFS, no Xet.
    log = HUB.request_log
    _plain_path_only(log)
    assert any(m == "POST" and p.endswith("/preupload/main") for m, p, _ in log)
    failed = [(method, path, status) for method, path, status in log if status >= 400]
    assert failed == [("HEAD", f"/{repo_id}/resolve/main/nested/missing.txt", 404)]


def test_errors_map_to_client_exceptions(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id)
    missing_repo = repo_id + "-missing"

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing_repo, "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing_repo)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(missing_repo)
    assert not api.repo_exists(missing_repo)

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "a.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    assert not api.revision_exists(repo_id, "no-such-branch")
    assert api.revision_exists(repo_id, "main")

    with pytest.raises(EntryNotFoundError) as info:
        hf_hub_download(repo_id, "missing.txt")
    assert isinstance(info.value, HfHubHTTPError) and info.value.response.status_code == 404
    assert not api.file_exists(repo_id, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree(repo_id, path_in_repo="no-such-folder").__next__()

    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=missing_repo)


@pytest.mark.skipif(
    int(huggingface_hub.__version__.split(".")[0]) < 2,
    reason="huggingface_hub 1.x RepoCard.validate() posts to the hard-coded https://huggingface.co/api/"
    "validate-yaml, so ModelCard.push_to_hub needs the real Hub; upload README.md with HfApi.upload_file",
)
def test_model_card_push_to_hub(api: HfApi, repo_id: str) -> None:
    card = ModelCard.from_template(ModelCardData(license="mit", tags=["ctx2param"]), model_description="d")
    api.create_repo(repo_id)
    card.push_to_hub(repo_id)  # validates through /api/validate-yaml, then commits README.md
    assert api.model_info(repo_id).card_data.license == "mit"
    assert HUB.files(repo_id)["README.md"].decode() == str(card)


def test_model_card_private_repos_listing_and_filesystem(api: HfApi, repo_id: str) -> None:
    card = ModelCard.from_template(ModelCardData(license="mit", tags=["ctx2param"]), model_description="d")
    api.create_repo(repo_id)
    # create_commit validates README.md metadata through the endpoint it is configured with.
    api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id)
    info = api.model_info(repo_id)
    assert info.card_data.license == "mit" and "ctx2param" in info.tags
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nfoo: [\n---\nbad", path_in_repo="README.md", repo_id=repo_id)

    private_id = repo_id + "-private"
    api.create_repo(private_id, private=True)
    assert api.model_info(private_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(private_id, token=False)  # invisible without a token
    api.update_repo_settings(private_id, private=False)
    assert api.model_info(private_id, token=False).private is False
    namespace = repo_id.split("/")[0]
    assert {repo_id, private_id} <= {m.id for m in api.list_models(author=namespace)}

    HUB.add_files(repo_id, {"a/b.txt": "hello", "c.bin": bytes(range(100))}, message="seeded")
    fs = HfFileSystem()
    assert sorted(fs.ls(repo_id, detail=False)) == sorted(
        f"{repo_id}/{name}" for name in (".gitattributes", "README.md", "a", "c.bin")
    )
    assert fs.glob(f"{repo_id}/**/*.txt") == [f"{repo_id}/a/b.txt"]
    with fs.open(f"{repo_id}/c.bin", "rb") as f:  # ranged reads
        f.seek(10)
        assert f.read(5) == bytes(range(10, 15))
    assert fs.read_text(f"{repo_id}/a/b.txt") == "hello"


# ---------------------------------------------------------------------------------------------- commits


def test_commit_operations_history_and_noop(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    first = api.create_commit(
        repo_id,
        [
            CommitOperationAdd("keep.txt", b"keep"),
            CommitOperationAdd("drop.txt", b"drop"),
            CommitOperationAdd("dir/a.bin", bytes(range(256))),
            CommitOperationAdd("dir/sub/b.txt", b"b"),
        ],
        commit_message="first",
        commit_description="with a description",
    )
    second = api.create_commit(
        repo_id,
        [
            CommitOperationDelete("drop.txt"),
            CommitOperationDelete("dir/", is_folder=True),
            CommitOperationCopy("keep.txt", "copy/keep.txt"),
            CommitOperationAdd("keep.txt", b"keep v2"),
        ],
        commit_message="second",
    )
    assert HUB.files(repo_id) == {
        ".gitattributes": HUB.files(repo_id)[".gitattributes"],
        "copy/keep.txt": b"keep",
        "keep.txt": b"keep v2",
    }
    assert HUB.files(repo_id, first.oid)["dir/sub/b.txt"] == b"b"  # old commits stay readable
    assert Path(hf_hub_download(repo_id, "drop.txt", revision=first.oid)).read_bytes() == b"drop"

    commits = api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert commits[1].message == "first\n\nwith a description"

    # Same content again: preupload reports the remote blob id, the client skips the commit.
    again = api.upload_file(path_or_fileobj=b"keep v2", path_in_repo="keep.txt", repo_id=repo_id)
    assert again.oid == second.oid and len(api.list_repo_commits(repo_id)) == 3

    # A stale parent commit is refused (412), like on the Hub.
    with pytest.raises(HfHubHTTPError) as info:
        api.create_commit(
            repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="stale", parent_commit=first.oid
        )
    assert info.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, [CommitOperationDelete("never-there.txt")], commit_message="bad delete")
    assert "x.txt" not in HUB.files(repo_id)


def test_gitignore_marks_files_to_skip(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        [
            CommitOperationAdd(".gitignore", b"*.log\ncache/\n!keep.log\n"),
            CommitOperationAdd("run.log", b"noise"),
            CommitOperationAdd("keep.log", b"kept"),
            CommitOperationAdd("cache/x.bin", b"cached"),
            CommitOperationAdd("weights.bin", b"w"),
        ],
        commit_message="with gitignore",
    )
    assert sorted(HUB.files(repo_id)) == [".gitattributes", ".gitignore", "keep.log", "weights.bin"]


def test_branches_tags_and_pull_requests(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id)
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    with pytest.raises(HfHubHTTPError) as info:
        api.create_branch(repo_id, branch="dev")
    assert info.value.response.status_code == 409
    api.create_branch(repo_id, branch="dev", exist_ok=True)

    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo_id, revision="dev")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_url is not None and pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"

    def read(revision: str) -> bytes:
        return Path(hf_hub_download(repo_id, "f.txt", revision=revision)).read_bytes()

    assert read("main") == b"v1" and read("v1") == b"v1" and read("dev") == b"dev"
    assert read("refs/pr/1") == b"pr"
    api.upload_file(path_or_fileobj=b"pr2", path_in_repo="f.txt", repo_id=repo_id, revision="refs/pr/1")
    assert read("refs/pr/1") == b"pr2" and HUB.files(repo_id)["f.txt"] == b"v1"

    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert sorted(b.name for b in refs.branches) == ["dev", "main"]
    assert [t.name for t in refs.tags] == ["v1"]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    with pytest.raises(HfHubHTTPError):  # tags are read-only
        api.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id=repo_id, revision="v1")
    api.delete_branch(repo_id, branch="dev")
    assert not api.revision_exists(repo_id, "dev")


def test_tree_expand_and_paths_info(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    first = api.upload_file(
        path_or_fileobj=b"1", path_in_repo="d/one.txt", repo_id=repo_id, commit_message="one"
    )
    second = api.upload_file(
        path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=repo_id, commit_message="two"
    )
    entries = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True, expand=True)}
    assert entries["d/one.txt"].last_commit.oid == first.oid
    assert entries["two.txt"].last_commit.oid == second.oid
    assert entries["d"].last_commit.title == "one"
    infos = api.get_paths_info(repo_id, ["two.txt", "d", "absent.txt"])
    assert sorted((type(i).__name__, i.path) for i in infos) == [("RepoFile", "two.txt"), ("RepoFolder", "d")]
    assert next(i for i in infos if i.path == "two.txt").size == 1


# ---------------------------------------------------------------------------------------------- raw HTTP


def test_resolve_headers_ranges_and_keep_alive(api: HfApi, repo_id: str) -> None:
    data = bytes(range(256)) * 4
    api.create_repo(repo_id)
    commit = api.upload_file(path_or_fileobj=data, path_in_repo="w/blob.bin", repo_id=repo_id)
    conn = http.client.HTTPConnection(*HUB.server_address, timeout=10)
    auth = {"Authorization": "Bearer dummy-token"}

    # An error answer to a request with a body, then more requests on the same connection.
    conn.request("POST", f"/api/models/{repo_id}-missing/commit/main", body=b"x" * 100_000, headers=auth)
    response = conn.getresponse()
    assert response.status == 404 and response.getheader("X-Error-Code") == "RepoNotFound"
    response.read()

    conn.request("HEAD", f"/{repo_id}/resolve/main/w/blob.bin")
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("ETag") == f'"{git_blob_oid(data)}"'
    assert response.getheader("X-Repo-Commit") == commit.oid
    assert int(response.getheader("Content-Length")) == len(data) == int(response.getheader("X-Linked-Size"))
    assert not [h for h, _ in response.getheaders() if "xet" in h.lower()]

    conn.request("GET", f"/{repo_id}/resolve/main/w/blob.bin", headers={"Range": "bytes=10-19"})
    response = conn.getresponse()
    assert response.status == 206 and response.read() == data[10:20]
    assert response.getheader("Content-Range") == f"bytes 10-19/{len(data)}"
    conn.request("GET", f"/{repo_id}/resolve/main/w/blob.bin", headers={"Range": "bytes=-6"})
    response = conn.getresponse()
    assert response.status == 206 and response.read() == data[-6:]
    conn.request("GET", f"/{repo_id}/resolve/main/w/blob.bin", headers={"Range": f"bytes={len(data)}-"})
    response = conn.getresponse()
    response.read()
    assert response.status == 416

    conn.request("GET", f"/{repo_id}/resolve/main/w/absent.bin")
    response = conn.getresponse()
    response.read()
    assert response.status == 404 and response.getheader("X-Error-Code") == "EntryNotFound"
    assert response.getheader("X-Repo-Commit") == commit.oid  # lets the client cache the absence

    conn.request("GET", f"/{repo_id}/resolve/{commit.oid}/w/blob.bin")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == data
    conn.request("GET", "/api/no-such-endpoint")
    response = conn.getresponse()
    assert response.status == 404 and b"no such endpoint" in response.read()
    conn.close()


# ---------------------------------------------------------------------------------------------- offline


def test_offline_mode_uses_cache_and_reports_missing(api: HfApi, repo_id: str) -> None:
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b'{"cached": true}', path_in_repo="config.json", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"never fetched", path_in_repo="other.txt", repo_id=repo_id)
    hf_hub_download(repo_id, "config.json")  # cache it online first
    code = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        assert constants.HF_HUB_OFFLINE
        result = {{"cached": Path(hf_hub_download({repo_id!r}, "config.json")).read_text()}}
        try:
            hf_hub_download({repo_id!r}, "other.txt")
        except LocalEntryNotFoundError as e:
            result["missing"] = type(e).__name__ + ": " + str(e)
        print(json.dumps(result))
        """
    )
    HUB.clear_request_log()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cached"] == '{"cached": true}'
    assert result["missing"].startswith("LocalEntryNotFoundError")
    assert HUB.request_log == []  # offline means offline


# ---------------------------------------------------------------------------------------------- private hub


def test_private_hub_seeding_pagination_and_reset() -> None:
    with LocalHub(username="someone") as hub:
        assert hub.endpoint != HUB.endpoint
        client = HfApi(endpoint=hub.endpoint, token="another-token")
        assert client.whoami()["name"] == "someone"
        many = {f"shard/{i:04d}.txt": str(i) for i in range(1030)}
        oid = hub.add_files("team/many", many, message="seed")
        files = client.list_repo_files("team/many")  # > 1000 entries: two pages through the Link header
        assert len(files) == 1031 and "shard/1029.txt" in files
        assert client.model_info("team/many").sha == oid
        assert sum(1 for _, path, _ in hub.request_log if "/tree/" in path) == 2
        with pytest.raises(KeyError, match="no model repository 'team/other'"):
            hub.files("team/other")
        with pytest.raises(KeyError, match="no revision 'nope'"):
            hub.files("team/many", "nope")
        with pytest.raises(ValueError, match="Invalid repo name"):
            hub.create_repo("team/bad name")

        hub.reset()
        assert hub.repos() == [] and hub.request_log == []
        with pytest.raises(RepositoryNotFoundError):
            client.model_info("team/many")
    assert "team/many" not in HUB.repos()


# ---------------------------------------------------------------------------------------------- transformers


def test_transformers_from_pretrained_and_push_to_hub(api: HfApi, repo_id: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    api.create_repo(repo_id)
    api.upload_folder(folder_path=tmp_path / "tiny", repo_id=repo_id)

    HUB.clear_request_log()
    loaded = AutoModelForCausalLM.from_pretrained(repo_id).eval()
    _plain_path_only(HUB.request_log)
    assert type(loaded) is LlamaForCausalLM
    expected = model.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # transformers probes for an adapter first; the server answered EntryNotFound (404), not an error page.
    probes = [status for _, path, status in HUB.request_log if path.endswith("/adapter_config.json")]
    assert probes and all(status == 404 for status in probes), probes

    pushed_id = repo_id + "-pushed"
    model.push_to_hub(pushed_id, commit_message="Push tiny llama")
    pushed = HUB.files(pushed_id)
    assert {"config.json", "model.safetensors"} <= set(pushed)
    assert HUB.commits(pushed_id)[0]["title"] == "Push tiny llama"
    again = AutoModelForCausalLM.from_pretrained(pushed_id)
    for name, tensor in expected.items():
        assert torch.equal(tensor, again.state_dict()[name]), name
