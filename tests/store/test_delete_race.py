"""A delete racing publishes of the same version is safe, under real concurrency (threads and processes), on
file://, moto and the real Ceph RGW. See ``race_helpers`` for the round and the invariants; the mutant tests
show that the checker does catch a broken protocol (so the race tests can fail)."""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
import pytest

from svd_ray.store import ConflictError, open_store

from conftest import StoreFactory
from race_helpers import TASK, act, check_round, round_jobs, tree_digest, warm_worker
from store_helpers import make_bundle, make_meta

#: rounds per backend (each round: 2 publishers, 1 deleter, 1 reader on a fresh version). Sized for the
#: default suite on 2 cores (~90 s in all with RGW); SVD_RAY_STORE_RACE_SCALE=10 makes a soak run.
_SCALE = float(os.environ.get("SVD_RAY_STORE_RACE_SCALE", "1"))
THREAD_ROUNDS = {k: max(1, round(v * _SCALE)) for k, v in {"file": 40, "moto": 15, "rgw": 20}.items()}
PROCESS_ROUNDS = {k: max(1, round(v * _SCALE)) for k, v in {"file": 20, "rgw": 10}.items()}


def _publish_seconds(uri: str, endpoint: str | None, tmp: Path) -> float:
    """Median duration of one publish on this backend (sets the spread of the actors' start times)."""
    store = open_store(uri, endpoint_url=endpoint, cache_dir=tmp / "calib-cache")
    src = make_bundle(tmp / "calib")
    times = []
    for i in range(3):
        t = time.perf_counter()
        store.publish("calibration", src, make_meta(), version=f"c{i}")
        times.append(time.perf_counter() - t)
    return max(statistics.median(times), 0.005)


def run_rounds(
    pool: Executor,
    *,
    uri: str,
    endpoint: str | None,
    tmp: Path,
    rounds: int,
    seed: int,
    lead_s: float,
    mutants: dict[str, str] | None = None,
    stop_when: Callable[[list[str]], bool] | None = None,
) -> tuple[dict[int, list[str]], Counter[str]]:
    """Race ``rounds`` fresh versions; return the violations per round and coverage counters."""
    rng = random.Random(seed)
    publish_s = _publish_seconds(uri, endpoint, tmp)
    checker = open_store(uri, endpoint_url=endpoint, cache_dir=tmp / "checker")
    violations: dict[int, list[str]] = {}
    seen: Counter[str] = Counter()
    for n in range(rounds):
        srcs = (make_bundle(tmp / f"src{n}a", seed=f"a{n}"), make_bundle(tmp / f"src{n}b", seed=f"b{n}"))
        digests = (tree_digest(srcs[0]), tree_digest(srcs[1]))
        jobs = round_jobs(
            uri=uri,
            endpoint=endpoint,
            tmp=tmp,
            n=n,
            srcs=srcs,
            publish_s=publish_s,
            rng=rng,
            lead_s=lead_s,
            in_place=uri.startswith("file://"),
            mutants=mutants,
        )
        results = list(pool.map(act, jobs))
        bad = check_round(checker, f"v{n}", digests, results)
        if bad:
            violations[n] = bad
        seen["tombstoned" if checker.tombstone(TASK, f"v{n}") else "published"] += 1
        seen.update(f"read:{status}" for status, _ in results[3])
        seen.update(f"publish:{r[0]}" for r in results[:2])
        if stop_when is not None and stop_when(bad):
            break
    return violations, seen


def _assert_safe(violations: dict[int, list[str]], seen: Counter[str]) -> None:
    assert not violations, "\n".join(f"round {n}: {v}" for n, vs in violations.items() for v in vs)
    # The rounds explored both outcomes and readers on both sides of the delete.
    assert seen["published"] and seen["tombstoned"], seen
    assert seen["read:ok"] and seen["read:deleted"], seen


