"""A local stand-in for the Hugging Face Hub HTTP API, so that publishing code can be tested offline.

The real Hub cannot be reached from the machines that test ctx2param. This module runs a small HTTP
server (standard library only, ``ThreadingHTTPServer`` on ``127.0.0.1``) that speaks enough of the Hub
API for the real ``huggingface_hub`` client (2.x and 1.x) and for ``transformers``' ``from_pretrained``
/ ``push_to_hub`` to work against it:

- repositories: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``POST /api/repos/move``,
  ``PUT /api/{type}s/{id}/settings``;
- information: ``GET /api/{type}s/{id}[/revision/{rev}]`` (``sha``, ``siblings``, ``cardData``, ...),
  ``GET /api/{type}s/{id}/tree/{rev}[/{path}]`` (paginated with ``Link`` headers),
  ``POST /api/{type}s/{id}/paths-info/{rev}``, ``GET /api/{type}s/{id}/refs``,
  ``GET /api/{type}s/{id}/commits/{rev}``, ``GET /api/models``, ``GET /api/whoami-v2``;
- uploads: ``POST /api/{type}s/{id}/preupload/{rev}`` answers ``uploadMode: "regular"`` for every file, so
  the client sends file contents inline (base64) in the NDJSON body of ``POST /api/{type}s/{id}/commit/{rev}``
  (``file``, ``deletedFile``, ``deletedFolder`` lines; ``lfsFile`` only for content the server already holds);
  no LFS or Xet endpoint is needed and no response carries a Xet header, so the client never tries Xet;
  ``create_pr`` (``refs/pr/N``), ``parentCommit`` (412 when stale), ``.gitignore`` (``shouldIgnore``);
- branches and tags: ``POST``/``DELETE /api/{type}s/{id}/branch/{name}``, ``.../tag/{rev}``;
- downloads: ``HEAD``/``GET /[{type}s/]{id}/resolve/{rev}/{path}`` with ``ETag`` (git blob id),
  ``X-Repo-Commit``, ``X-Linked-Size``, ``Content-Length`` and single ``Range`` requests (206);
- errors: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the last one
  with ``X-Repo-Commit``, so the client caches the absence), 409 for existing repositories, branches and tags,
  401 without a token on requests that need one; every error body is JSON ``{"error": ...}``.

The store is in memory: repositories by (type, id), commits with 40-hex ids, blobs by git blob id. A new
repository starts, like on the Hub, with one commit holding a ``.gitattributes`` file. Every request body is
read in full before the answer is sent, so keep-alive connections stay in step.

Use in tests::

    hub = install_local_hub()  # before huggingface_hub / transformers are imported
    ...                        # HfApi(), hf_hub_download, from_pretrained, push_to_hub now use the local Hub
    assert hub.files("org/tiny")["config.json"] == b"..."

``LocalHub()`` also starts a separate server (no environment change) for tests that want a private one; pass
its ``endpoint`` to ``HfApi(endpoint=...)``.

Not implemented: LFS / Xet storage (never asked for), discussions and pull-request comments, Spaces runtime,
collections, inference. Any request outside the list above gets 404 "no such endpoint" with the path, so a
missing feature shows up plainly. Known client quirk: huggingface_hub 1.x ``RepoCard.validate()`` (called by
``ModelCard.push_to_hub``) posts to the hard-coded ``https://huggingface.co/api/validate-yaml``, so with 1.x
push a card as ``README.md`` through ``HfApi.upload_file`` / ``create_commit`` (they validate through the
configured endpoint) instead.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

__all__ = ["LocalHub", "install_local_hub"]

# Whichever name this file is imported under ("hub_server" when tests/ is on sys.path, "tests.hub_server"
# when tests/ is a package), make the other name resolve to this same module object, so that there is
# only one `install_local_hub` singleton per process.
for _alias in ("hub_server", "tests.hub_server"):
    sys.modules.setdefault(_alias, sys.modules[__name__])

REPO_TYPES = ("model", "dataset", "space")
_API_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "branch", "tag", "settings"}
)
_DEFAULT_BRANCH = "main"
_TREE_PAGE_SIZE = 1000
_TREE_PAGE_SIZE_EXPANDED = 50
_COMMITS_PAGE_SIZE = 50
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_COMMIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_OID_RE = re.compile(r"^[0-9a-f]{7,39}$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]*$")
_INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

# What a new repository's .gitattributes holds on the Hub (the usual LFS patterns).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
).encode()  # fmt: skip


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints), as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """The current UTC time in the Hub's format, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer: status, optional ``X-Error-Code`` and a message (sent as header and JSON)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields of the JSON body


def _repo_not_found(repo_type: str, repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_type} '{repo_id}'", "RepoNotFound")


def _revision_not_found(repo_id: str, revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision} (repository '{repo_id}')", "RevisionNotFound")


def _bad_request(message: str) -> HubError:
    return HubError(400, message)


@dataclass
class _Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    author: str
    tree: dict[str, str]  # path -> blob oid


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    internal_id: str
    sdk: str | None = None
    gated: bool | str = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    discussion_count: int = 0

    @property
    def url_path(self) -> str:
        return _URL_PREFIXES[self.repo_type] + self.repo_id


