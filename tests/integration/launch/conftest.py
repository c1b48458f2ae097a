"""Session fixture: a real single-node Slurm cluster on localhost (launch/local_slurm.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "launch" / "local_slurm.sh"


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """Start munged/slurmctld/slurmd; stop them (by pid file) afterwards.

    No root or no apt-get fails the test with the script's message: a Slurm test that silently skips
    would count as passing. Set MMTRAIN_SKIP_SLURM=1 to skip deliberately.
    """
    if os.environ.get("MMTRAIN_SKIP_SLURM") == "1":
        pytest.skip("on request: MMTRAIN_SKIP_SLURM=1 (Slurm integration tests not run)")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, MMTRAIN_SLURM_DIR=str(state))
    res = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)
        pytest.fail(
            "could not start the local Slurm cluster (launch/local_slurm.sh up, needs root and apt-get; "
            f"set MMTRAIN_SKIP_SLURM=1 to skip on purpose):\n{res.stderr.strip()}",
            pytrace=False,
        )
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
