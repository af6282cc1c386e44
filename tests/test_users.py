"""
Tests for the users file and password hashing.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.users import (
    UserDatabase, UsersFileError, hash_password, read_users_file, verify_password, write_user,
)
from tests.test_cli import run_cli


class PasswordTests(SynchronousTestCase):
    def test_hash_verifies(self):
        """A hash verifies its password and no other; the salt makes two hashes differ."""
        h = hash_password("correct horse", log_n=4)
        self.assertTrue(verify_password("correct horse", h))
        self.assertFalse(verify_password("correct hors", h))
        self.assertNotEqual(h, hash_password("correct horse", log_n=4))
        self.assertTrue(h.startswith("$scrypt$ln=4,r=8,p=1$"))

    def test_garbage_hash_never_verifies(self):
        """Something that is not our hash format never verifies."""
        self.assertFalse(verify_password("x", "x"))
        self.assertFalse(verify_password("", "$plain$"))


class UsersFileTests(SynchronousTestCase):
    def test_write_read_delete(self):
        """Users are added, replaced and removed; the file is mode 0600 and never holds the password."""
        path = self.mktemp()
        write_user(path, "Alice", "pw1")
        write_user(path, "bob", "pw2")
        write_user(path, "alice", "pw3")
        self.assertEqual(sorted(read_users_file(path)), ["alice", "bob"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            text = f.read()
        self.assertNotIn("pw3", text)
        db = UserDatabase.load(path)
        self.assertEqual(db.check("ALICE", "pw3"), "alice")
        self.assertIsNone(db.check("alice", "pw1"))
        self.assertIsNone(db.check("carol", "pw1"))
        write_user(path, "bob", None)
        self.assertEqual(sorted(read_users_file(path)), ["alice"])

    def test_plain_text_refused(self):
        """A line with a plain-text password is an error naming the file, line and user."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# comment\n\nalice:hunter2\n")
        with self.assertRaises(UsersFileError) as cm:
            read_users_file(path)
        self.assertIn(f"{path}:3: the password of 'alice' is not an scrypt hash", str(cm.exception))

    def test_cli(self):
        """twisted-mta user add/list/delete work on a file."""
        import io
        import sys
        path = self.mktemp()
        self.patch(sys, "stdin", io.StringIO("s3cret\n"))
        self.assertEqual(run_cli("user", "add", path, "dave", "--password-stdin")[0], 0)
        self.assertEqual(run_cli("user", "list", path)[1], "dave\n")
        self.assertEqual(UserDatabase.load(path).check("dave", "s3cret"), "dave")
        self.assertEqual(run_cli("user", "delete", path, "dave")[0], 0)
        code, out, err = run_cli("user", "delete", path, "dave")
        self.assertEqual((code, err), (1, f"twisted-mta: {path}: no user 'dave'\n"))


class UTF8UserTests(SynchronousTestCase):
    """UTF-8 user names (RFC 6531 local parts) in the users file."""

    def test_utf8_names(self):
        """A UTF-8 name is stored lower-cased in NFC, found in any case and form, removed likewise."""
        path = self.mktemp()
        write_user(path, "Jörg", "pw")
        write_user(path, "用户@例子.test", "pw2")
        self.assertEqual(sorted(read_users_file(path)), ["jörg", "用户@例子.test"])
        db = UserDatabase.load(path)
        self.assertEqual(db.check("JÖRG", "pw"), "jörg")
        self.assertEqual(db.check("jo\u0308rg", "pw"), "jörg")  # decomposed
        self.assertEqual(db.check("用户@例子.test", "pw2"), "用户@例子.test")
        write_user(path, "JO\u0308RG", None)
        self.assertEqual(sorted(read_users_file(path)), ["用户@例子.test"])

    def test_bad_names(self):
        """Spaces, ':' and control characters stay refused."""
        for bad in ("jö rg", "jö:rg", "a\u0085b", ""):
            with self.assertRaises(UsersFileError, msg=bad):
                write_user(self.mktemp(), bad, "pw")