@dataclass
class _Request:
    method: str
    path: str  # raw path, without the query
    segments: list[str]  # raw (still percent-encoded) path segments
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    token: str | None

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise _bad_request(f"Request body is not valid JSON: {e}") from None

    def flag(self, name: str) -> bool:
        values = self.query.get(name) or self.query.get(f"{name}[]") or []
        return bool(values) and values[-1].lower() in ("1", "true", "yes")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict | None = None) -> _Response:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class _GitIgnore:
    """A small ``.gitignore`` matcher: ``*``, ``**``, ``?``, ``[...]``, ``!`` negation, ``/`` anchoring and
    trailing ``/`` for folders. A path is ignored when it or one of its parent folders matches."""

    def __init__(self, content: str):
        self.rules: list[tuple[re.Pattern, bool, bool]] = []  # (regex, negated, folders only)
        for raw in content.splitlines():
            line = raw.rstrip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            if negated:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.strip("/") if dir_only else line
            anchored = "/" in line.rstrip("/")
            line = line.lstrip("/")
            self.rules.append((re.compile(self._translate(line, anchored)), negated, dir_only))

    @staticmethod
    def _translate(pattern: str, anchored: bool) -> str:
        out, i = [], 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = pattern.find("]", i + 1)
                if end == -1:
                    out.append(re.escape(c))
                else:
                    out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
                    i = end
            else:
                out.append(re.escape(c))
            i += 1
        return ("^" if anchored else r"^(?:.*/)?") + "".join(out) + "$"

    def ignores(self, path: str) -> bool:
        parts = path.split("/")
        candidates = [("/".join(parts[:k]), True) for k in range(1, len(parts))] + [(path, False)]
        for candidate, is_dir in candidates:
            ignored = False
            for regex, negated, dir_only in self.rules:
                if dir_only and not is_dir:
                    continue
                if regex.match(candidate):
                    ignored = not negated
            if ignored:
                return True
        return False


