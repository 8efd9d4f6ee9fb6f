"""Mutation check of the privacy code: ``make mutants`` (``python tests/mutants/run.py``).

Applies each mutation of tests/mutants/mutations.yml (one realistic privacy bug: an exact edit of
one or more source snippets) to a temporary copy of the repository, never the working tree, runs
the tests that must catch it there, and fails if any mutation survives, if a snippet is no longer
found exactly once (the list cannot rot silently), if a named test does not exist, or if the named
tests fail on the unmutated copy (a failing test would "kill" every mutant).

Usage:
    python tests/mutants/run.py                  # every mutation, 2 jobs
    python tests/mutants/run.py -k dp- -j 1      # mutations whose id contains "dp-"
    python tests/mutants/run.py --tests-from 3d82c0f
        # score of the tests of an older commit: its tests/ replaces the copy's, each mutation runs
        # the test directories (--scope files: files) of its named tests that existed then; a
        # mutation with none of them counts as not killed (reporting only: never fails)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LIST = Path(__file__).resolve().parent / "mutations.yml"
KEYS = {"id", "why", "edits", "tests"}
EDIT_KEYS = {"file", "find", "replace"}


@dataclasses.dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    why: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


def load_mutations(path: Path = LIST) -> list[Mutation]:
    """Parse and validate the list (unknown or missing keys, duplicate ids are errors)."""
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, list):
        raise SystemExit(f"{path}: expected a list of mutations")
    out, seen = [], set()
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != KEYS:
            raise SystemExit(
                f"{path}: entry {index}: expected exactly the keys {sorted(KEYS)}, got {entry!r:.120}"
            )
        if entry["id"] in seen:
            raise SystemExit(f"{path}: duplicate id {entry['id']!r}")
        seen.add(entry["id"])
        edits = []
        for edit in entry["edits"]:
            if not isinstance(edit, dict) or set(edit) != EDIT_KEYS:
                raise SystemExit(f"{path}: {entry['id']}: an edit needs exactly the keys {sorted(EDIT_KEYS)}")
            if edit["find"] == edit["replace"]:
                raise SystemExit(f"{path}: {entry['id']}: find and replace are the same")
            edits.append(Edit(str(edit["file"]), str(edit["find"]), str(edit["replace"])))
        tests = entry["tests"]
        if not edits or not isinstance(tests, list) or not tests:
            raise SystemExit(f"{path}: {entry['id']}: expected at least one edit and one test")
        out.append(Mutation(str(entry["id"]), str(entry["why"]), tuple(edits), tuple(map(str, tests))))
    return out


def check_snippets(mutations: list[Mutation], root: Path) -> list[str]:
    """Every snippet must occur exactly once in its file (edits of one mutation applied in order)."""
    problems = []
    for m in mutations:
        texts: dict[str, str] = {}
        for edit in m.edits:
            path = root / edit.file
            if edit.file not in texts:
                if not path.is_file():
                    problems.append(f"{m.id}: {edit.file} does not exist")
                    continue
                texts[edit.file] = path.read_text()
            count = texts[edit.file].count(edit.find)
            if count != 1:
                problems.append(
                    f"{m.id}: snippet found {count} times in {edit.file} (expected once): {edit.find!r:.100}"
                )
                continue
            texts[edit.file] = texts[edit.file].replace(edit.find, edit.replace)
        for test in m.tests:
            if not (root / test.split("::")[0]).exists():
                problems.append(f"{m.id}: test file {test.split('::')[0]} does not exist")
    return problems


def repository_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files (what a fresh clone plus local edits would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def make_copy(root: Path, dest: Path, files: list[str], tests_from: str | None) -> None:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    if tests_from:
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tests_from, "tests"], cwd=root, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")


def pytest_command(tests: list[str], *, stop_first: bool) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    if stop_first:
        command.append("-x")
    return [*command, "--no-header", "-W", "ignore::pytest.PytestUnknownMarkWarning", *tests]


def run_tests(copy: Path, tests: list[str], timeout: float, *, stop_first: bool) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, output tail) of pytest in ``copy``."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    started = time.monotonic()
    try:
        done = subprocess.run(
            pytest_command(tests, stop_first=stop_first),
            cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:]
        return (
            "timeout",
            time.monotonic() - started,
            tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        )
    seconds = time.monotonic() - started
    tail = (done.stdout + done.stderr)[-3000:]
    # pytest: 0 all passed, 1 some failed; 2 interrupted (e.g. collection error), 4 usage, 5 nothing collected.
    status = {0: "passed", 1: "failed"}.get(done.returncode, "error")
    return status, seconds, tail


def apply(copy: Path, mutation: Mutation) -> dict[str, str]:
    """Apply the edits in ``copy``; returns the original texts to restore."""
    originals: dict[str, str] = {}
    for edit in mutation.edits:
        path = copy / edit.file
        text = path.read_text()
        originals.setdefault(edit.file, text)
        if text.count(edit.find) != 1:
            raise RuntimeError(f"{mutation.id}: snippet not found once in {edit.file}")
        path.write_text(text.replace(edit.find, edit.replace))
    return originals


def restore(copy: Path, originals: dict[str, str]) -> None:
    for name, text in originals.items():
        (copy / name).write_text(text)


def tests_for(mutation: Mutation, copy: Path, tests_from: str | None, scope: str = "dirs") -> list[str]:
    if not tests_from:
        return list(mutation.tests)
    if scope == "files":  # the named test files that existed then (whole files, not single tests)
        files = sorted({t.split("::")[0] for t in mutation.tests})
        return [f for f in files if (copy / f).is_file()]
    # the directories of the named tests, as they existed then
    dirs = sorted({str(Path(t.split("::")[0]).parent) for t in mutation.tests})
    return [d for d in dirs if (copy / d).is_dir()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "-k", "--select", default=None, help="only mutations whose id contains one of these (comma-separated)"
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per mutant's tests")
    parser.add_argument("--tests-from", default=None, help="git revision whose tests/ to score (report only)")
    parser.add_argument(
        "--scope", choices=("dirs", "files"), default="dirs", help="with --tests-from: which old tests to run"
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="do not run the named tests unmutated first"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--list", default=str(LIST), help="the mutations file (default: %(default)s)")
    args = parser.parse_args(argv)

    mutations = load_mutations(Path(args.list))
    if args.select:
        wanted = args.select.split(",")
        mutations = [m for m in mutations if any(w in m.id for w in wanted)]
    problems = check_snippets(mutations, ROOT)
    if args.tests_from:
        problems = [p for p in problems if "test file" not in p]
    if problems:
        print("mutants: the list no longer matches the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    files = repository_files(ROOT)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedrec-mutants-") as tmp:
        copies = [Path(tmp) / f"copy{i}" for i in range(max(1, args.jobs))]
        for copy in copies:
            make_copy(ROOT, copy, files, args.tests_from)
        if not args.skip_baseline:
            union = sorted(
                {t for m in mutations for t in tests_for(m, copies[0], args.tests_from, args.scope)}
            )
            status, seconds, tail = run_tests(copies[0], union, args.timeout * 3, stop_first=False)
            print(f"baseline: the {len(union)} named tests on the unmutated copy: {status} ({seconds:.0f} s)")
            if status != "passed" and not args.tests_from:
                print(tail, file=sys.stderr)
                print("mutants: the named tests must pass unmutated", file=sys.stderr)
                return 2
        free = list(copies)

        def one(mutation: Mutation) -> dict:
            copy = free.pop()
            try:
                tests = tests_for(mutation, copy, args.tests_from, args.scope)
                if not tests:
                    return {"id": mutation.id, "status": "no tests", "seconds": 0.0, "tail": ""}
                originals = apply(copy, mutation)
                try:
                    status, seconds, tail = run_tests(copy, tests, args.timeout, stop_first=True)
                finally:
                    restore(copy, originals)
                return {"id": mutation.id, "status": status, "seconds": seconds, "tail": tail, "tests": tests}
            finally:
                free.append(copy)

        results = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for result in pool.map(one, mutations):
                verdict = {
                    "failed": "killed",
                    "timeout": "killed (timeout)",
                    "passed": "SURVIVED",
                    "no tests": "SURVIVED (no test)",
                }.get(result["status"], f"ERROR ({result['status']})")
                result["verdict"] = verdict
                print(f"{result['id']:<48} {verdict:<18} {result['seconds']:6.1f} s", flush=True)
                if result["status"] == "error":
                    print(result["tail"], file=sys.stderr)
                results.append(result)
    killed = sum(r["verdict"].startswith("killed") for r in results)
    elapsed = time.monotonic() - started
    print(f"mutation score: {killed}/{len(results)} killed in {elapsed:.0f} s ({args.jobs} job(s))")
    if args.json:
        Path(args.json).write_text(json.dumps({"killed": killed, "total": len(results), "seconds": elapsed,
                                               "results": [{k: v for k, v in r.items() if k != "tail"} for r in results]}, indent=1))  # fmt: skip
    if args.tests_from:
        return 0
    bad = [r["id"] for r in results if not r["verdict"].startswith("killed")]
    if bad:
        print("mutants: survived or errored: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
