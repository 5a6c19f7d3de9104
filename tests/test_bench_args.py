"""The bench scripts check ``--out`` before their long runs: a stem under bench/results/, never a path."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench._common import RESULTS, result_stem

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stem", ["generation", "generation-xeon", "kmeans_zen1.v2"])
def test_a_plain_stem_is_kept(stem):
    assert result_stem(stem) == stem
    assert (RESULTS / f"{stem}.json").parent == RESULTS


@pytest.mark.parametrize("bad", ["/tmp/x", "../x", "sub/x", "", ".", ".."])
def test_a_path_is_refused_with_the_reason(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="file stem"):
        result_stem(bad)


def test_the_script_stops_at_argument_parsing():
    # kmeans parses its arguments before importing faiss or reading data: the refusal is immediate
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kmeans", "--out", "/tmp/elsewhere"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--out '/tmp/elsewhere': give a file stem" in proc.stderr
    assert not Path("/tmp/elsewhere.json").exists()