def _parse_card_data(readme: bytes) -> dict | None:
    """The YAML metadata block of a README (``---`` ... ``---``) as a dict, if PyYAML can parse it."""
    text = readme.decode("utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.DOTALL)
    if match is None:
        return None
    try:
        import yaml  # PyYAML is a dependency of huggingface_hub; optional here
    except ImportError:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class LocalHub:
    """A running local Hub server with its in-memory store.

    Args:
        username: the user that ``/api/whoami-v2`` reports; repositories created without a namespace land
            under it.
        max_request_bytes: larger request bodies are refused with 413 (uploads are sent inline, base64).
        idle_timeout: seconds after which an idle keep-alive connection is closed by the server.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``.
        home: the temporary ``HF_HOME`` when installed with :func:`install_local_hub`, else ``None``.
    """

    def __init__(
        self, *, username: str = "local-user", max_request_bytes: int = 1 << 30, idle_timeout: float = 300.0
    ):
        if not _NAME_RE.match(username):
            raise ValueError(
                f"username {username!r} is not a valid Hub user name (letters, digits, '-', '_', '.')"
            )
        self.username = username
        self.max_request_bytes = int(max_request_bytes)
        self.home: str | None = None
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._sha256_to_oid: dict[str, str] = {}
        self._counter = itertools.count()
        self._log: deque[tuple[str, str, int]] = deque(maxlen=10_000)

        handler = type("_BoundHandler", (_Handler,), {"hub": self, "timeout": idle_timeout})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="local-hub", daemon=True
        )
        self._thread.start()
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    @property
    def server_address(self) -> tuple[str, int]:
        """The (host, port) the server listens on; the host is always ``127.0.0.1``."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop the server (idempotent). The store stays readable."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalHub(endpoint={self.endpoint!r}, repos={len(self._repos)})"

    def reset(self, *, clear_cache: bool = True) -> None:
        """Forget every repository, commit and logged request. With ``clear_cache`` (default) and a hub
        installed by :func:`install_local_hub`, also empty the client's download cache (``$HF_HOME/hub``)
        so that files from before the reset are not served from disk."""
        with self._lock:
            self._repos.clear()
            self._blobs.clear()
            self._sha256_to_oid.clear()
            self._log.clear()
        if clear_cache and self.home is not None:
            shutil.rmtree(os.path.join(self.home, "hub"), ignore_errors=True)

    # ------------------------------------------------------------------ inspection helpers for tests

    def repos(self, repo_type: str = "model") -> list[str]:
        """Sorted ids of the repositories of ``repo_type`` (``"model"``, ``"dataset"`` or ``"space"``)."""
        _check_repo_type(repo_type)
        with self._lock:
            return sorted(repo_id for (rtype, repo_id) in self._repos if rtype == repo_type)

    def files(
        self, repo_id: str, revision: str = _DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The files of a repository at ``revision`` (branch, tag, ``refs/pr/N`` or commit id): path -> bytes.

        Raises:
            KeyError: the repository or the revision does not exist (the message lists what does).
        """
        with self._lock:
            repo = self._lookup_for_helper(repo_type, repo_id)
            commit = self._lookup_commit_for_helper(repo, revision)
            return {path: self._blobs[oid] for path, oid in sorted(commit.tree.items())}

    def commits(
        self, repo_id: str, revision: str = _DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> list[dict]:
        """The history of ``revision``, newest first: ``{"oid", "title", "message", "date", "parents"}``."""
        with self._lock:
            repo = self._lookup_for_helper(repo_type, repo_id)
            head = self._lookup_commit_for_helper(repo, revision)
            return [
                {
                    "oid": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "parents": list(c.parents),
                }
                for c in self._history(repo, head.oid)
            ]

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Branch name -> head commit id."""
        with self._lock:
            return dict(self._lookup_for_helper(repo_type, repo_id).branches)

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        """The requests served so far (at most the last 10,000) as ``(method, path, status)``."""
        with self._lock:
            return list(self._log)

    def clear_request_log(self) -> None:
        """Empty :attr:`request_log`."""
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ seeding helpers for tests

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> str:
        """Create a repository directly (no HTTP); returns its id. See :meth:`add_files` to fill it."""
        with self._lock:
            try:
                return self._create_repo(
                    repo_id, repo_type=repo_type, private=private, exist_ok=exist_ok
                ).repo_id
            except HubError as e:
                raise ValueError(e.message) from None

    def add_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike],
        *,
        message: str = "Upload files",
        revision: str = _DEFAULT_BRANCH,
        repo_type: str = "model",
        create: bool = True,
    ) -> str:
        """Commit ``files`` (path in repo -> bytes, text, or a local file path) directly (no HTTP); with
        ``create`` the repository is created when missing. Returns the new commit id."""
        ops: list[tuple[str, str, bytes | None]] = []
        for path, content in files.items():
            if isinstance(content, str):
                data = content.encode()
            elif isinstance(content, os.PathLike):
                data = Path(content).read_bytes()
            elif isinstance(content, (bytes, bytearray, memoryview)):
                data = bytes(content)
            else:
                raise TypeError(f"files[{path!r}] must be bytes, str or a path, not {type(content).__name__}")
            ops.append(("file", path, data))
        _check_repo_type(repo_type)
        with self._lock:
            try:
                if create and (repo_type, repo_id) not in self._repos:
                    repo_id = self._create_repo(
                        repo_id, repo_type=repo_type, private=False, exist_ok=True
                    ).repo_id
                repo = self._get_repo(repo_type, repo_id, token="helper")
                oid, _ = self._commit(repo, revision, ops, title=message, description="", parent_commit=None)
            except HubError as e:
                raise ValueError(e.message) from None
            return oid

    # ------------------------------------------------------------------ store internals (hold the lock)

    def _lookup_for_helper(self, repo_type: str, repo_id: str) -> _Repo:
        _check_repo_type(repo_type)
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            known = ", ".join(self.repos(repo_type)) or "none"
            raise KeyError(f"no {repo_type} repository {repo_id!r} on the local hub (known: {known})")
        return repo

    def _lookup_commit_for_helper(self, repo: _Repo, revision: str) -> _Commit:
        try:
            return repo.commits[self._resolve(repo, revision)[0]]
        except HubError:
            refs = (
                sorted(repo.branches)
                + sorted(repo.tags)
                + [f"refs/pr/{n}" for n in sorted(repo.pull_requests)]
            )
            raise KeyError(
                f"repository {repo.repo_id!r} has no revision {revision!r} (branches, tags, PRs: {refs})"
            ) from None

    def _normalise_repo_id(self, name: str, organization: str | None) -> str:
        for part, what in ((name, "name"), (organization, "organization")):
            if part is not None and not _NAME_RE.match(part):
                raise _bad_request(
                    f"Invalid repo {what} {part!r}: use letters, digits, '-', '_' and '.' (at most 96)"
                )
        return f"{organization or self.username}/{name}"

    def _create_repo(self, repo_id: str, *, repo_type: str, private: bool, exist_ok: bool) -> _Repo:
        _check_repo_type(repo_type)
        namespace, _, name = repo_id.rpartition("/")
        repo_id = self._normalise_repo_id(name, namespace or None)
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            if exist_ok:
                return existing
            raise HubError(
                409,
                f"You already created this {repo_type} repo: {repo_id}",
                extra={"url": f"{self.endpoint}/{existing.url_path}"},  # the client reads it with exist_ok
            )
        now = _now()
        repo = _Repo(
            repo_type=repo_type,
            repo_id=repo_id,
            private=bool(private),
            created_at=now,
            internal_id=hashlib.sha1(f"{repo_type}/{repo_id}/{next(self._counter)}".encode()).hexdigest()[
                :24
            ],
        )
        self._repos[(repo_type, repo_id)] = repo
        initial = self._new_commit(
            repo, (), {".gitattributes": self._store_blob(DEFAULT_GITATTRIBUTES)}, "initial commit", ""
        )
        repo.branches[_DEFAULT_BRANCH] = initial.oid
        return repo

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        if oid not in self._blobs:
            self._blobs[oid] = data
            self._sha256_to_oid[hashlib.sha256(data).hexdigest()] = oid
        return oid

    def _new_commit(
        self, repo: _Repo, parents: tuple[str, ...], tree: dict[str, str], title: str, description: str
    ) -> _Commit:
        date = _now()
        tree_oid = _tree_oid(tree)
        message = title if not description else f"{title}\n\n{description}"
        raw = f"tree {tree_oid}\n" + "".join(f"parent {p}\n" for p in parents)
        raw += f"author {self.username} {date} {next(self._counter)}\n\n{message}"
        oid = hashlib.sha1(f"commit {len(raw.encode())}\0{raw}".encode()).hexdigest()
        commit = _Commit(oid, parents, title, message, date, self.username, dict(tree))
        repo.commits[oid] = commit
        return commit

    def _get_repo(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not token):
            raise _repo_not_found(repo_type, repo_id)
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> tuple[str, str | None]:
        """Revision -> (commit oid, writable ref: a branch name or ``refs/pr/N``, or None)."""
        if revision in repo.branches:
            return repo.branches[revision], revision
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in repo.branches:
            branch = revision[len("refs/heads/") :]
            return repo.branches[branch], branch
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match and int(match.group(1)) in repo.pull_requests:
            return repo.pull_requests[int(match.group(1))], revision
        tag = revision[len("refs/tags/") :] if revision.startswith("refs/tags/") else revision
        if tag in repo.tags:
            return repo.tags[tag], None
        if _COMMIT_OID_RE.match(revision) and revision in repo.commits:
            return revision, None
        if _SHORT_OID_RE.match(revision):
            found = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(found) == 1:
                return found[0], None
        raise _revision_not_found(repo.repo_id, revision)

    def _set_ref(self, repo: _Repo, ref: str, oid: str) -> None:
        match = re.fullmatch(r"refs/pr/(\d+)", ref)
        if match:
            repo.pull_requests[int(match.group(1))] = oid
        else:
            repo.branches[ref] = oid

    def _history(self, repo: _Repo, oid: str) -> Iterator[_Commit]:
        """First-parent history, newest first."""
        seen: set[str] = set()
        current: str | None = oid
        while current is not None and current not in seen:
            seen.add(current)
            commit = repo.commits[current]
            yield commit
            current = commit.parents[0] if commit.parents else None

    def _commit(
        self,
        repo: _Repo,
        revision: str,
        operations: Iterable[tuple[str, str, bytes | None]],
        *,
        title: str,
        description: str,
        parent_commit: str | None,
        create_pr: bool = False,
    ) -> tuple[str, int | None]:
        """Apply ``(kind, path, data)`` operations (kind: ``file``, ``deletedFile``, ``deletedFolder``) on top
        of ``revision``; returns (new commit id, pull request number or None)."""
        head, ref = self._resolve(repo, revision)
        if ref is None:
            raise _bad_request(
                f"Cannot commit to {revision!r} of {repo.repo_id}: it is a tag or a commit, not a branch"
            )
        if parent_commit is not None and parent_commit != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head].tree)
        for kind, raw_path, data in operations:
            path = _validate_repo_path(raw_path.rstrip("/") if kind == "deletedFolder" else raw_path)
            if kind == "file":
                assert data is not None
                tree[path] = self._store_blob(data)
            elif kind == "deletedFile":
                if path not in tree:
                    raise HubError(
                        404,
                        f"A file with this name doesn't exist: {path}",
                        "EntryNotFound",
                        {"X-Repo-Commit": head},
                    )
                del tree[path]
            elif kind == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise HubError(
                        404,
                        f"A folder with this name doesn't exist: {path}",
                        "EntryNotFound",
                        {"X-Repo-Commit": head},
                    )
                for p in doomed:
                    del tree[p]
            else:
                raise _bad_request(f"Unknown commit operation {kind!r}")
        for p in tree:
            parts = p.split("/")
            for k in range(1, len(parts)):
                if "/".join(parts[:k]) in tree:
                    raise _bad_request(
                        f"Cannot commit: {'/'.join(parts[:k])!r} is a file and also a folder of {p!r}"
                    )
        commit = self._new_commit(repo, (head,), tree, title, description)
        pr_number: int | None = None
        if create_pr:
            repo.discussion_count += 1
            pr_number = repo.discussion_count
            repo.pull_requests[pr_number] = commit.oid
        else:
            self._set_ref(repo, ref, commit.oid)
        return commit.oid, pr_number

    def _last_commit_touching(self, repo: _Repo, head: str, path: str, is_dir: bool) -> _Commit:
        def state(commit: _Commit) -> Any:
            if not is_dir:
                return commit.tree.get(path)
            prefix = path + "/"
            return _tree_oid({p: o for p, o in commit.tree.items() if p.startswith(prefix)})

        history = list(self._history(repo, head))
        for commit, parent in zip(history, history[1:] + [None], strict=True):
            if parent is None or state(commit) != state(parent):
                return commit
        return history[-1]

    def _entry(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool, expand: bool) -> dict:
        if is_dir:
            prefix = path + "/"
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": _tree_oid(
                    {p[len(prefix) :]: o for p, o in commit.tree.items() if p.startswith(prefix)}
                ),
                "size": 0,
                "path": path,
            }
        else:
            oid = commit.tree[path]
            entry = {"type": "file", "oid": oid, "size": len(self._blobs[oid]), "path": path}
        if expand:
            last = self._last_commit_touching(repo, commit.oid, path, is_dir)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _info(self, repo: _Repo, commit: _Commit, *, blobs: bool) -> dict:
        siblings = []
        for path, oid in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(self._blobs[oid]), blobId=oid)
            siblings.append(sibling)
        card = _parse_card_data(self._blobs[commit.tree["README.md"]]) if "README.md" in commit.tree else None
        card_tags = (card or {}).get("tags") or []
        card_tags = [card_tags] if isinstance(card_tags, str) else card_tags
        tags = (
            [str(t) for t in card_tags if isinstance(t, (str, int, float))]
            if isinstance(card_tags, list)
            else []
        )
        info: dict[str, Any] = {
            "_id": repo.internal_id,
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(len(self._blobs[oid]) for oid in set(commit.tree.values())),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
            if card is not None and isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
            if card is not None and isinstance(card.get("pipeline_tag"), str):
                info["pipeline_tag"] = card["pipeline_tag"]
            if "config.json" in commit.tree:
                try:
                    config = json.loads(self._blobs[commit.tree["config.json"]])
                except ValueError:
                    config = None
                if isinstance(config, dict) and ("architectures" in config or "model_type" in config):
                    info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        elif repo.repo_type == "space":
            info["sdk"] = repo.sdk
        return info


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")


def _tree_oid(tree: Mapping[str, str]) -> str:
    """A stable id for a set of (path, blob oid) entries (not git's exact tree hash, but as stable)."""
    digest = hashlib.sha1()
    for path, oid in sorted(tree.items()):
        digest.update(f"{path}\0{oid}\n".encode())
    return digest.hexdigest()


def _validate_repo_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise _bad_request(f"Invalid path in repository: {path!r}")
    path = path.lstrip("/")
    if path.startswith("./"):
        path = path[2:]
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or ".git" in parts or "\0" in path or "\\" in path:
        raise _bad_request(f"Invalid path in repository: {path!r} (no empty, '.', '..' or '.git' segments)")
    return path


def _folders_of(tree: Iterable[str]) -> set[str]:
    folders: set[str] = set()
    for path in tree:
        parts = path.split("/")
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
    return folders


# ---------------------------------------------------------------------- HTTP layer


class _Handler(BaseHTTPRequestHandler):
    """Reads each request in full, routes it, and answers with a Content-Length (keep-alive safe)."""

    protocol_version = "HTTP/1.1"
    server_version = "ctx2param-local-hub/1.0"
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add ~40 ms to each keep-alive answer
    hub: LocalHub  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # quiet; requests are kept in LocalHub.request_log

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise HubError(400, "Truncated chunked request body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_request_bytes:
                    raise HubError(413, f"Request body larger than {self.hub.max_request_bytes} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise HubError(400, f"Invalid Content-Length: {length_header!r}") from None
        if length < 0:
            raise HubError(400, f"Invalid Content-Length: {length_header!r}")
        if length > self.hub.max_request_bytes:
            raise HubError(
                413, f"Request body of {length} bytes is larger than {self.hub.max_request_bytes} bytes"
            )
        data = self.rfile.read(length)
        if len(data) != length:
            raise HubError(400, f"Request body truncated: got {len(data)} of {length} bytes")
        return data

    def _handle(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except (HubError, ValueError) as e:
            # The body could not be read in full: answer, then close, so the connection cannot desynchronise.
            self.close_connection = True
            error = e if isinstance(e, HubError) else HubError(400, f"Malformed request body: {e}")
            self._send(method, raw_path, _error_response(error), close=True)
            return
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        request = _Request(
            method=method,
            path=raw_path,
            segments=[s for s in raw_path.split("/")[1:]],
            query=parse_qs(query, keep_blank_values=True),
            headers=self.headers,
            body=body,
            token=token or None,
        )
        try:
            response = _route(self.hub, request)
        except HubError as e:
            response = _error_response(e)
        except Exception as e:  # a bug in this server: answer 500 with the traceback, keep serving
            response = _Response.json(
                {"error": f"local hub internal error: {e!r}", "traceback": traceback.format_exc()}, status=500
            )
        self._send(method, raw_path, response)

    def _send(self, method: str, raw_path: str, response: _Response, close: bool = False) -> None:
        with self.hub._lock:
            self.hub._log.append((method, raw_path, response.status))
        self.send_response(response.status)
        headers = {"Content-Type": "application/json", **response.headers}
        headers["Content-Length"] = str(len(response.body))
        if close:
            headers["Connection"] = "close"
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD" and response.body:
            self.wfile.write(response.body)
        self.wfile.flush()


def _error_response(error: HubError) -> _Response:
    headers = {"X-Error-Message": _header_safe(error.message), **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _Response.json({**error.extra, "error": error.message}, status=error.status, headers=headers)


def _header_safe(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").encode("latin-1", errors="replace").decode("latin-1")


def _require_token(request: _Request) -> None:
    if not request.token:
        raise HubError(
            401,
            f"{_INVALID_TOKEN_MESSAGE}: this request needs a token (Authorization: Bearer ...); "
            "install_local_hub() sets HF_TOKEN",
        )


def _route(hub: LocalHub, request: _Request) -> _Response:
    segs = request.segments
    method = request.method
    if segs[:1] == ["api"]:
        rest = segs[1:]
        if rest == ["whoami-v2"] and method == "GET":
            return _whoami(hub, request)
        if rest[:1] == ["repos"] and len(rest) == 2:
            if rest[1] == "create" and method == "POST":
                return _create_repo(hub, request)
            if rest[1] == "delete" and method == "DELETE":
                return _delete_repo(hub, request)
            if rest[1] == "move" and method == "POST":
                return _move_repo(hub, request)
        if rest == ["validate-yaml"] and method == "POST":
            return _validate_yaml(request)
        if len(rest) == 1 and rest[0] in _API_PLURALS and method == "GET":
            return _list_repos(hub, request, _API_PLURALS[rest[0]])
        if len(rest) >= 2 and rest[0] in _API_PLURALS:
            repo_type = _API_PLURALS[rest[0]]
            repo_id, action, args = _split_repo_path(rest[1:])
            if repo_id is not None:
                return _repo_api(hub, request, repo_type, repo_id, action, args)
    elif method in ("GET", "HEAD"):
        repo_type = "model"
        rest = segs
        if rest[:1] and rest[0] in _API_PLURALS and rest[0] != "models":
            repo_type, rest = _API_PLURALS[rest[0]], rest[1:]
        for id_len in (2, 1):
            if len(rest) >= id_len + 3 and rest[id_len] == "resolve":
                repo_id = "/".join(unquote(s) for s in rest[:id_len])
                return _resolve_file(hub, request, repo_type, repo_id, rest[id_len + 1 :])
    raise HubError(
        404,
        f"local hub: no such endpoint: {method} {request.path} (this server implements part of the Hub API)",
    )


def _split_repo_path(rest: list[str]) -> tuple[str | None, str | None, list[str]]:
    """``[ns, name, action, *args]`` or ``[name, action, *args]`` -> (repo id, action, args)."""
    if len(rest) >= 3 and rest[2] in _REPO_ACTIONS:
        return f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2], rest[3:]
    if len(rest) >= 2 and rest[1] in _REPO_ACTIONS:
        return unquote(rest[0]), rest[1], rest[2:]
    if len(rest) == 2:
        return f"{unquote(rest[0])}/{unquote(rest[1])}", None, []
    if len(rest) == 1:
        return unquote(rest[0]), None, []
    return None, None, []


# ---------------------------------------------------------------------- endpoints


def _whoami(hub: LocalHub, request: _Request) -> _Response:
    _require_token(request)
    return _Response.json(
        {
            "type": "user",
            "id": hashlib.sha1(hub.username.encode()).hexdigest()[:24],
            "name": hub.username,
            "fullname": "Local Hub User",
            "email": f"{hub.username}@localhost",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "local-hub-token", "role": "write", "createdAt": _now()},
            },
        }
    )


def _create_repo(hub: LocalHub, request: _Request) -> _Response:
    _require_token(request)
    payload = request.json()
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        raise _bad_request("'name' is required to create a repository")
    repo_type = payload.get("type") or "model"
    if repo_type not in REPO_TYPES:
        raise _bad_request(f"Invalid repo type {repo_type!r}, expected one of {REPO_TYPES}")
    visibility = payload.get("visibility")
    private = bool(payload.get("private", False)) or visibility in ("private", "protected")
    with hub._lock:
        repo_id = hub._normalise_repo_id(name, payload.get("organization"))
        repo = hub._create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=False)
        if repo_type == "space":
            repo.sdk = payload.get("sdk")
        return _Response.json(
            {"url": f"{hub.endpoint}/{repo.url_path}", "name": repo.repo_id, "id": repo.internal_id}
        )


def _delete_repo(hub: LocalHub, request: _Request) -> _Response:
    _require_token(request)
    payload = request.json()
    repo_type = payload.get("type") or "model"
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        raise _bad_request("'name' is required to delete a repository")
    with hub._lock:
        repo_id = hub._normalise_repo_id(name, payload.get("organization"))
        hub._get_repo(repo_type, repo_id, request.token)
        del hub._repos[(repo_type, repo_id)]
    return _Response.json({})


def _move_repo(hub: LocalHub, request: _Request) -> _Response:
    _require_token(request)
    payload = request.json()
    repo_type = payload.get("type") or "model"
    source, target = payload.get("fromRepo"), payload.get("toRepo")
    if not isinstance(source, str) or not isinstance(target, str) or target.count("/") != 1:
        raise _bad_request("'fromRepo' and 'toRepo' (namespace/name) are required to move a repository")
    with hub._lock:
        repo = hub._get_repo(repo_type, source, request.token)
        namespace, name = target.split("/")
        target = hub._normalise_repo_id(name, namespace)
        if (repo_type, target) in hub._repos:
            raise HubError(409, f"Repository {target} already exists")
        del hub._repos[(repo_type, source)]
        repo.repo_id = target
        hub._repos[(repo_type, target)] = repo
    return _Response.json({"url": f"{hub.endpoint}/{repo.url_path}"})


def _validate_yaml(request: _Request) -> _Response:
    payload = request.json()
    content = payload.get("content", "")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.DOTALL)
    if match is not None:
        try:
            import yaml
        except ImportError:  # cannot check without PyYAML: accept, like a lenient Hub
            return _Response.json({"errors": [], "warnings": []})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return _Response.json(
                {"errors": [{"message": f"Invalid YAML in README.md metadata: {e}"}]}, status=400
            )
        if data is not None and not isinstance(data, dict):
            return _Response.json(
                {"errors": [{"message": "README.md metadata must be a YAML mapping"}]}, status=400
            )
    return _Response.json({"errors": [], "warnings": []})


def _list_repos(hub: LocalHub, request: _Request, repo_type: str) -> _Response:
    author = (request.query.get("author") or [None])[-1]
    search = (request.query.get("search") or [None])[-1]
    with hub._lock:
        out = []
        for (rtype, repo_id), repo in sorted(hub._repos.items()):
            if rtype != repo_type or (repo.private and not request.token):
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            if search and search.lower() not in repo_id.lower():
                continue
            head = repo.commits[repo.branches[_DEFAULT_BRANCH]] if _DEFAULT_BRANCH in repo.branches else None
            info = {
                "_id": repo.internal_id,
                "id": repo_id,
                "private": repo.private,
                "createdAt": repo.created_at,
            }
            if head is not None:
                info.update(sha=head.oid, lastModified=head.date)
            if repo_type == "model":
                info["modelId"] = repo_id
            out.append(info)
    return _Response.json(out)


def _repo_api(
    hub: LocalHub, request: _Request, repo_type: str, repo_id: str, action: str | None, args: list[str]
) -> _Response:
    method = request.method
    if method in ("POST", "PUT", "DELETE") and action != "paths-info":
        _require_token(request)
    with hub._lock:
        repo = hub._get_repo(repo_type, repo_id, request.token)
        if action is None and method == "GET":
            return _repo_info(hub, request, repo, _DEFAULT_BRANCH)
        if action == "revision" and method == "GET" and args:
            return _repo_info(hub, request, repo, unquote("/".join(args)))
        if action == "tree" and method == "GET" and args:
            return _tree(hub, request, repo, unquote(args[0]), "/".join(unquote(a) for a in args[1:]))
        if action == "paths-info" and method == "POST" and args:
            return _paths_info(hub, request, repo, unquote("/".join(args)))
        if action == "preupload" and method == "POST" and args:
            return _preupload(hub, request, repo, unquote("/".join(args)))
        if action == "commit" and method == "POST" and args:
            return _commit_endpoint(hub, request, repo, unquote("/".join(args)))
        if action == "refs" and method == "GET" and not args:
            return _refs(repo, request)
        if action == "commits" and method == "GET" and args:
            return _commits(hub, request, repo, unquote("/".join(args)))
        if action == "branch" and args and method in ("POST", "DELETE"):
            return _branch(hub, request, repo, unquote("/".join(args)))
        if action == "tag" and args and method in ("POST", "DELETE"):
            return _tag(hub, request, repo, unquote("/".join(args)))
        if action == "settings" and method == "PUT":
            return _settings(request, repo)
    raise HubError(404, f"local hub: no such endpoint: {method} {request.path}")


def _repo_info(hub: LocalHub, request: _Request, repo: _Repo, revision: str) -> _Response:
    oid, _ = hub._resolve(repo, revision)
    info = hub._info(repo, repo.commits[oid], blobs=request.flag("blobs"))
    expand = request.query.get("expand", []) + request.query.get("expand[]", [])
    if expand:
        info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
    return _Response.json(info)


def _tree(hub: LocalHub, request: _Request, repo: _Repo, revision: str, path: str) -> _Response:
    oid, _ = hub._resolve(repo, revision)
    commit = repo.commits[oid]
    path = path.strip("/")
    folders = _folders_of(commit.tree)
    if path and path not in folders:
        raise HubError(
            404,
            f"Folder not found in {repo.repo_id}@{revision}: {path}",
            "EntryNotFound",
            {"X-Repo-Commit": oid},
        )
    prefix = path + "/" if path else ""
    recursive = request.flag("recursive")
    expand = request.flag("expand")
    entries: list[tuple[str, bool]] = []
    for folder in sorted(folders):
        if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix) :]):
            entries.append((folder, True))
    for file_path in sorted(commit.tree):
        if file_path.startswith(prefix) and (recursive or "/" not in file_path[len(prefix) :]):
            entries.append((file_path, False))
    page_size = _TREE_PAGE_SIZE_EXPANDED if expand else _TREE_PAGE_SIZE
    start = _cursor(request)
    page = [hub._entry(repo, commit, p, is_dir, expand) for p, is_dir in entries[start : start + page_size]]
    headers = {}
    if start + page_size < len(entries):
        headers["Link"] = _next_link(hub, request, start + page_size)
    return _Response.json(page, headers=headers)


