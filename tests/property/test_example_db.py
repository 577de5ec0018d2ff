"""``HARNESS_HYPOTHESIS_DB``: the entries it accepts, its errors, and a failure shared through a real redis-server.

The Redis tests start Debian's ``redis-server`` on a free port (127.0.0.1 only, no persistence).  Without
it they skip here and fail under ``CI`` (CI must install it: ``apt-get install -y redis-server``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_at_once
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    GitHubArtifactDatabase,
    MultiplexedDatabase,
    ReadOnlyDatabase,
)

from harness.profiles import DB_ENV, DatabaseSpecError, example_database, load_profile

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fresh redis-server on 127.0.0.1:<free port>, up once it answers PING; stopped afterwards."""
    exe = shutil.which("redis-server")
    if exe is None:
        why = "redis-server not installed (Debian: apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must provide it for the shared example database tests")
        pytest.skip(why)
    import redis

    for _ in range(3):  # another process may take the free port between the probe and the bind
        port = _free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        up = False
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                up = bool(client.ping())
                break
            except redis.exceptions.ConnectionError:
                try:  # not listening yet: wait a moment for the server to exit (a failed start), then ask again
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        if up:
            break
        proc.kill()
        proc.wait(timeout=10)
    else:
        pytest.fail("redis-server did not start on a free port in 3 tries")
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------ parsing the setting (no server needed)


def test_a_directory_entry_is_a_directory_database(tmp_path) -> None:
    db = example_database(str(tmp_path / "db"), local="unused")
    assert isinstance(db, DirectoryBasedExampleDatabase) and Path(db.path) == tmp_path / "db"


def test_github_entries_are_read_only_and_multiplexed_with_the_local_directory(tmp_path) -> None:
    db = example_database("github://acme/kernels/nightly-db", local=str(tmp_path / "local"))
    assert isinstance(db, MultiplexedDatabase)
    local, shared = db._wrapped
    assert isinstance(local, DirectoryBasedExampleDatabase) and Path(local.path) == tmp_path / "local"
    assert isinstance(shared, ReadOnlyDatabase)
    gh = shared._wrapped
    assert isinstance(gh, GitHubArtifactDatabase)
    assert (gh.owner, gh.repo, gh.artifact_name) == ("acme", "kernels", "nightly-db")
    default = example_database("github://acme/kernels", local=str(tmp_path / "local"))._wrapped[1]._wrapped
    assert default.artifact_name == "hypothesis-example-db"


def test_a_plus_joined_setting_multiplexes_its_entries(tmp_path) -> None:
    clients: list = []
    db = example_database(f"{tmp_path / 'a'}+redis://127.0.0.1:1/3", local="unused", clients=clients)
    assert isinstance(db, MultiplexedDatabase)
    a, r = db._wrapped
    assert isinstance(a, DirectoryBasedExampleDatabase) and type(r).__name__ == "RedisExampleDatabase"
    assert [e for e, _ in clients] == ["redis://127.0.0.1:1/3"]
    assert clients[0][1].connection_pool.connection_kwargs["db"] == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ftp://x/y", "unknown scheme 'ftp'"),
        ("github://acme", "not github://OWNER/REPO"),
        ("github://a/b/c/d", "not github://OWNER/REPO"),
        ("redis://localhost:notaport/0", "not a valid Redis URL"),
        ("a++b", "empty entry"),
        ("+", "empty entry"),
    ],
)
def test_bad_settings_name_the_entry_and_the_fix(spec: str, match: str) -> None:
    with pytest.raises(DatabaseSpecError, match=match):
        example_database(spec, local="unused")


def test_a_missing_redis_client_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "hypothesis.extra.redis", None)
    with pytest.raises(DatabaseSpecError, match=r"needs the redis client: pip install 'harness\[redis\]'"):
        example_database("redis://localhost:6379/0", local="unused")


BAD_SETTINGS = [("redis://127.0.0.1:{port}/0", "cannot reach the Redis server"), ("ftp://x", "unknown scheme")]


