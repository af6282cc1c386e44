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


class UTF8UserTests(SynchronousTestCase):
    """UTF-8 local parts (RFC 6531) for local users, and their Maildir paths."""

    def setUp(self):
        self.base = self.mktemp()
        self.dir = LocalDirectory(make_config(self.base, local={
            "domains": ["example.test", "xn--fsqu00a.test"],
            "users": ["alice", "postmaster", "Jörg", "用户"],
            "mailbox": "mail/{domain}/{user}/Maildir",
            "aliases": {"grüße": "jörg"},
        }).local)

    def test_expand(self):
        """UTF-8 names match case-insensitively and in NFD; a U-label domain is local."""
        for given, final in (("jörg@example.test", "Jörg@example.test"),
                             ("JÖRG@example.test", "Jörg@example.test"),
                             ("jo\u0308rg@example.test", "Jörg@example.test"),
                             ("用户@例子.test", "用户@例子.test"),
                             ("用户@xn--fsqu00a.test", "用户@xn--fsqu00a.test"),
                             ("GRÜSSE@example.test", None),
                             ("grüße@example.test", "Jörg@example.test")):
            if final is None:
                with self.assertRaises(UnknownRecipient):
                    self.dir.expand(given)
            else:
                self.assertEqual(self.dir.expand(given), (final,), given)

    def test_maildir_paths(self):
        """
        The Maildir path is the user's configured name (UTF-8) under the
        domain's A-label: one directory level each, the same for both
        spellings of the domain.
        """
        path = self.dir.maildir_for("用户@例子.test")
        self.assertTrue(path.endswith("/mail/xn--fsqu00a.test/用户/Maildir"), path)
        self.assertEqual(self.dir.maildir_for("用户@xn--fsqu00a.test"), path)

    def test_names_refused_in_config(self):
        """A user name with "/", a leading ".", a control or over 64 octets is a config error."""
        from twisted_mta.config import ConfigError
        for bad in ("a/b", ".hidden", "a\u0085b", "ä" * 33, "a b"):
            with self.assertRaises(ConfigError, msg=bad):
                make_config(self.mktemp(), local={"users": ["postmaster", bad]})