def _cursor(request: _Request) -> int:
    raw = (request.query.get("cursor") or ["0"])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"Invalid cursor {raw!r}") from None
    if value < 0:
        raise _bad_request(f"Invalid cursor {raw!r}")
    return value


def _next_link(hub: LocalHub, request: _Request, cursor: int) -> str:
    query = {k: v for k, v in request.query.items() if k != "cursor"}
    query["cursor"] = [str(cursor)]
    return f'<{hub.endpoint}{request.path}?{urlencode(query, doseq=True)}>; rel="next"'


def _paths_info(hub: LocalHub, request: _Request, repo: _Repo, revision: str) -> _Response:
    oid, _ = hub._resolve(repo, revision)
    commit = repo.commits[oid]
    content_type = request.headers.get("Content-Type", "")
    if "json" in content_type:
        payload = request.json()
        paths = payload.get("paths", [])
        expand = bool(payload.get("expand", False))
    else:
        form = parse_qs(request.body.decode("utf-8", errors="replace"), keep_blank_values=True)
        paths = form.get("paths", [])
        expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
    if isinstance(paths, str):
        paths = [paths]
    folders = _folders_of(commit.tree)
    out = []
    for raw in paths:
        path = str(raw).strip("/")
        if path in commit.tree:
            out.append(hub._entry(repo, commit, path, False, expand))
        elif path in folders:
            out.append(hub._entry(repo, commit, path, True, expand))
    return _Response.json(out)


