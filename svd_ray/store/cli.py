"""``svd-ray tasks list|show|verify|promote|delete|publish|fetch|gc``.

Wire into the main CLI with::

    from svd_ray.store.cli import add_tasks_parser, run_tasks
    add_tasks_parser(subparsers)          # registers "tasks"; args.func is NOT used, call run_tasks(args)
    ...
    if args.command == "tasks": sys.exit(run_tasks(args))

Exit codes: 0 success, 1 ``verify`` found problems, 2 error (one line on stderr, never a traceback), 3 the
storage is unavailable (:class:`~svd_ray.store.errors.StoreUnavailable`: retry later; also one line).
Standalone: ``python -m svd_ray.store.cli tasks list``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import open_store
from .bundle_store import BundleStore
from .errors import StoreError, StoreUnavailable
from .uri import DEFAULT_STORE_URI, default_store_uri

__all__ = ["add_tasks_parser", "run_tasks", "main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--store",
        metavar="URI",
        default=None,
        help=f"store URI (file:///dir or s3://bucket/prefix); default $SVD_RAY_STORE or {DEFAULT_STORE_URI}",
    )
    p.add_argument("--endpoint-url", metavar="URL", default=None, help="S3 endpoint (default $SVD_RAY_S3_ENDPOINT)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return p


def add_tasks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``tasks`` command (and its sub-commands) on an argparse ``subparsers`` object."""
    common = _common()
    tasks: argparse.ArgumentParser = subparsers.add_parser(
        "tasks",
        help="manage trained task bundles in the store",
        description="Manage trained task bundles in the store.",
    )
    sub = tasks.add_subparsers(dest="tasks_command", metavar="{list,show,verify,promote,delete,publish,fetch,gc}")
    sub.required = True

    p = sub.add_parser(
        "list", parents=[common], help="list tasks, or the versions of one task (deleted versions are marked)"
    )
    p.add_argument("task", nargs="?", help="list this task's versions")

    p = sub.add_parser("show", parents=[common], help="print a version's manifest")
    p.add_argument("task")
    p.add_argument("version", nargs="?", default="latest", help="version, 'latest' (default) or 'promoted'")

    p = sub.add_parser("verify", parents=[common], help="re-hash the stored files of a version (exit 1 on problems)")
    p.add_argument("task")
    p.add_argument("version", nargs="?", default="latest", help="version, 'latest' (default) or 'promoted'")
    p.add_argument("--all", action="store_true", help="verify every version of the task")

    p = sub.add_parser("promote", parents=[common], help="make a version the promoted one")
    p.add_argument("task")
    p.add_argument("version", help="version or 'latest'")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the files before promoting")

    p = sub.add_parser(
        "delete",
        parents=[common],
        help="delete a version for good (a tombstone keeps its name: it can never be published again)",
    )
    p.add_argument("task")
    p.add_argument("version", help="explicit version name (aliases are not accepted)")
    p.add_argument("--force", action="store_true", help="also delete the currently promoted version")
    p.add_argument("--reason", default="", help="why (recorded in the tombstone, shown by `tasks list TASK`)")

    p = sub.add_parser("publish", parents=[common], help="publish a directory as a new version")
    p.add_argument("task")
    p.add_argument("src_dir")
    p.add_argument("--meta", metavar="FILE", help="JSON file with the bundle metadata (default {})")
    p.add_argument("--version", dest="version", default=None, help="version name (default: UTC timestamp)")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")

    p = sub.add_parser("fetch", parents=[common], help="download and verify a version")
    p.add_argument("task")
    p.add_argument("version", nargs="?", default="latest", help="version, 'latest' (default) or 'promoted'")
    p.add_argument("--dest", default=None, help="destination directory (default: the bundle cache)")
    p.add_argument("--base-model-id", default=None, help="fail unless the bundle was trained on this model")
    p.add_argument("--weights-sha256", default=None)
    p.add_argument("--tokenizer-sha256", default=None)

    p = sub.add_parser(
        "gc", parents=[common], help="remove data left by failed or losing publishes and by interrupted deletes"
    )
    p.add_argument("task", nargs="?")
    p.add_argument(
        "--min-age", type=float, default=3600.0, metavar="SECONDS", help="only older leftovers (default 3600)"
    )
    return tasks


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True) if args.json else text)


