"""deployer.columns.align: the one column aligner behind every CLI table."""

from __future__ import annotations

import pytest

from deployer.columns import align

pytestmark = pytest.mark.unit


def test_left_aligned_two_spaces_apart():
    rows = [["HOST", "ONLINE", "DETAIL"], ["web-01", "yes", "online"], ["db", "no", "offline"]]
    assert align(rows) == [
        "HOST    ONLINE  DETAIL",
        "web-01  yes     online",
        "db      no      offline",
    ]


def test_right_from_right_aligns_those_columns_but_the_last():
    rows = [
        ["HOST", "RESULT", "API CALLS", "ERROR"],
        ["a", "ok", "3", ""],
        ["bb", "failed", "12", "x"],
    ]
    assert align(rows, right_from=2) == [
        "HOST  RESULT  API CALLS  ERROR",
        "a     ok              3",
        "bb    failed         12  x",
    ]


def test_last_column_sets_no_width_and_trailing_spaces_go():
    rows = [["A", "a long free text column"], ["B", ""], ["C", "x"]]
    assert align(rows) == ["A  a long free text column", "B", "C  x"]


def test_a_one_column_table_is_the_cells_stripped():
    assert align([["HOST"], ["a  "]]) == ["HOST", "a"]


def test_no_rows_no_lines():
    assert align([]) == []


def test_a_ragged_row_is_refused():
    with pytest.raises(ValueError, match="a row of 2 cells in a table of 3 columns"):
        align([["A", "B", "C"], ["a", "b"]])