@pytest.fixture(scope="module")
def bad_setting_runs() -> list[subprocess.CompletedProcess]:
    """pytest run with each BAD_SETTINGS entry as the nightly profile's database, all at once."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv.append("tests/property/test_shard.py::test_cell_key_is_unambiguous")
    return run_at_once(
        *(
            (argv, {"env": dict(os.environ, **{DB_ENV: spec.format(port=_free_port())}, HARNESS_PROFILE="nightly")})
            for spec, _ in BAD_SETTINGS
        ),
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("index", range(len(BAD_SETTINGS)), ids=[spec for spec, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_from_pytest(bad_setting_runs, index: int) -> None:
    r, match = bad_setting_runs[index], BAD_SETTINGS[index][1]
    assert r.returncode == 4  # pytest's usage error
    out = (r.stdout + r.stderr).strip()
    assert match in out and "Traceback" not in out and len(out.splitlines()) == 1, out[-2000:]


# ------------------------------------------------------------------ a failure shared through redis-server

PROPERTY = textwrap.dedent('''
    """Fails for x >= 12345; records every example it is called with, in order, one per line."""
    import sys
    from hypothesis import given, strategies as st
    from harness.profiles import load_profile

    load_profile("nightly")
    LOG = sys.argv[1]

    @given(st.integers(0, 10**9))
    def test_threshold(x):
        with open(LOG, "a") as f:
            f.write(f"{x}\\n")
        assert x < 12345

    try:
        test_threshold()
    except AssertionError:
        sys.exit(1)
''')


def _run_property(script: Path, cwd: Path, log: Path, db: str) -> list[int]:
    cwd.mkdir()
    env = dict(os.environ, **{DB_ENV: db}, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, str(script), str(log)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-2000:]  # the property found its failure
    return [int(x) for x in log.read_text().split()]


def test_a_failure_found_in_one_process_is_replayed_first_in_another(tmp_path, redis_url) -> None:
    import redis

    script = tmp_path / "prop.py"
    script.write_text(PROPERTY)
    shared = f"{redis_url}/0"
    first = _run_property(script, tmp_path / "runner1", tmp_path / "log1", shared)
    assert 12345 in first and first[0] != 12345  # found by search, then shrunk to the boundary
    client = redis.Redis.from_url(shared)
    assert client.keys("hypothesis-example:*"), "the failure was saved to the server"
    # another runner: another working directory (no local database in common), the same server
    second = _run_property(script, tmp_path / "runner2", tmp_path / "log2", shared)
    assert second[0] == 12345, second[:5]
    assert not (tmp_path / "runner1" / ".hypothesis" / "nightly").exists()  # redis alone: no local database
    # control: an empty database (another redis db number) does not start from the failure
    third = _run_property(script, tmp_path / "runner3", tmp_path / "log3", f"{redis_url}/1")
    assert third[0] != 12345


def test_a_local_plus_redis_setting_saves_to_both(tmp_path, redis_url) -> None:
    import redis

    script = tmp_path / "prop.py"
    script.write_text(PROPERTY.replace("test_threshold", "test_threshold_both"))
    shared = f"{redis_url}/2"
    local = tmp_path / "localdb"
    _run_property(script, tmp_path / "runner1", tmp_path / "log1", f"{local}+{shared}")
    assert any(p.is_file() for p in local.rglob("*")), "the local directory holds the failure"
    assert redis.Redis.from_url(shared).keys("hypothesis-example:*")
    # a runner that has only the local directory replays it first too
    again = _run_property(script, tmp_path / "runner2", tmp_path / "log2", str(local))
    assert again[0] == 12345


def test_load_profile_pings_the_server(redis_url, monkeypatch, request) -> None:
    try:
        monkeypatch.setenv(DB_ENV, f"{redis_url}/4")
        assert load_profile("nightly") == "nightly"
        monkeypatch.setenv(DB_ENV, f"redis://127.0.0.1:{_free_port()}/0")
        with pytest.raises(DatabaseSpecError, match="cannot reach the Redis server"):
            load_profile("nightly")
    finally:
        monkeypatch.undo()
        load_profile(request.config._harness_profile)  # back to this session's own profile and database


def test_which_profiles_use_the_setting(monkeypatch, tmp_path, request) -> None:
    from hypothesis import settings

    from harness.profiles import register_profiles

    try:
        monkeypatch.setenv(DB_ENV, str(tmp_path / "shared"))
        register_profiles()
        for name in ("dev", "nightly"):
            db = settings.get_profile(name).database
            assert isinstance(db, DirectoryBasedExampleDatabase) and Path(db.path) == tmp_path / "shared", name
        assert settings.get_profile("ci").database is None  # derandomized: no database by design
        monkeypatch.delenv(DB_ENV)
        register_profiles()
        assert Path(settings.get_profile("nightly").database.path) == Path(".hypothesis", "nightly")
    finally:
        monkeypatch.undo()
        load_profile(request.config._harness_profile)
