"""The three method files share their plumbing byte for byte: the marked region and the generic
Args fields. What differs between them is the method, its flags and the lines of the loop that
call it (so `diff deepfusion.py bam.py` reads as the difference between the two methods)."""

import os

import pytest

from conftest import METHODS, ROOT

BEGIN, END = "shared plumbing: BEGIN", "shared plumbing: END"
GENERIC, METHOD = "    # ---- generic:", "    # ---- method:"


def shared_parts(text):
    """(the generic Args fields, the marked shared region) of a method file's text."""
    def cut(start, end):
        assert text.count(start) == 1 and text.count(end) == 1, (start, end)
        return text[text.index(start):text.index(end)]
    return cut(GENERIC, METHOD), cut(BEGIN, END)


def _read(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


@pytest.mark.parametrize("script", [s for s in METHODS if s != "deepfusion.py"])
def test_shared_region_and_generic_args_are_identical(script):
    args_a, region_a = shared_parts(_read("deepfusion.py"))
    args_b, region_b = shared_parts(_read(script))
    assert args_a == args_b, "generic Args fields differ"
    assert region_a == region_b, "shared plumbing differs"
    assert len(region_a.splitlines()) > 100  # the region really holds the plumbing


def test_a_one_character_drift_is_caught():
    # as resample_matrix once drifted between the files: one changed expression inside the region
    text = _read("deepfusion.py")
    line = next(l for l in text.splitlines() if "step.clamp_min(1)" in l)
    drifted = text.replace(line, line.replace("clamp_min(1)", "clamp_min(1.0)"))
    assert shared_parts(drifted)[1] != shared_parts(text)[1]


@pytest.mark.parametrize("script", METHODS)
def test_method_first_and_short_lines(script):
    lines = _read(script).splitlines()
    assert not [i + 1 for i, l in enumerate(lines) if len(l) > 100], "lines over 100 characters"
    method = next(i for i, l in enumerate(lines) if "the method:" in l and l.startswith("# ==="))
    assert method < 150, method  # the method starts within the first screens
    begin = next(i for i, l in enumerate(lines) if BEGIN in l)
    assert method < begin  # and before the plumbing
