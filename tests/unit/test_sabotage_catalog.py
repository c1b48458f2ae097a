"""The sabotage catalog (tests/sabotage/catalog.py) stays runnable without running it: every anchor
occurs exactly once in its file, every edit parses and changes code, every listed test file exists,
names are unique, and tests/sabotage/README.md's table is the catalog's."""

from __future__ import annotations

import importlib.util

from mmtest_utils import REPO


def _runner():
    spec = importlib.util.spec_from_file_location("sabotage_run", REPO / "tests" / "sabotage" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_entry_applies_and_the_readme_table_is_the_catalog():
    run = _runner()
    names = [s.name for s in run.SABOTAGES]
    assert len(names) == len(set(names)) and len(names) >= 10
    assert all(s.tests and s.claim for s in run.SABOTAGES)
    assert run.static_problems(run.SABOTAGES) == []
    readme = run.README.read_text()
    assert run.readme_with_table(readme, run.markdown_table(run.SABOTAGES)) == readme, \
        "tests/sabotage/README.md's table is out of date: run .venv/bin/python tests/sabotage/run.py --readme"


def test_the_static_check_names_a_stale_anchor_and_a_comment_only_edit():
    run = _runner()
    s = run.SABOTAGES[0]
    stale = run.Sabotage(s.name, s.claim, s.file, s.anchor + "#no such text", s.replacement, s.tests)
    comment = run.Sabotage(s.name, s.claim, s.file, s.anchor, s.anchor + "  # only a comment", s.tests)
    gone = run.Sabotage(s.name, s.claim, s.file, s.anchor, s.replacement, ("tests/unit/no_such_test.py",))
    problems = run.static_problems([stale, comment, gone])
    assert len(problems) == 3
    assert "STALE (anchor found 0 times" in problems[0] and "INVALID" in problems[1] and "no such test file" in problems[2]
