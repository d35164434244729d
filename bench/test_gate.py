"""The gate itself: a fallen ratio fails, a faster or equal one passes (no timing: runs in CI's smoke set)."""
import json

import pytest

import compare


@pytest.mark.smoke
def test_a_fallen_ratio_fails_and_a_steady_one_passes(tmp_path):
    def saved(name, share):
        path = tmp_path / name
        path.write_text(json.dumps({"benchmarks": [{"name": "test_fastcore[x]", "extra_info": {
            "examples_per_sec": 1000 * share, "ceiling_share": share}}]}))
        return str(path)

    base = saved("base.json", 0.80)
    assert compare.main([base, saved("same.json", 0.75)]) == 0
    assert compare.main([base, saved("slow.json", 0.40)]) == 1
