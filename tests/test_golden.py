"""The engine's numbers do not change: runs reproduce the goldens recorded before the issue-9 refactor bit for bit.

``tests/golden/*.json`` hold, for each case, the exact allocation, perplexities, measured sparsity and the SHA-256
of every saved tensor of runs made with the commit named in the file (see ``tests/golden/harness.py``).
"""
from __future__ import annotations

import json
import os

import pytest

from golden.harness import golden_path, run_suite


def _compare(which: str, tmp_path) -> None:
    golden = json.loads(golden_path(which).read_text())
    now = run_suite(which, tmp_path)
    assert sorted(now) == sorted(golden["runs"])
    diffs = []
    for case, jobs in golden["runs"].items():
        for job, want in jobs.items():
            got = now[case][job]
            for field in want:
                if got.get(field) != want[field]:
                    if isinstance(want[field], dict):
                        keys = [k for k in want[field] if got.get(field, {}).get(k) != want[field][k]]
                        diffs.append(f"{case}/{job}: {field} differs in {len(keys)} entries, e.g. {keys[:3]}")
                    else:
                        diffs.append(f"{case}/{job}: {field} {got.get(field)} != {want[field]}")
    assert not diffs, f"results differ from the goldens of commit {golden['commit']}:\n" + "\n".join(diffs)


def test_tiny_llama_runs_match_the_goldens_bit_for_bit(tmp_path):
    _compare("tiny", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MSP_TEST_GOLDEN_SMOLLM2") != "1",
                    reason="seven SmolLM2-135M runs (~5 min on 2 cores): set MSP_TEST_GOLDEN_SMOLLM2=1")
def test_smollm2_runs_match_the_goldens_bit_for_bit(tmp_path):
    _compare("smollm2", tmp_path)
