"""`make sabotage`: break the code on purpose, one named way at a time, and check the suite notices.

Each sabotage (catalog.py) is a small edit of one file, found by an exact anchor string. For each, the
tree (tracked + untracked, not ignored files, plus the built C packer) is copied to a temporary folder,
the edit applied there, and only the tests meant to catch it are run against the copy, cheapest first,
stopping at the first failure. One line per sabotage, as each finishes:

    SABOTAGE <name>: caught by <failing test id> (<its failure>, <seconds>)
    SABOTAGE <name>: SURVIVED            (every listed test passed on broken code)
    SABOTAGE <name>: STALE (...)         (the anchor is gone, or a listed test id no longer exists:
                                          the catalog must follow the code)
    SABOTAGE <name>: INVALID (...)       (the edit does not parse, or changes nothing the interpreter
                                          sees, e.g. only a comment: it could never break anything)

Before any sabotage runs, every listed test id is collected once on the unbroken tree, so that a
renamed test is STALE instead of "caught" by pytest's usage error. A catch only counts when pytest
reports a failing or erroring test (a timeout counts: the broken code hung the tests).

Exit status 1 if any sabotage survived or is stale / invalid. `--only NAME[,NAME]` runs a subset,
`--list` prints the catalog, `--table` prints it as the markdown table of tests/sabotage/README.md and
`--readme` rewrites that table there, `--check` checks every entry without running tests (anchor
once, edit parses and changes code, the listed test files exist), `--jobs N` runs N sabotages at once
(default: the CPU count), `--all` runs every listed test instead of stopping at the first failure. Sabotages run longest first (the
times of the last run, kept in outputs/sabotage/times.json, else integration tests first), so that
the slow ones do not end up alone at the tail.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIMES = REPO / "outputs" / "sabotage" / "times.json"
sys.path.insert(0, str(HERE))  # a tool beside the tests, run as a script: catalog.py sits next to it

from catalog import SABOTAGES, Sabotage  # noqa: E402


def tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    files = [f for f in out.stdout.splitlines() if (REPO / f).is_file()]
    files += [str(p.relative_to(REPO)) for p in (REPO / "mmtrain").rglob("*.so")]
    return files


def copy_tree(dst: Path, files: list[str]) -> None:
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)


def _env(root: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def check_edit(s: Sabotage, text: str) -> str | None:
    """Why the edit cannot work (anchor missing or ambiguous, result unparsable, no change to the
    code the interpreter runs), or None."""
    n = text.count(s.anchor)
    if n != 1:
        return f"STALE (anchor found {n} times in {s.file})"
    new = text.replace(s.anchor, s.replacement)
    if s.file.endswith(".py"):
        try:
            before, after = ast.dump(ast.parse(text)), ast.dump(ast.parse(new))
        except SyntaxError as e:
            return f"INVALID (the edited {s.file} does not parse: {e.msg}, line {e.lineno})"
        if before == after:
            return f"INVALID (the edit changes nothing but layout or comments in {s.file})"
    elif new == text:
        return f"INVALID (the edit changes nothing in {s.file})"
    return None


def missing_test_ids(chosen: list[Sabotage]) -> dict[str, list[str]]:
    """Listed test ids that collect nothing on the unbroken tree, by sabotage name."""
    ids = sorted({t for s in chosen for t in s.tests})
    files = sorted({t.split("::")[0] for t in ids})
    absent = {f for f in files if not (REPO / f).is_file()}
    present = [f for f in files if f not in absent]
    collected: set[str] = set()
    if present:
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *present],
                              cwd=REPO, env=_env(REPO), capture_output=True, text=True, timeout=600)
        collected = {line.strip() for line in proc.stdout.splitlines() if "::" in line and " " not in line.strip()}

    def found(t: str) -> bool:
        f = t.split("::")[0]
        if f in absent:
            return False
        if "::" not in t:
            return any(c.startswith(t + "::") for c in collected)
        return any(c == t or c.startswith(t + "[") or c.startswith(t + "::") for c in collected)

    out: dict[str, list[str]] = {}
    for s in chosen:
        gone = [t for t in s.tests if not found(t)]
        if gone:
            out[s.name] = gone
    return out


def failing_tests(root: Path, tests: list[str], timeout: int, stop_first: bool) -> tuple[list[tuple[str, str]], str]:
    """[(test id, short reason)] of the failing / erroring tests, and the tail of pytest's output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "--tb=line", *tests]
    if stop_first:
        cmd.insert(3, "-x")
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [("<timeout: the broken code hung the tests>", f"no result within {timeout} s")], ""
    (root / ".sabotage-report.txt").write_text(proc.stdout + proc.stderr)
    failed = []
    for line in proc.stdout.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            rest = line.split(" ", 1)[1]
            test, _, why = rest.partition(" - ")
            failed.append((test, why.strip()))
    return failed, proc.stdout[-3000:]


