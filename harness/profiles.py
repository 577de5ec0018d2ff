"""Hypothesis profiles and the example database, configured in one place.

- ``dev`` (default on a workstation): 200 examples, no deadline; example database: ``HARNESS_HYPOTHESIS_DB``
  if set, else Hypothesis' own local directory (``.hypothesis/examples``).
- ``ci`` (default when ``CI`` is set): derandomized (same examples every run), 200 examples, no database
  (Hypothesis: ``derandomize=True`` implies ``database=None``).
- ``nightly``: 2000 examples; example database ``HARNESS_HYPOTHESIS_DB``, else ``.hypothesis/nightly``.

``HARNESS_HYPOTHESIS_DB`` is one entry or several joined by ``+`` (a failure is saved to every writable one
and replayed from all of them, Hypothesis' ``MultiplexedDatabase``):

- a directory path: ``DirectoryBasedExampleDatabase`` (runners sharing a file system share failures);
- ``redis://[:password@]host:port/db`` or ``rediss://...`` (TLS): Hypothesis' ``RedisExampleDatabase`` on
  that server (needs the ``redis`` client: ``pip install 'harness[redis]'``), so a failure found on one runner
  is replayed first on every other; percent-encode a ``+`` in a password as ``%2B``;
- ``github://OWNER/REPO[/ARTIFACT]``: the example database a GitHub Actions workflow uploaded as an artifact
  (default name ``hypothesis-example-db``), read-only (``ReadOnlyDatabase(GitHubArtifactDatabase(...))``;
  ``GITHUB_TOKEN`` for private repositories).  A setting made only of read-only entries is multiplexed with
  the profile's local directory, so failures found here are still kept here.

E.g. ``.hypothesis/examples+redis://ci-redis:6379/0`` keeps a local copy of what the shared server holds.
Select a profile with ``HARNESS_PROFILE=<name>`` or ``pytest --harness-profile=<name>``.  Individual tests may
lower ``max_examples`` for expensive bodies (GPU kernels), never raise the floor.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    GitHubArtifactDatabase,
    MultiplexedDatabase,
    ReadOnlyDatabase,
)

__all__ = [
    "PROFILES",
    "DB_ENV",
    "DatabaseSpecError",
    "example_database",
    "register_profiles",
    "load_profile",
    "default_profile",
]

PROFILES = ("dev", "ci", "nightly")
DB_ENV = "HARNESS_HYPOTHESIS_DB"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]
_LOCAL = {"dev": os.path.join(".hypothesis", "examples"), "nightly": os.path.join(".hypothesis", "nightly")}
_REDIS_CONNECT_TIMEOUT_S = 5.0
#: profile -> the redis clients its database uses (pinged when the profile is loaded)
_CLIENTS: dict[str, list[tuple[str, Any]]] = {}


class DatabaseSpecError(ValueError):
    """``HARNESS_HYPOTHESIS_DB`` cannot be used as written; the message names the entry and the fix."""


def _redis(entry: str, clients: list[tuple[str, Any]]) -> ExampleDatabase:
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError:
        raise DatabaseSpecError(
            f"{DB_ENV} entry {entry!r} needs the redis client: pip install 'harness[redis]' (or pip install redis)"
        ) from None
    try:
        client = redis.Redis.from_url(entry, socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S)
    except ValueError as e:
        raise DatabaseSpecError(
            f"{DB_ENV} entry {entry!r} is not a valid Redis URL ({e}); "
            "write redis://HOST:PORT/DB, e.g. redis://localhost:6379/0"
        ) from None
    clients.append((entry, client))
    return RedisExampleDatabase(client)


def _github(entry: str) -> ExampleDatabase:
    parts = entry[len("github://") :].strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise DatabaseSpecError(
            f"{DB_ENV} entry {entry!r} is not github://OWNER/REPO[/ARTIFACT], "
            "e.g. github://acme/kernels/hypothesis-example-db"
        )
    kw = {"artifact_name": parts[2]} if len(parts) == 3 else {}
    return ReadOnlyDatabase(GitHubArtifactDatabase(parts[0], parts[1], **kw))


def example_database(spec: str, *, local: str, clients: list[tuple[str, Any]] | None = None) -> ExampleDatabase:
    """The database ``spec`` (``HARNESS_HYPOTHESIS_DB`` syntax, see the module docstring) describes.

    ``local``: the directory multiplexed in when every entry is read-only.  Redis clients are appended to
    ``clients`` (nothing connects here).  Raises :class:`DatabaseSpecError` for a bad entry.
    """
    clients = [] if clients is None else clients
    entries = [e.strip() for e in spec.split("+")]
    if not spec.strip() or not all(entries):
        raise DatabaseSpecError(
            f"{DB_ENV}={spec!r} has an empty entry; join entries with a single '+', "
            "e.g. .hypothesis/examples+redis://localhost:6379/0"
        )
    dbs: list[ExampleDatabase] = []
    for entry in entries:
        scheme = entry.split("://", 1)[0].lower() if "://" in entry else ""
        if scheme in ("redis", "rediss"):
            dbs.append(_redis(entry, clients))
        elif scheme == "github":
            dbs.append(_github(entry))
        elif scheme:
            raise DatabaseSpecError(
                f"{DB_ENV} entry {entry!r}: unknown scheme {scheme!r}; use a directory, "
                "redis://HOST:PORT/DB, rediss://... or github://OWNER/REPO[/ARTIFACT]"
            )
        else:
            dbs.append(DirectoryBasedExampleDatabase(entry))
    if all(isinstance(d, ReadOnlyDatabase) for d in dbs):
        dbs.insert(0, DirectoryBasedExampleDatabase(local))
    return dbs[0] if len(dbs) == 1 else MultiplexedDatabase(*dbs)


def register_profiles() -> None:
    """Register the three profiles with Hypothesis (idempotent); reads ``HARNESS_HYPOTHESIS_DB``."""
    spec = os.environ.get(DB_ENV, "")
    _CLIENTS.clear()
    dev_db: dict[str, Any] = {}
    if spec:
        _CLIENTS["dev"] = []
        dev_db["database"] = example_database(spec, local=_LOCAL["dev"], clients=_CLIENTS["dev"])
    settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=_SUPPRESS, **dev_db)
    settings.register_profile(
        "ci",
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=_SUPPRESS,
    )
    _CLIENTS["nightly"] = []
    nightly_db = (
        example_database(spec, local=_LOCAL["nightly"], clients=_CLIENTS["nightly"])
        if spec
        else DirectoryBasedExampleDatabase(_LOCAL["nightly"])
    )
    settings.register_profile(
        "nightly",
        max_examples=2000,
        deadline=None,
        database=nightly_db,
        print_blob=True,
        suppress_health_check=_SUPPRESS,
    )


def default_profile() -> str:
    """``HARNESS_PROFILE`` if set, else ``ci`` under CI, else ``dev``."""
    return os.environ.get("HARNESS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load ``name`` (default :func:`default_profile`); returns the name loaded.

    A Redis server the profile's database names is pinged first, so an unreachable one is one clear error
    (:class:`DatabaseSpecError`) instead of a traceback in the first test.
    """
    name = name or default_profile()
    if name not in PROFILES:
        raise ValueError(
            f"Hypothesis profile {name!r} unknown; use one of {PROFILES} (HARNESS_PROFILE / --harness-profile)"
        )
    register_profiles()
    for entry, client in _CLIENTS.get(name, []):
        try:
            client.ping()
        except Exception as e:  # noqa: BLE001 - redis' ConnectionError / TimeoutError / AuthenticationError
            raise DatabaseSpecError(
                f"{DB_ENV} entry {entry!r}: cannot reach the Redis server "
                f"({type(e).__name__}: {e}); start it or fix {DB_ENV}"
            ) from None
    settings.load_profile(name)
    return name