def _preupload(hub: LocalHub, request: _Request, repo: _Repo, revision: str) -> _Response:
    oid, _ = hub._resolve(repo, revision)
    commit = repo.commits[oid]
    payload = request.json()
    files = payload.get("files")
    if not isinstance(files, list):
        raise _bad_request("'files' (a list of {path, sample, size}) is required for preupload")
    gitignore = payload.get("gitIgnore")
    if gitignore is None and ".gitignore" in commit.tree:
        gitignore = hub._blobs[commit.tree[".gitignore"]].decode("utf-8", errors="replace")
    matcher = _GitIgnore(gitignore) if gitignore else None
    out = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise _bad_request(f"Invalid preupload entry {item!r}: expected {{path, sample, size}}")
        path = _validate_repo_path(item["path"])
        out.append(
            {
                "path": item["path"],
                "uploadMode": "regular",  # contents come inline in the commit: no LFS, no Xet
                "shouldIgnore": bool(matcher is not None and matcher.ignores(path)),
                "oid": commit.tree.get(path),
            }
        )
    return _Response.json({"files": out, "commitOid": oid})


def _commit_endpoint(hub: LocalHub, request: _Request, repo: _Repo, revision: str) -> _Response:
    header: dict | None = None
    operations: list[tuple[str, str, bytes | None]] = []
    for number, line in enumerate(request.body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise _bad_request(f"Commit payload line {number} is not JSON: {e}") from None
        key, value = item.get("key"), item.get("value")
        if not isinstance(value, dict):
            raise _bad_request(f"Commit payload line {number}: 'value' must be an object")
        if key == "header":
            header = value
        elif key == "file":
            encoding = value.get("encoding", "utf-8")
            content = value.get("content", "")
            try:
                data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            except (ValueError, TypeError) as e:
                raise _bad_request(f"Commit payload line {number}: invalid base64 content: {e}") from None
            operations.append(("file", value.get("path", ""), data))
        elif key == "lfsFile":
            blob = hub._sha256_to_oid.get(str(value.get("oid", "")))
            if blob is None:
                raise _bad_request(
                    f"LFS object {value.get('oid')} for {value.get('path')!r} is not on this local hub: "
                    "it only accepts inline (regular) uploads, which preupload asks for"
                )
            operations.append(("file", value.get("path", ""), hub._blobs[blob]))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append((key, value.get("path", ""), None))
        else:
            raise _bad_request(f"Commit payload line {number}: unknown key {key!r}")
    if header is None:
        raise _bad_request("Commit payload has no header line ({'key': 'header', 'value': {'summary': ...}})")
    summary = header.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise _bad_request("Commit summary (message) must not be empty")
    create_pr = request.flag("create_pr")
    oid, pr_number = hub._commit(
        repo,
        revision,
        operations,
        title=summary,
        description=str(header.get("description") or ""),
        parent_commit=header.get("parentCommit"),
        create_pr=create_pr,
    )
    body: dict[str, Any] = {
        "success": True,
        "commitOid": oid,
        "commitUrl": f"{hub.endpoint}/{repo.url_path}/commit/{oid}",
        "hookOutput": "",
    }
    if pr_number is not None:
        body["pullRequestUrl"] = f"{hub.endpoint}/{repo.url_path}/discussions/{pr_number}"
    return _Response.json(body)


def _refs(repo: _Repo, request: _Request) -> _Response:
    body: dict[str, Any] = {
        "branches": [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in sorted(repo.branches.items())
        ],
        "converts": [],
        "tags": [
            {"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(repo.tags.items())
        ],
    }
    if request.flag("include_prs"):
        body["pullRequests"] = [
            {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
            for n, o in sorted(repo.pull_requests.items())
        ]
    return _Response.json(body)


def _commits(hub: LocalHub, request: _Request, repo: _Repo, revision: str) -> _Response:
    oid, _ = hub._resolve(repo, revision)
    history = list(hub._history(repo, oid))
    start = _cursor(request)
    page = history[start : start + _COMMITS_PAGE_SIZE]
    formatted = "formatted" in request.query.get("expand[]", []) + request.query.get("expand", [])
    items = []
    for commit in page:
        item: dict[str, Any] = {
            "id": commit.oid,
            "title": commit.title,
            "message": commit.message,
            "date": commit.date,
            "authors": [{"user": commit.author, "avatar": ""}],
        }
        if formatted:
            item["formatted"] = {"title": commit.title, "message": commit.message}
        items.append(item)
    headers = {}
    if start + _COMMITS_PAGE_SIZE < len(history):
        headers["Link"] = _next_link(hub, request, start + _COMMITS_PAGE_SIZE)
    return _Response.json(items, headers=headers)


def _branch(hub: LocalHub, request: _Request, repo: _Repo, branch: str) -> _Response:
    if request.method == "DELETE":
        if branch not in repo.branches:
            raise _revision_not_found(repo.repo_id, branch)
        if branch == _DEFAULT_BRANCH:
            raise HubError(403, f"Cannot delete the default branch '{_DEFAULT_BRANCH}'")
        del repo.branches[branch]
        return _Response.json({})
    if not _BRANCH_RE.match(branch) or branch.startswith("refs/") or ".." in branch or branch.endswith("/"):
        raise _bad_request(f"Invalid branch name {branch!r}")
    if branch in repo.branches:
        raise HubError(409, f"Reference already exists: refs/heads/{branch}")
    payload = request.json()
    if payload.get("emptyBranch"):
        commit = hub._new_commit(repo, (), {}, "empty branch", "")
        start = commit.oid
    else:
        start, _ = hub._resolve(repo, str(payload.get("startingPoint") or _DEFAULT_BRANCH))
    repo.branches[branch] = start
    return _Response.json({})


def _tag(hub: LocalHub, request: _Request, repo: _Repo, name: str) -> _Response:
    if request.method == "DELETE":
        if name not in repo.tags:
            raise _revision_not_found(repo.repo_id, name)
        del repo.tags[name]
        return _Response.json({})
    payload = request.json()
    tag = payload.get("tag")
    if not isinstance(tag, str) or not _BRANCH_RE.match(tag):
        raise _bad_request(f"Invalid tag name {tag!r}")
    if tag in repo.tags:
        raise HubError(409, f"Tag already exists: {tag}")
    repo.tags[tag], _ = hub._resolve(repo, name)
    return _Response.json({})


def _settings(request: _Request, repo: _Repo) -> _Response:
    payload = request.json()
    if "private" in payload:
        repo.private = bool(payload["private"])
    if "visibility" in payload:
        repo.private = payload["visibility"] in ("private", "protected")
    if "gated" in payload:
        if payload["gated"] not in ("auto", "manual", False):
            raise _bad_request(f"Invalid gated value {payload['gated']!r}")
        repo.gated = payload["gated"]
    return _Response.json({})


def _resolve_file(
    hub: LocalHub, request: _Request, repo_type: str, repo_id: str, rest: list[str]
) -> _Response:
    revision = unquote(rest[0])
    path_segments = rest[1:]
    # Accept an unencoded "refs/pr/1" (or refs/heads/..., refs/tags/...) as well as "refs%2Fpr%2F1".
    if revision == "refs" and len(path_segments) >= 3 and path_segments[0] in ("pr", "heads", "tags"):
        revision = f"refs/{path_segments[0]}/{unquote(path_segments[1])}"
        path_segments = path_segments[2:]
    path = "/".join(unquote(s) for s in path_segments)
    with hub._lock:
        repo = hub._get_repo(repo_type, repo_id, request.token)
        oid, _ = hub._resolve(repo, revision)
        commit = repo.commits[oid]
        blob_oid = commit.tree.get(path)
        if blob_oid is None:
            raise HubError(
                404,
                f"Entry not found: {path} in {repo_id}@{revision}",
                "EntryNotFound",
                {"X-Repo-Commit": oid},
            )
        data = hub._blobs[blob_oid]
    size = len(data)
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{blob_oid}"',
        "X-Repo-Commit": oid,
        "X-Linked-Size": str(size),
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
    }
    range_header = request.headers.get("Range")
    if range_header:
        span = _parse_range(range_header, size)
        if span is None:
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
        first, last = span
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return _Response(206, data[first : last + 1], headers)
    return _Response(200, data, headers)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> inclusive (first, last) or None."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):
        suffix = int(match.group(2))
        if suffix == 0 or size == 0:
            return None
        return max(0, size - suffix), size - 1
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


# ---------------------------------------------------------------------- process-wide installation

_INSTALLED: LocalHub | None = None
_INSTALL_LOCK = threading.Lock()

# Variables that would send the client elsewhere, to another cache or token, or keep it off the network.
_CLEARED_ENV = (
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_ENABLE_HF_TRANSFER",
)


def _check_client_not_configured(expected_endpoint: str | None) -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None:
        return  # huggingface_hub reads HF_ENDPOINT / HF_HOME when its constants module is first imported
    endpoint = getattr(constants, "ENDPOINT", None)
    if expected_endpoint is None or endpoint != expected_endpoint:
        raise RuntimeError(
            "install_local_hub() must run before huggingface_hub is configured: "
            f"huggingface_hub.constants was already imported with endpoint {endpoint!r} "
            "(it reads HF_ENDPOINT and HF_HOME once, at import). Call install_local_hub() at the very "
            "top of tests/conftest.py, before importing huggingface_hub, transformers, peft, datasets or "
            "ctx2param."
        )


def install_local_hub() -> LocalHub:
    """Start the process-wide local Hub (once; later calls return the same one) and point the client at it.

    Sets ``HF_ENDPOINT=http://127.0.0.1:<port>``, a fresh temporary ``HF_HOME`` (removed at exit) with
    ``HF_HUB_CACHE=$HF_HOME/hub``, ``HF_TOKEN=dummy-token`` and ``HF_HUB_DISABLE_TELEMETRY=1``; removes
    variables that would redirect the cache or token or switch the client offline (``HF_HUB_OFFLINE``,
    ``TRANSFORMERS_OFFLINE``: the Hub is local; test offline behaviour in a subprocess). Progress-bar settings
    are left alone. Must be called before ``huggingface_hub.constants`` is imported (``transformers`` imports
    it): otherwise, or if it was imported with another endpoint, raises ``RuntimeError``.
    """
    global _INSTALLED
    with _INSTALL_LOCK:
        if _INSTALLED is not None:
            _check_client_not_configured(_INSTALLED.endpoint)
            return _INSTALLED
        _check_client_not_configured(None)
        home = tempfile.mkdtemp(prefix="ctx2param-hf-home-")
        try:
            hub = LocalHub()
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        hub.home = home
        for name in _CLEARED_ENV:
            os.environ.pop(name, None)
        os.environ.update(
            {
                "HF_ENDPOINT": hub.endpoint,
                "HF_HOME": home,
                "HF_HUB_CACHE": os.path.join(home, "hub"),
                "HF_TOKEN": "dummy-token",
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
        )

        def _cleanup() -> None:
            hub.close()
            shutil.rmtree(home, ignore_errors=True)

        atexit.register(_cleanup)
        _INSTALLED = hub
        return hub
