"""
Tests for the local directory: users, aliases, postmaster.
"""

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.local import AliasLoop, LocalDirectory, UnknownRecipient
from tests.support import make_config


class LocalDirectoryTests(SynchronousTestCase):
    def setUp(self):
        self.dir = LocalDirectory(make_config(self.mktemp(), local={
            "postmaster": "alice",
            "users": ["alice", "Bob"],
            "aliases": {"team": ["alice", "bob", "friend@remote.test"], "loop1": "loop2",
                        "loop2": "loop1", "deep": "team"},
        }).local)

    def test_user_case_insensitive(self):
        """A mailbox matches case-insensitively and expands to its configured spelling."""
        self.assertEqual(self.dir.expand("BOB@Example.Test"), ("Bob@example.test",))

    def test_alias_with_remote_member(self):
        """An alias may forward to a remote address; nested aliases expand."""
        self.assertEqual(self.dir.expand("deep@example.org"),
                         ("alice@example.org", "Bob@example.org", "friend@remote.test"))

    def test_postmaster_routed(self):
        """postmaster@ any local domain goes to the configured postmaster."""
        self.assertEqual(self.dir.expand("PostMaster@example.test"), ("alice@example.test",))
        self.assertEqual(self.dir.expand("postmaster"), ("alice@example.test",))

    def test_unknown(self):
        """An unknown local name raises UnknownRecipient."""
        with self.assertRaises(UnknownRecipient):
            self.dir.expand("carol@example.test")

    def test_loop(self):
        """A loop of aliases raises AliasLoop instead of recursing forever."""
        with self.assertRaises(AliasLoop):
            self.dir.expand("loop1@example.test")

    def test_maildir_path(self):
        """The mailbox template is filled with user and domain."""
        self.assertTrue(self.dir.maildir_for("bob@example.org").endswith("/mail/Bob/Maildir"))
