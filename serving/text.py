"""Text normalisation shared by training and serving: the translator sees text as it was trained on."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")
# U+00A0 and U+202F (narrow no-break space, French typography before ? ! : ;) are spaces here.
_NBSP = str.maketrans({"\u00a0": " ", "\u202f": " ", "\u2007": " ", "\u2060": ""})


def normalize(text: str, lowercase: bool = False) -> str:
    """NFC, no-break spaces to spaces, whitespace runs collapsed to one space, ends stripped."""
    text = unicodedata.normalize("NFC", text).translate(_NBSP)
    text = _SPACES.sub(" ", text).strip()
    return text.lower() if lowercase else text