@pytest.mark.parametrize(
    "kind", ["file", "moto", pytest.param("rgw", marks=[pytest.mark.s3, pytest.mark.integration])]
)
def test_delete_racing_publish_threads(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    stores = StoreFactory(kind, request, tmp_path)
    with ThreadPoolExecutor(4) as pool:
        violations, seen = run_rounds(
            pool, uri=stores.uri("race"), endpoint=stores.endpoint, tmp=tmp_path, rounds=THREAD_ROUNDS[kind],
            seed=13, lead_s=0.02,
        )  # fmt: skip
    _assert_safe(violations, seen)


@pytest.mark.parametrize("kind", ["file", pytest.param("rgw", marks=[pytest.mark.s3, pytest.mark.integration])])
def test_delete_racing_publish_processes(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    stores = StoreFactory(kind, request, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        list(pool.map(warm_worker, range(4)))
        violations, seen = run_rounds(
            pool, uri=stores.uri("race"), endpoint=stores.endpoint, tmp=tmp_path, rounds=PROCESS_ROUNDS[kind],
            seed=31, lead_s=0.25,
        )  # fmt: skip
    _assert_safe(violations, seen)


@pytest.mark.parametrize(
    "mutant,role,expected",
    [
        ("old_delete", "delete", "name reused"),  # no tombstone: the name can be published again
        ("files_first", "delete", "reader saw a broken bundle"),  # files removed before the tombstone
        ("publish_ignores_tombstone", "publish", "name reused"),  # publisher skips both tombstone checks
    ],
)
def test_race_checker_catches_broken_protocols(mutant: str, role: str, expected: str, tmp_path: Path) -> None:
    """The race test can fail: each deliberately broken ordering is caught within a bounded number of rounds."""
    with ThreadPoolExecutor(4) as pool:
        violations, _ = run_rounds(
            pool, uri=f"file://{tmp_path}/store", endpoint=None, tmp=tmp_path, rounds=80, seed=7, lead_s=0.02,
            mutants={role: mutant}, stop_when=lambda bad: any(expected in v for v in bad),
        )  # fmt: skip
    found = [v for vs in violations.values() for v in vs]
    assert any(expected in v for v in found), f"{mutant} was not caught: {found}"


def test_republish_after_delete_refused_whatever_the_client(stores: StoreFactory, tmp_path: Path) -> None:
    """Sequential baseline of the race: a second client cannot reuse a name the first one deleted."""
    a, b = stores.open(cache="a"), stores.open(cache="b")
    a.publish(TASK, make_bundle(tmp_path / "x", seed="x"), make_meta(), version="v")
    b.delete(TASK, "v")
    with pytest.raises(ConflictError, match="never reused"):
        a.publish(TASK, make_bundle(tmp_path / "y", seed="y"), make_meta(), version="v")
    assert a.list_versions(TASK) == [] and b.deleted_versions(TASK)[0].version == "v"



@pytest.mark.parametrize("error", [FileExistsError, FileNotFoundError])
def test_local_upload_survives_a_directory_pruned_while_it_is_created(
    error: type[OSError], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete prunes empty directories; if that happens while a publish's mkdir is creating the same chain,
    pathlib raises "File exists" (made, then gone before its check) or "No such file". The upload retries
    instead of failing the publish with a generic StoreError (seen once in the thread race on file://)."""
    import pathlib

    from svd_ray.store.backends import LocalBackend

    real_mkdir = pathlib.Path.mkdir
    raised: list[Path] = []

    def flaky_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "v1" and not raised:
            raised.append(self)
            raise error(17 if error is FileExistsError else 2, "simulated prune", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    src = tmp_path / "f.txt"
    src.write_bytes(b"payload")
    backend = LocalBackend(tmp_path / "store")
    monkeypatch.setattr(pathlib.Path, "mkdir", flaky_mkdir)
    backend.upload_file("tasks/t/v1/data-x/f.txt", src)
    assert raised and backend.read_bytes("tasks/t/v1/data-x/f.txt") == b"payload"
