"""File names made from untrusted values (activecall/filenames.py): ordinary ids unchanged,
everything else bounded, confined to one directory and collision-free."""

from __future__ import annotations

import os

from twisted.trial import unittest

from activecall.filenames import MAX_PLAIN, PREFIX_CHARS, safe_file_part

#: the shape of RFC 4475 §3.1.1.11's Call-ID: a long word, "@", a long host
LONG_CALL_ID = "longreq.one" + "really" * 60 + "long" + "@" + "very" * 80 + "long.example.com"

HOSTILE = [
    LONG_CALL_ID,
    "a/b@c",
    "../../etc/passwd",
    "..",
    ".",
    ".hidden",
    "",
    "x" * 10_000,
    "caf\u00e9-\u4e2d\u6587-\U0001f600@h\u00f6st",  # unicode (a UTF-8 Call-ID)
    "\u00ff\u00fe\u0080weird\u0001\u007f\t;bytes",  # latin-1 fallback of non-UTF-8 bytes, controls
    "lone\udc80surrogate",  # a JSON \udc80 escape from an API client
    "a\\b:c*d?e\"f<g>h|i",
    "~tilde~",
]


class SafeFilePartTests(unittest.TestCase):
    def test_ordinary_ids_are_unchanged(self):
        for value in ["abc-123", "s.4f1c2a", "3c26700b3e1a@192.0.2.4", "a+b=c_d", "x" * MAX_PLAIN,
                      "0123456789abcdef0123456789abcdef"]:
            self.assertEqual(safe_file_part(value), value)

    def test_hostile_values_are_bounded_and_stay_in_one_directory(self):
        root = os.path.realpath(self.mktemp())
        os.makedirs(root)
        for value in HOSTILE:
            name = safe_file_part(value)
            self.assertLessEqual(len(name.encode("utf-8")), PREFIX_CHARS + 1 + 16, value)
            self.assertNotIn("/", name)
            self.assertNotIn("\\", name)
            self.assertNotIn("\0", name)
            self.assertFalse(name.startswith("."), name)
            self.assertTrue(name.isascii() and name.isprintable(), name)
            path = os.path.join(root, name + ".events.jsonl")
            self.assertEqual(os.path.dirname(os.path.realpath(path)), root)
            with open(path, "w") as f:  # the file system takes it
                f.write("x")

    def test_distinct_values_never_share_a_name(self):
        values = HOSTILE + ["a_b@c", "a/b@c", "a?b@c", "x" * MAX_PLAIN + "y", "x" * MAX_PLAIN + "z",
                            LONG_CALL_ID + "2"]
        names = [safe_file_part(v) for v in values]
        self.assertEqual(len(set(names)), len(set(values)))

    def test_a_changed_name_is_readable_and_marked(self):
        name = safe_file_part("a/b@c")
        self.assertTrue(name.startswith("a_b@c~"), name)
        self.assertTrue(safe_file_part(LONG_CALL_ID).startswith("longreq.one"))
        # "~" is never in an ordinary name, so a hashed name cannot be some other id's plain name
        self.assertTrue(all("~" in safe_file_part(v) for v in HOSTILE))
