"""A partial rerun of the validity benchmark keeps what it did not rerun, hand-written notes too."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_validity import merge_sections, provenance  # noqa: E402

INTRO = "One section per check. Cells: mean.\n\n"
OLD = (
    "# Validity\n\n- date: x\n\n" + INTRO + "V3 ran on machine A, beside other jobs.\n\n"
    "## V1 closed forms\n\nold V1\n\n## V3 planted latent\n\nold V3\n"
)


def test_a_partial_rerun_keeps_other_sections_and_the_provenance_paragraph():
    merged = merge_sections(OLD, {"V3": "## V3 planted latent\n\nnew V3\n"})
    assert list(merged) == ["V1", "V3"]
    assert "old V1" in merged["V1"] and "new V3" in merged["V3"]
    assert provenance(OLD, INTRO) == "V3 ran on machine A, beside other jobs.\n\n"


def test_no_provenance_paragraph_gives_nothing():
    assert provenance(OLD.replace("V3 ran on machine A, beside other jobs.\n\n", ""), INTRO) == ""
    assert provenance("", INTRO) == ""
