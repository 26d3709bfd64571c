"""The bad-input tables (tests/reliability/test_bad_input_*.py) are big enough, their row ids are unique, and
the README's "Troubleshooting" section lists every row's message."""
from __future__ import annotations

import re

from bad_input import ROOT
from test_bad_input_cli import ROWS as CLI_ROWS
from test_bad_input_data import ROWS as DATA_ROWS
from test_bad_input_runs import ROWS as RUN_ROWS
from test_bad_input_weights import ROWS as WEIGHT_ROWS

ROWS = [*WEIGHT_ROWS, *DATA_ROWS, *CLI_ROWS, *RUN_ROWS]


def test_table_has_enough_rows_and_the_readme_lists_them():
    assert len({r.id for r in ROWS}) == len(ROWS) >= 25
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Troubleshooting" in text
    section = text[text.index("## Troubleshooting"):]
    for r in ROWS:                                   # each row's message, minus a FILE:LINE prefix
        assert re.sub(r"^\S+:\d+: ", "", r.expect) in section, r.id