def _run(store: BundleStore, args: argparse.Namespace) -> int:
    cmd = args.tasks_command
    if cmd == "list":
        if args.task:
            versions = store.list_versions(args.task)
            deleted = store.deleted_versions(args.task)
            promoted = store.promoted(args.task)
            rows: list[dict[str, Any]] = [{"version": v, "promoted": v == promoted, "deleted": None} for v in versions]
            rows += [
                {
                    "version": t.version,
                    "promoted": t.version == promoted,
                    "deleted": {"deleted_at": t.deleted_at, "reason": t.reason},
                }
                for t in deleted
            ]
            _out(args, rows, "\n".join(_version_line(r) for r in rows))
        else:
            rows = []
            for t in store.list_tasks(include_deleted=True):
                versions = store.list_versions(t)
                n_deleted = len(store.deleted_versions(t))
                rows.append(
                    {
                        "task": t,
                        "versions": len(versions),
                        "latest": versions[-1] if versions else None,
                        "promoted": store.promoted(t),
                        "deleted": n_deleted,
                    }
                )
            text = "\n".join(
                f"{r['task']}\t{r['versions']} version(s)\tlatest {r['latest'] or '-'}\tpromoted {r['promoted'] or '-'}"
                + (f"\t{r['deleted']} deleted" if r["deleted"] else "")
                for r in rows
            )
            _out(args, rows, text)
        return EXIT_OK
    if cmd == "show":
        m = store.manifest(args.task, args.version)
        print(m.to_json().rstrip("\n"))
        return EXIT_OK
    if cmd == "verify":
        versions = store.list_versions(args.task) if args.all else [store.resolve(args.task, args.version)]
        if not versions:
            raise StoreError(f"task {args.task!r} has no complete versions in {store.uri}")
        report = {v: store.verify(args.task, v) for v in versions}
        lines = []
        for v, problems in report.items():
            lines.append(f"{args.task} {v}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            lines += [f"  {p}" for p in problems]
        _out(args, report, "\n".join(lines))
        return EXIT_PROBLEMS if any(report.values()) else EXIT_OK
    if cmd == "promote":
        rec = store.promote(args.task, args.version, verify=not args.no_verify)
        _out(
            args,
            {"task": rec.task, "version": rec.version, "seq": rec.seq},
            f"promoted {rec.task} {rec.version} (record {rec.seq})",
        )
        return EXIT_OK
    if cmd == "delete":
        before = _tombstone_before(store, args.task, args.version)
        tomb = store.delete(args.task, args.version, force=args.force, reason=args.reason)
        text = (
            f"{args.task} {args.version} was already deleted at {tomb.deleted_at}"
            if before is not None
            else f"deleted {args.task} {args.version} (a tombstone keeps the name: it cannot be published again)"
        )
        _out(args, {"deleted": [args.task, args.version], "tombstone": tomb.to_dict()}, text)
        return EXIT_OK
    if cmd == "publish":
        meta: dict[str, Any] = {}
        if args.meta:
            try:
                with open(args.meta, encoding="utf-8") as fh:
                    meta = json.load(fh)
            except (OSError, ValueError) as exc:
                raise StoreError(f"cannot read --meta {args.meta}: {exc}") from None
        store.create_bucket = args.create_bucket
        m = store.publish(args.task, args.src_dir, meta, version=args.version)
        _out(
            args,
            {"task": m.task, "version": m.version, "files": len(m.files), "bytes": m.total_size},
            f"published {m.task} {m.version} ({len(m.files)} files, {m.total_size} bytes)",
        )
        return EXIT_OK
    if cmd == "fetch":
        expect = {
            "base_model_id": args.base_model_id,
            "weights_sha256": args.weights_sha256,
            "tokenizer_sha256": args.tokenizer_sha256,
        }
        path, m = store.fetch(args.task, args.version, dest_dir=args.dest, expect=expect)
        _out(args, {"task": m.task, "version": m.version, "path": str(path)}, str(path))
        return EXIT_OK
    if cmd == "gc":
        removed = store.gc(args.task, min_age_s=args.min_age)
        _out(args, removed, "\n".join(removed) if removed else "nothing to remove")
        return EXIT_OK
    raise StoreError(f"unknown tasks command {cmd!r}")


def _version_line(row: dict[str, Any]) -> str:
    marks = ["promoted"] if row["promoted"] else []
    if row["deleted"]:
        d = row["deleted"]
        marks.append(f"deleted {d['deleted_at']}" + (f": {d['reason']}" if d["reason"] else ""))
    return row["version"] + (f"  ({', '.join(marks)})" if marks else "")


def _tombstone_before(store: BundleStore, task: str, version: str) -> object | None:
    """The version's tombstone if it is already deleted (bad names are left to the command to report)."""
    from .errors import IntegrityError, InvalidNameError

    try:
        return store.tombstone(task, version)
    except InvalidNameError:
        return None
    except IntegrityError:  # unreadable record: still deleted
        return True


def run_tasks(args: argparse.Namespace) -> int:
    """Execute parsed ``tasks`` arguments; return the exit code (errors: one line on stderr, code 2; storage
    unavailable: code 3)."""
    try:
        store = open_store(args.store or default_store_uri(), endpoint_url=args.endpoint_url)
        return _run(store, args)
    except KeyboardInterrupt:
        print("svd-ray tasks: interrupted", file=sys.stderr)
        return 130
    except StoreUnavailable as exc:
        print(f"svd-ray tasks: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StoreError as exc:
        msg = str(exc)
    except (OSError, ValueError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # never a traceback on the CLI
        msg = f"unexpected {type(exc).__name__}: {exc}"
    print(f"svd-ray tasks: error: {' '.join(msg.split())}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m svd_ray.store.cli tasks ...``."""
    parser = argparse.ArgumentParser(prog="svd-ray")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_tasks_parser(subparsers)
    args = parser.parse_args(argv)
    return run_tasks(args)


if __name__ == "__main__":
    sys.exit(main())
