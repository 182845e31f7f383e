"""Characters that show as nothing: what submitted text may not contain, and what comparing team
names ignores.

The set is Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt): the code
points a renderer draws as nothing when it has no glyph for them — soft hyphen, combining grapheme
joiner, the Hangul fillers U+115F, U+1160, U+3164 and U+FFA0, zero-width spaces and joiners, bidi
marks, variation selectors, tag characters and the code points reserved for more of them:

    00AD, 034F, 061C, 115F–1160, 17B4–17B5, 180B–180F, 200B–200F, 202A–202E, 2060–206F, 3164,
    FE00–FE0F, FEFF, FFA0, FFF0–FFF8, 1BCA0–1BCA3, 1D173–1D17A, E0000–E0FFF   (4,174 code points)

Python's `unicodedata` does not have the property; the `regex` module has it (from its own copy
of the Unicode Character Database) and is the one source here. Added to it: BLANKS, characters
that are not default-ignorable but are drawn as an empty space all the same, so that "ZeroOne.AI"
followed by one of them looks exactly like "ZeroOne.AI".

The zero-width joiner (U+200D) is in the set like the rest, although it also joins emoji into one
picture: between letters it is invisible, and letting it through only between emoji would still
leave out the many emoji sequences that also need variation selector 16 (U+FE0F), refused for the
same reason. An emoji of one code point is accepted.
"""

from __future__ import annotations

import unicodedata

import regex

# Not default-ignorable, yet drawn as a blank the width of a character.
BLANKS = {
    "\u2800": "BRAILLE PATTERN BLANK",  # a braille cell without dots
    "\U0001d159": "MUSICAL SYMBOL NULL NOTEHEAD",  # a notehead that is not drawn
}

_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}" + "".join(BLANKS) + "]")


def is_invisible(ch: str) -> bool:
    """Whether a character is default-ignorable or one of BLANKS."""
    return _INVISIBLE.fullmatch(ch) is not None


def first_invisible(text: str) -> str | None:
    """The first default-ignorable or blank character of `text`, None when there is none."""
    found = _INVISIBLE.search(text)
    return found.group() if found else None


def without_invisible(text: str) -> str:
    """`text` with every default-ignorable and blank character removed."""
    return _INVISIBLE.sub("", text)


def describe(ch: str) -> str:
    """A code point as a reason names it: "U+FE0F (VARIATION SELECTOR-16)"."""
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'unassigned')})"
