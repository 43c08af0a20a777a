"""Standard output for results: JSON that every parser reads (the failures of writing it are run through the
installed ``siamese`` in test_reliability.py)."""

from __future__ import annotations

import json
import math
import os

from siamese_omniglot.stdout import json_text


def test_json_text_is_valid_utf8_with_null_for_numbers_json_has_not() -> None:
    name = os.fsdecode(b"caf\xe9-\xe2\x86\x92.png")  # a Latin-1 byte, then a UTF-8 arrow
    text = json_text({"query": name, "roc_auc": math.nan, "scores": (1.0, math.inf, -math.inf), "count": 3})
    assert "NaN" not in text and "Infinity" not in text  # Python's own extensions, which other parsers refuse
    text.encode("utf-8")  # a lone surrogate (the undecodable byte) raised here before: not UTF-8
    assert "→" in text  # only the undecodable byte is escaped
    parsed = json.loads(text)
    assert parsed == {"query": name, "roc_auc": None, "scores": [1.0, None, None], "count": 3}
    assert os.fsencode(parsed["query"]) == b"caf\xe9-\xe2\x86\x92.png"  # the file's own name, back