def run_one(s: Sabotage, files: list[str], timeout: int, verbose: bool, stop_first: bool) -> tuple[str, bool, float]:
    with tempfile.TemporaryDirectory(prefix=f"sabotage-{s.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root, files)
        path = root / s.file
        if not path.is_file():
            return f"SABOTAGE {s.name}: STALE ({s.file} does not exist)", False, 0.0
        text = path.read_text()
        err = check_edit(s, text)
        if err:
            return f"SABOTAGE {s.name}: {err}", False, 0.0
        path.write_text(text.replace(s.anchor, s.replacement))
        t0 = time.time()
        failed, tail = failing_tests(root, list(s.tests), timeout, stop_first)
        dt = time.time() - t0
        if failed:
            shown = " ".join(f"{t} ({why[:110]})" if why else t for t, why in failed)
            return f"SABOTAGE {s.name}: caught by {shown} ({dt:.0f} s)", True, dt
        extra = f"\n{tail}" if verbose else ""
        return f"SABOTAGE {s.name}: SURVIVED ({' '.join(s.tests)} all passed, {dt:.0f} s){extra}", False, dt


README = HERE / "README.md"
TABLE_BEGIN = "<!-- sabotage table: generated by `tests/sabotage/run.py --readme`, do not edit -->"
TABLE_END = "<!-- end of sabotage table -->"


def markdown_table(chosen: list[Sabotage]) -> str:
    """One row per sabotage: name, the claim it breaks, the edited file, the tests that must catch it."""
    rows = ["| sabotage | claim it breaks | file | caught by |", "|---|---|---|---|"]
    for s in chosen:
        claim = s.claim.replace("|", "\\|")
        tests = "<br>".join(f"`{t}`" for t in s.tests)
        rows.append(f"| `{s.name}` | {claim} | `{s.file}` | {tests} |")
    return "\n".join(rows) + "\n"


def readme_with_table(text: str, table: str) -> str:
    """`text` with the part between the table markers replaced by `table`."""
    head, sep, rest = text.partition(TABLE_BEGIN)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep and sep2):
        raise SystemExit(f"{README}: the table markers are missing ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    return f"{head}{TABLE_BEGIN}\n{table}{TABLE_END}{tail}"


def static_problems(chosen: list[Sabotage]) -> list[str]:
    """Entries that cannot work, found without running a test: the anchor not exactly once in its
    file, an edit that does not parse or changes no code, a listed test file that does not exist."""
    out = []
    for s in chosen:
        path = REPO / s.file
        err = check_edit(s, path.read_text()) if path.is_file() else f"STALE ({s.file} does not exist)"
        if err:
            out.append(f"SABOTAGE {s.name}: {err}")
        gone = [t for t in s.tests if not (REPO / t.split("::")[0]).is_file()]
        if gone:
            out.append(f"SABOTAGE {s.name}: STALE (no such test file: {' '.join(gone)})")
    return out


def _expected_seconds(s: Sabotage, times: dict) -> float:
    if s.name in times:
        return float(times[s.name])
    return 60.0 if any(t.startswith("tests/integration") for t in s.tests) else 10.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated sabotage names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the catalog as README.md's markdown table")
    ap.add_argument("--readme", action="store_true", help="rewrite the table in tests/sabotage/README.md")
    ap.add_argument("--check", action="store_true", help="check every entry's anchor, edit and test files; run nothing")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per sabotage")
    ap.add_argument("--all", action="store_true", help="run every listed test (default: stop at the first failure)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    names = [s.name for s in SABOTAGES]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        ap.error(f"duplicate sabotage names in the catalog: {dup}")
    chosen = SABOTAGES
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(names)
        if unknown:
            ap.error(f"unknown sabotage(s): {sorted(unknown)}")
        chosen = [s for s in SABOTAGES if s.name in wanted]
    if args.list:
        for s in chosen:
            print(f"{s.name}: {s.claim}\n    {s.file}; caught by {' '.join(s.tests)}")
        return 0
    if args.table:
        print(markdown_table(chosen), end="")
        return 0
    if args.readme:
        README.write_text(readme_with_table(README.read_text(), markdown_table(SABOTAGES)))
        print(f"{README.relative_to(REPO)}: table of {len(SABOTAGES)} sabotages written")
        return 0
    if args.check:
        problems = static_problems(chosen)
        for line in problems:
            print(line)
        print(f"{len(chosen)} sabotages checked: {len(problems) or 'no'} problem(s)")
        return 1 if problems else 0
    t0 = time.time()
    files = tree_files()
    stale = missing_test_ids(chosen)
    ok_all = True
    for name, gone in stale.items():
        print(f"SABOTAGE {name}: STALE (no such test: {' '.join(gone)})", flush=True)
        ok_all = False
    runnable = [s for s in chosen if s.name not in stale]
    times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    runnable.sort(key=lambda s: -_expected_seconds(s, times))
    counts = {"caught": 0, "other": len(stale)}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, s, files, args.timeout, args.verbose, not args.all): s for s in runnable}
        for fut in as_completed(futures):
            line, ok, dt = fut.result()
            print(line, flush=True)
            ok_all &= ok
            counts["caught" if ok else "other"] += 1
            if dt > 0:
                times[futures[fut].name] = round(dt, 1)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")
    verdict = "all caught" if ok_all else f"{counts['other']} SURVIVED, STALE OR INVALID"
    print(f"{len(chosen)} sabotages in {time.time() - t0:.0f} s ({max(1, args.jobs)} at once): "
          f"{counts['caught']} caught; {verdict}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
