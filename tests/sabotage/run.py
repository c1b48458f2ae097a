"""`make sabotage`: break the code on purpose, one named way at a time, and check the suite notices.

Each sabotage (catalog.py) is a small edit of one file, found by an exact anchor string. For each, the
tree (tracked + untracked, not ignored files, plus the built C packer) is copied to a temporary folder,
the edit applied there, and only the tests meant to catch it are run against the copy. One line per
sabotage:

    SABOTAGE <name>: caught by <failing test ids>
    SABOTAGE <name>: SURVIVED            (every listed test passed on broken code)
    SABOTAGE <name>: STALE (...)         (the anchor is gone: the catalog must follow the code)

Exit status 1 if any sabotage survived or is stale. `--only NAME[,NAME]` runs a subset, `--list`
prints the catalog, `--jobs N` runs N sabotages at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
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


def apply(s: Sabotage, root: Path) -> str | None:
    """Apply the edit in the copy; returns an error string when the anchor is missing or ambiguous."""
    path = root / s.file
    if not path.is_file():
        return f"{s.file} does not exist"
    text = path.read_text()
    n = text.count(s.anchor)
    if n != 1:
        return f"anchor found {n} times in {s.file}"
    path.write_text(text.replace(s.anchor, s.replacement))
    return None


def failing_tests(root: Path, tests: list[str], timeout: int) -> tuple[list[str], str]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    report = root / ".sabotage-report.txt"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ["<timeout: the broken code hung the tests>"], ""
    report.write_text(proc.stdout + proc.stderr)
    failed = [line.split(" ", 2)[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode not in (0, 1) and not failed:  # collection or usage error
        failed = [f"<pytest exit {proc.returncode}>"]
    return failed, proc.stdout[-3000:]


def run_one(s: Sabotage, files: list[str], timeout: int, verbose: bool) -> tuple[str, bool]:
    with tempfile.TemporaryDirectory(prefix=f"sabotage-{s.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root, files)
        err = apply(s, root)
        if err:
            return f"SABOTAGE {s.name}: STALE ({err})", False
        t0 = time.time()
        failed, tail = failing_tests(root, list(s.tests), timeout)
        dt = time.time() - t0
        if failed:
            return f"SABOTAGE {s.name}: caught by {' '.join(failed)} ({dt:.0f} s)", True
        extra = f"\n{tail}" if verbose else ""
        return f"SABOTAGE {s.name}: SURVIVED ({' '.join(s.tests)} all passed, {dt:.0f} s){extra}", False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated sabotage names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per sabotage")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    chosen = SABOTAGES
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {s.name for s in SABOTAGES}
        if unknown:
            ap.error(f"unknown sabotage(s): {sorted(unknown)}")
        chosen = [s for s in SABOTAGES if s.name in names]
    if args.list:
        for s in chosen:
            print(f"{s.name}: {s.claim}\n    {s.file}; caught by {' '.join(s.tests)}")
        return 0
    files = tree_files()
    t0 = time.time()
    ok_all = True
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for line, ok in pool.map(lambda s: run_one(s, files, args.timeout, args.verbose), chosen):
            print(line, flush=True)
            ok_all &= ok
    print(f"{len(chosen)} sabotages in {time.time() - t0:.0f} s: {'all caught' if ok_all else 'SOME SURVIVED OR ARE STALE'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
