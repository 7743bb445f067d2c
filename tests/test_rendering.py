from rlvr.decoding import TokenSpan
from rlvr.rendering import colour_for, marked_text, segments


def test_segments_merge_runs_of_one_multiplicity_and_skip_empty_pieces():
    text = "ab cd ef"
    spans = [TokenSpan(0, 2, 0), TokenSpan(2, 5, 1), TokenSpan(5, 5, 1), TokenSpan(5, 8, 1)]
    assert [(s.text, s.multiplicity) for s in segments(text, spans)] == [("ab", 0), (" cd ef", 1)]


def test_marked_text_wraps_reasoning_runs_with_their_multiplicity():
    text = "x = 1 + 2"
    spans = [TokenSpan(0, 1, 0), TokenSpan(1, 3, 1), TokenSpan(3, 5, 2), TokenSpan(5, 9, 0)]
    assert marked_text(text, spans) == "x⟦ =⟧⟦ 1⟧² + 2"
    assert marked_text(text, [TokenSpan(0, 9, 0)]) == text


def test_colours_distinguish_multiplicities_and_leave_standard_tokens_plain():
    assert colour_for(0) is None
    assert len({colour_for(m) for m in range(1, 9)}) == 8 and colour_for(9) == colour_for(1)
