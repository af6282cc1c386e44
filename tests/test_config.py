"""
Tests for configuration parsing: defaults, validation, error messages.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import ConfigError, load_config, parse_config, parse_duration
from tests.support import make_config

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(HERE), "conf")


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def error(self, text: str) -> ConfigError:
        path = self.write(text)
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertTrue(str(cm.exception).startswith(path + ": "), str(cm.exception))
        return cm.exception

    MINIMAL = ('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
               '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n')

    def test_shipped_examples_load(self):
        """Every file in conf/ is a valid configuration."""
        names = [n for n in os.listdir(CONF) if n.endswith(".toml")]
        self.assertIn("example.toml", names)
        for name in names:
            if name == "production.toml":
                continue  # needs certificate files that exist only on a real server
            load_config(os.path.join(CONF, name))

    def test_production_example_only_lacks_certificates(self):
        """The production example is valid except that its certificate files do not exist here."""
        with self.assertRaises(ConfigError) as cm:
            load_config(os.path.join(CONF, "production.toml"))
        self.assertEqual(cm.exception.key, "tls.certificate")
        self.assertIn("file not found", cm.exception.message)

    def test_minimal_defaults(self):
        """A minimal file gets the documented defaults, with paths relative to the file."""
        path = self.write(self.MINIMAL)
        config = load_config(path)
        self.assertEqual(config.spool, os.path.join(os.path.dirname(os.path.abspath(path)), "spool"))
        self.assertEqual(config.limits.message_size, 25 * 1024 * 1024)
        self.assertEqual(config.limits.recipients, 100)
        self.assertEqual(config.inbound.bare_newline, "normalize")
        self.assertEqual(config.queue.lifetime, 5 * 86400)
        self.assertEqual((config.inbound.chunking, config.outbound.chunking,
                          config.outbound.chunk_size), (True, True, 1024 * 1024))

    def test_missing_file(self):
        """A missing file is an error naming the file."""
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/mta.toml")
        self.assertEqual(str(cm.exception), "/nonexistent/mta.toml: no such file")

    def test_bad_toml(self):
        """A syntax error is reported as not valid TOML."""
        self.assertIn("not valid TOML", str(self.error("[server\n")))

    def test_unknown_top_level_key(self):
        """An unknown table is named."""
        e = self.error(self.MINIMAL + "[frobnicate]\nx = 1\n")
        self.assertEqual(e.key, "frobnicate")
        self.assertEqual(e.message, "unknown key")

    def test_unknown_nested_key(self):
        """An unknown key inside a table is named with its dotted path."""
        e = self.error(self.MINIMAL + "[limits]\nmessage_sise = 10\n")
        self.assertEqual(e.key, "limits.message_sise")

    def test_unknown_listener_key(self):
        """An unknown key in a listener names the listener's index."""
        e = self.error(self.MINIMAL.replace('endpoint = "tcp:2525"', 'endpoint = "tcp:2525"\nport = 1'))
        self.assertEqual(e.key, "listeners[0].port")

    def test_wrong_type(self):
        """A value of the wrong type says what was expected."""
        e = self.error(self.MINIMAL + '[limits]\nrecipients = "many"\n')
        self.assertEqual(e.key, "limits.recipients")
        self.assertEqual(e.message, "must be an integer, not 'many'")

    def test_bad_role(self):
        """An unknown listener role lists the valid ones."""
        e = self.error(self.MINIMAL.replace('role = "mx"', 'role = "relay"'))
        self.assertEqual(e.message, "must be one of mx, submission, submissions, not 'relay'")

    def test_milters(self):
        """[milters.NAME] and listeners[].milters: each mistake is one line naming the key."""
        ok = self.MINIMAL + 'milters = ["OpenDKIM"]\n[milters.opendkim]\naddress = "inet:127.0.0.1:8891"\n'
        config = load_config(self.write(ok + '[dns]\nnameservers = ["127.0.0.1:9"]\n'))
        self.assertEqual(config.milter("opendkim").default_action, "tempfail")
        self.assertEqual(config.milter("opendkim").content_timeout, 300)
        table = [
            (self.MINIMAL + 'milters = ["nope"]\n', "listeners[0].milters",
             "names 'nope', but there is no [milters.nope] table"),
            (ok.replace("inet:127.0.0.1:8891", "tcp:1.2.3.4:5"), "milters.opendkim.address",
             "is not a milter address ('tcp:1.2.3.4:5'): unknown kind 'tcp': must be "
             "inet:HOST:PORT or unix:PATH"),
            (ok + 'default_action = "quarantine"\n', "milters.opendkim.default_action",
             "must be one of accept, tempfail, reject, not 'quarantine'"),
            (ok + 'timeout = "5s"\n', "milters.opendkim.timeout", "unknown key"),
            (self.MINIMAL + '[milters."two words"]\naddress = "unix:/x"\n',
             "milters.two words", "a milter's name must be one word of letters, digits, "
             "'_', '.' or '-'"),
        ]
        for text, key, message in table:
            e = self.error(text)
            self.assertEqual((e.key, e.message), (key, message), text)

    def test_bad_endpoint(self):
        """A malformed endpoint string is refused at parse time."""
        e = self.error(self.MINIMAL.replace('"tcp:2525"', '"tcp:notaport"'))
        self.assertEqual(e.key, "listeners[0].endpoint")

    def test_no_listeners(self):
        """At least one listener is required."""
        e = self.error('[server]\nhostname = "mx.example.test"\nspool = "s"\n')
        self.assertEqual(e.key, "listeners")

    def test_missing_hostname(self):
        """server.hostname is required."""
        e = self.error('[server]\nspool = "s"\n[[listeners]]\nrole = "mx"\nendpoint = "tcp:25"\n')
        self.assertEqual((e.key, e.message), ("server.hostname", "is required"))

    def test_bad_hostname(self):
        """A host name with invalid characters is refused."""
        e = self.error(self.MINIMAL.replace("mx.example.test", "mx_1.example"))
        self.assertEqual(e.key, "server.hostname")

    def test_missing_certificate_file(self):
        """A configured certificate that does not exist names the key and the path."""
        e = self.error(self.MINIMAL + '[tls]\ncertificate = "nope.pem"\nkey = "nope.key"\n')
        self.assertEqual(e.key, "tls.certificate")
        self.assertIn("file not found", e.message)

    def test_certificate_without_key(self):
        """certificate and key come together."""
        e = self.error(self.MINIMAL + '[tls]\ncertificate = "x.pem"\n')
        self.assertEqual(e.key, "tls.key")

    def test_submissions_needs_certificate(self):
        """An implicit-TLS listener without a certificate is an error."""
        e = self.error(self.MINIMAL.replace('role = "mx"', 'role = "submissions"'))
        self.assertEqual(e.key, "tls.certificate")

    def test_bad_network(self):
        """A trusted network that is not a network is named."""
        e = self.error(self.MINIMAL + '[relay]\ntrusted_networks = ["10.0.0.0/33"]\n')
        self.assertEqual(e.key, "relay.trusted_networks")

    def test_durations(self):
        """Durations accept seconds or 30s/5m/4h/5d."""
        path = self.write(self.MINIMAL + '[queue]\nretry_schedule = ["30s", "5m", 3600]\n'
                          'lifetime = "5d"\n[limits]\ncommand_timeout = "2m"\n')
        config = load_config(path)
        self.assertEqual(config.queue.retry_schedule, (30, 300, 3600))
        self.assertEqual(config.queue.lifetime, 432000)
        self.assertEqual(config.limits.command_timeout, 120)

    def test_bad_duration(self):
        """A malformed duration is named."""
        e = self.error(self.MINIMAL + '[queue]\nlifetime = "soon"\n')
        self.assertEqual(e.key, "queue.lifetime")

    def test_limit_minimums(self):
        """Limits below what RFC 5321 requires are refused."""
        e = self.error(self.MINIMAL + '[limits]\ncommand_line_length = 100\n')
        self.assertEqual(e.message, "must be at least 512, not 100")

    def test_mailbox_template_needs_user(self):
        """The mailbox template must contain {user}."""
        e = self.error(self.MINIMAL + '[local]\ndomains = ["example.test"]\nusers = ["a", "postmaster"]\n'
                       'mailbox = "mail/Maildir"\n')
        self.assertEqual(e.key, "local.mailbox")

    def test_postmaster_must_exist(self):
        """With local domains, postmaster must name a user or alias."""
        e = self.error(self.MINIMAL + '[local]\ndomains = ["example.test"]\nusers = ["a"]\n')
        self.assertEqual(e.key, "local.postmaster")

    def test_json_logging_needs_file(self):
        """JSON logging needs a file."""
        e = self.error(self.MINIMAL + '[logging]\nformat = "json"\n')
        self.assertEqual(e.key, "logging.file")

    def test_to_dict_round_trips(self):
        """The effective configuration, fed back to the parser, gives the same configuration."""
        config = make_config(self.mktemp())
        again = parse_config(config.to_dict(), config.path)
        self.assertEqual(again, config)


class MessageTests(SynchronousTestCase):
    """
    What the operator reads for each kind of mistake: the dotted key (list
    index, quoted table key) and the reason, one line.  The file is
    structured by cattrs; these hold its errors to the words we chose.
    """

    M = ConfigTests.MINIMAL
    L = '[local]\ndomains = ["example.test"]\nusers = ["a", "postmaster"]\n'
    DURATION = "must be a duration like 30s, 5m, 4h or 5d, not "
    CASES = [
        ('server = 3\n' + M[M.index("[["):], "server", "must be a table"),
        ('[server]\nhostname = "a.b"\n[[listeners]]\nrole="mx"\nendpoint="tcp:25"\n',
         "server.spool", "is required"),
        (M.replace('"mx.example.test"', "5"), "server.hostname", "must be a string, not 5"),
        (M.replace('spool = "spool"', 'spool = "spool"\nbogus = 1'), "server.bogus",
         "unknown key"),
        ("hostname = 1\n" + M, "hostname", "unknown key"),
        ('listeners = []\n' + M[:M.index("[[")], "listeners",
         "must be a non-empty array of tables ([[listeners]])"),
        ('listeners = [3]\n' + M[:M.index("[[")], "listeners[0]", "must be a table"),
        (M.replace('role = "mx"\n', ""), "listeners[0].role", "is required"),
        (M.replace('role = "mx"', "role = 1"), "listeners[0].role", "must be a string, not 1"),
        (M + '[[listeners]]\nrole = "mx"\nendpoint = "bogus:1"\n', "listeners[1].endpoint",
         "is not a valid Twisted endpoint ('bogus:1'): Unknown endpoint type: 'bogus'"),
        ('tls = 1\n' + M, "tls", "must be a table"),
        (M + '[tls]\nkey = "x.pem"\n', "tls.certificate",
         "is required when the other of certificate/key is set"),
        (M + '[tls]\ncertficate = "x"\n', "tls.certficate", "unknown key"),
        (M + '[local]\ndomains = "example.test"\n', "local.domains",
         "must be a list, not 'example.test'"),
        (M + '[local]\ndomains = [1]\n', "local.domains", "must be a list of strings, not [1]"),
        (M + '[local]\ndomains = ["bad domain"]\nusers=["a"]\n', "local.domains",
         "is not a valid domain: 'bad domain'"),
        (M + '[local]\ndomains = ["example.test"]\n', "local.users",
         "is empty: list the local mailboxes of the local domains"),
        (M + '[local]\ndomains = ["example.test"]\nusers = [".a"]\n', "local.users",
         "is not a valid mailbox name: '.a'"),
        (M + L + 'mailbox = "mail/{user}/{x}"\n', "local.mailbox",
         "has a bad placeholder ('x'); use {user} and {domain}"),
        (M + '[local]\ndomains = ["example.test"]\nusers = ["a"]\n', "local.postmaster",
         "names 'postmaster', which is neither a local user nor an alias"),
        (M + L + '[local.aliases]\nx = ["a", 1]\n', "local.aliases.x",
         "must be an address or a non-empty list of addresses"),
        (M + '[relay]\ntrusted_networks = [1]\n', "relay.trusted_networks",
         "must be a list of strings, not [1]"),
        (M + '[limits]\nrecipients = true\n', "limits.recipients",
         "must be an integer, not True"),
        (M + '[limits]\nrecipients = 1.5\n', "limits.recipients", "must be an integer, not 1.5"),
        (M + '[limits]\nreceived_headers = 9\n', "limits.received_headers",
         "must be at least 10, not 9"),
        (M + '[limits]\ncommand_timeout = "2w"\n', "limits.command_timeout", DURATION + "'2w'"),
        (M + '[limits]\ncommand_timeout = 1.5\n', "limits.command_timeout", DURATION + "1.5"),
        (M + '[limits]\ncommand_timeout = "0m"\n', "limits.command_timeout",
         "must be a positive duration, not '0m'"),
        (M + '[inbound]\nbare_newline = "keep"\n', "inbound.bare_newline",
         "must be one of normalize, reject, not 'keep'"),
        (M + '[inbound]\nbanner = "a\\nb"\n', "inbound.banner", "must be one line"),
        (M + '[inbound]\nchunking = "yes"\n', "inbound.chunking",
         "must be true or false, not 'yes'"),
        (M + '[outbound]\nchunking = 1\n', "outbound.chunking", "must be true or false, not 1"),
        (M + '[outbound]\nchunk_size = 1000\n', "outbound.chunk_size",
         "must be between 4096 and 67108864 octets, not 1000"),
        (M + '[outbound]\nchunk_size = "1M"\n', "outbound.chunk_size",
         "must be an integer, not '1M'"),
        (M + '[queue]\nretry_schedule = []\n', "queue.retry_schedule",
         "must list at least one interval"),
        (M + '[queue]\nretry_schedule = ["5m", "x"]\n', "queue.retry_schedule", DURATION + "'x'"),
        (M + '[queue]\njitter = 0.6\n', "queue.jitter", "must be between 0 and 0.5, not 0.6"),
        (M + '[queue]\njitter = "x"\n', "queue.jitter", "must be a number, not 'x'"),
        (M + '[queue]\ndelay_warning = true\n', "queue.delay_warning",
         "must be a duration, or false (or 0) to turn it off"),
        (M + '[auth]\nsender_login_match = 1\n', "auth.sender_login_match",
         "must be true or false, not 1"),
        (M + '[auth]\nusers_file = ""\n', "auth.users_file", "must not be empty"),
        (M + '[logging]\nformat = "xml"\n', "logging.format",
         "must be one of text, json, not 'xml'"),
        (M + '[metrics]\nendpoint = 1\n', "metrics.endpoint", "must be a string, not 1"),
        (M + '[dns]\ntimeout = 0\n', "dns.timeout", "must be a positive duration, not 0"),
        (M + '[outbound]\nport = 70000\n', "outbound.port",
         "must be a TCP port (1-65535), not 70000"),
        (M + '[outbound]\nhelo_name = "a b"\n', "outbound.helo_name",
         "is not a valid host name: 'a b'"),
        (M + '[outbound]\nsmarthost = "r.test"\n', "outbound.smarthost", "must be a table"),
        (M + '[outbound.smarthost]\nport = 25\n', "outbound.smarthost.host", "is required"),
        (M + '[outbound.smarthost]\nhost = "a.b:x"\n', "outbound.smarthost.host",
         "has a port that is not a number: 'x'"),
        (M + '[outbound.smarthost]\nhost = "[a.b]x"\n', "outbound.smarthost.host",
         "must be host, host:port or [host]:port, not 'x'"),
        (M + '[outbound.smarthost]\nhost = "a.b:70000"\n', "outbound.smarthost.host",
         "has a port out of range: 70000"),
        (M + '[outbound.smarthost]\nhost = "a b"\n', "outbound.smarthost.host",
         "is not a host name or IP address: 'a b'"),
        (M + '[outbound.smarthost]\nhost = "r.test"\npassword_file = "p"\n',
         "outbound.smarthost.username", "is required with password_file"),
        (M + '[outbound.routes]\n"x.test" = 1\n', "outbound.routes.x.test", "must be a table"),
        (M + '[outbound.routes."Ex.Test"]\nhost = "r.test"\nx = 1\n',
         "outbound.routes.Ex.Test.x", "unknown key"),
        (M + '[outbound.tls]\npolcy = "strict"\n', "outbound.tls.polcy", "unknown key"),
        (M + '[outbound.tls]\nplugins = "x.y"\n', "outbound.tls.plugins",
         "must be a list, not 'x.y'"),
        (M + '[outbound.tls.domains."bad domain"]\npolicy = "strict"\n',
         "outbound.tls.domains.bad domain", "must be a domain, or .domain for its subdomains"),
        (M + '[outbound.tls.domains."x.test"]\nfallback = "now"\n',
         "outbound.tls.domains.x.test.policy", "is required"),
        (M + '[outbound.tls.domains."x.test"]\npolicy = "strict"\nmin_version = "TLSv1.4"\n',
         "outbound.tls.domains.x.test.min_version",
         "must be one of TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3, not 'TLSv1.4'"),
        (M + '[outbound.tls.mx_hosts."*.x"]\npolicy = "strict"\nbogus = 1\n',
         "outbound.tls.mx_hosts.*.x.bogus", "unknown key"),
        (M + '[outbound.tls.relay]\ntls_policy = "strict"\n', "outbound.tls.relay.host",
         "is required"),
    ]

    def refused(self, text: str) -> ConfigError:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write(text)
        with self.assertRaises(ConfigError, msg=text) as cm:
            load_config(path)
        self.assertEqual(str(cm.exception), f"{path}: {cm.exception.key}: {cm.exception.message}")
        return cm.exception

    def test_messages(self):
        for text, key, message in self.CASES:
            e = self.refused(text)
            self.assertEqual((e.key, e.message), (key, message), text)

    def test_unknown_keys_in_policy_entries(self):
        """A misspelt key in a domain or MX-host entry is refused like any other (it was once ignored)."""
        for table, key in [('domains."x.test"', "domains.x.test"),
                           ('mx_hosts."*.x.test"', "mx_hosts.*.x.test")]:
            e = self.refused(self.M + f'[outbound.tls.{table}]\npolicy = "strict"\n'
                                      'fallbak = "never"\n')
            self.assertEqual((e.key, e.message), (f"outbound.tls.{key}.fallbak", "unknown key"))

    def test_duration_forms(self):
        """One parser for every duration: seconds, or a number with s, m, h or d."""
        for value, seconds in [(30, 30), ("30", 30), ("30s", 30), (" 2 m ", 120), ("4h", 14400),
                               ("5d", 432000)]:
            self.assertEqual(parse_duration(value), seconds)
        for value in ["0s", 0, -5, "5w", "1.5h", 1.5, True, None, [1]]:
            self.assertRaises(ValueError, parse_duration, value)


class OutboundConfigTests(SynchronousTestCase):
    MINIMAL = ConfigTests.MINIMAL

    def load(self, text: str):
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        with open(os.path.join(path, "secret"), "w") as f:
            f.write("hunter2\n")
        path = os.path.join(path, "c.toml")
        with open(path, "w") as f:
            f.write(self.MINIMAL + text)
        return load_config(path)

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            self.load(text)
        return str(cm.exception)

    def test_defaults(self):
        c = self.load("")
        self.assertEqual((c.outbound.port, c.outbound.smarthost, c.dns.nameservers),
                         (25, None, ()))
        self.assertIsNone(c.outbound.smarthost_for("example.com"))

    def test_smarthost_forms(self):
        """host, host:port and [host]:port (and an IPv6 literal) all parse."""
        for value, host, port in [("relay.test", "relay.test", 25),
                                  ("relay.test:587", "relay.test", 587),
                                  ("[relay.test]:465", "relay.test", 465),
                                  ("[2001:db8::1]:2525", "2001:db8::1", 2525)]:
            c = self.load(f'[outbound.smarthost]\nhost = "{value}"\n')
            self.assertEqual((c.outbound.smarthost.host, c.outbound.smarthost.port),
                             (host, port))

    def test_routes_exact_parent_default(self):
        """An exact route wins, then the nearest .parent route, then the default smarthost."""
        c = self.load('[outbound.smarthost]\nhost = "default.test"\n'
                      '[outbound.routes."example.org"]\nhost = "exact.test:2525"\n'
                      '[outbound.routes.".example.org"]\nhost = "sub.test"\ntls = "implicit"\n'
                      'port = 465\n')
        o = c.outbound
        self.assertEqual(o.smarthost_for("EXAMPLE.org").host, "exact.test")
        self.assertEqual(o.smarthost_for("a.b.example.org").destination, "[sub.test]:465")
        self.assertEqual(o.smarthost_for("elsewhere.test").host, "default.test")

    def test_credentials_need_both(self):
        self.assertIn("outbound.smarthost.password_file: is required with username",
                      self.error('[outbound.smarthost]\nhost = "r.test"\nusername = "u"\n'))
        c = self.load('[outbound.smarthost]\nhost = "r.test"\nusername = "u"\n'
                      'password_file = "secret"\n')
        self.assertTrue(c.outbound.smarthost.password_file.endswith("/secret"))

    def test_bad_values(self):
        self.assertIn("outbound.smarthost.tls: must be one of starttls, implicit",
                      self.error('[outbound.smarthost]\nhost = "r.test"\ntls = "yes"\n'))
        self.assertIn("outbound.port: must be a TCP port",
                      self.error('[outbound]\nport = 0\n'))
        self.assertIn("dns.nameservers: must list IP addresses",
                      self.error('[dns]\nnameservers = ["ns.example"]\n'))
        self.assertIn("outbound.routes.bad domain!: must be a domain",
                      self.error('[outbound.routes."bad domain!"]\nhost = "r.test"\n'))
        self.assertIn("unknown key", self.error('[outbound]\nsmarthosts = 1\n'))
        self.assertIn("sendmail.domain: is not a valid host name",
                      self.error('[sendmail]\ndomain = "bad domain"\n'))
        self.assertIn("sendmail.maildrop: unknown key", self.error('[sendmail]\nmaildrop = 1\n'))

    def test_dns_nameservers(self):
        c = self.load('[dns]\nnameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]\n'
                      'timeout = "5s"\n')
        self.assertEqual((c.dns.nameservers[0], c.dns.timeout), ("127.0.0.1:5353", 5))


class TLSNameTests(SynchronousTestCase):
    """
    Policy and decider names are looked up where the service is built
    (tap.prepare_tls, for twistd mta, config check and config show), not
    while the file is read: loading the configuration imports no TLS or
    outbound code.  The error is still one line naming the file and key.
    """

    def path(self, text: str) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write(ConfigTests.MINIMAL + text)
        return path

    def refused(self, text: str) -> str:
        from twisted_mta import tap
        path = self.path(text)
        config = load_config(path)  # the file itself is fine
        with self.assertRaises(tap.PrepareError) as cm:
            tap.prepare_tls(config)
        message = str(cm.exception)
        prefix = path + ": "
        self.assertTrue(message.startswith(prefix), message)
        return message[len(prefix):]

    def test_unknown_names_by_key(self):
        policy = "unknown TLS policy 'strcit' (known: none, opportunistic, relaxed, strict)"
        decider = ("unknown fallback decider 'sometime' (known: never, next-attempt, now, "
                   "relaxed-now, via-relay, after:<N>m, after:<N>-failures)")
        for text, key, reason in [
            ('[outbound.tls]\npolicy = "strcit"\n', "outbound.tls.policy", policy),
            ('[outbound.tls]\nfallback = "sometime"\n', "outbound.tls.fallback", decider),
            ('[outbound.tls]\nshadow = "strcit"\n', "outbound.tls.shadow", policy),
            ('[outbound.tls.domains."X.test"]\npolicy = "strcit"\n',
             "outbound.tls.domains.x.test.policy", policy),
            ('[outbound.tls.domains.".x.test"]\npolicy = "strict"\nfallback = "sometime"\n',
             "outbound.tls.domains..x.test.fallback", decider),
            ('[outbound.tls.domains."x.test"]\npolicy = "strict"\nshadow = "strcit"\n',
             "outbound.tls.domains.x.test.shadow", policy),
            ('[outbound.tls.mx_hosts."*.Example.NET"]\npolicy = "strcit"\n',
             "outbound.tls.mx_hosts.*.example.net.policy", policy),
            ('[outbound.tls.relay]\nhost = "r.test"\ntls_policy = "strcit"\n',
             "outbound.tls.relay.tls_policy", policy),
            ('[outbound.tls.relay]\nhost = "r.test"\ntls_policy = "strict"\n'
             'tls_fallback = "sometime"\n', "outbound.tls.relay.tls_fallback", decider),
            ('[outbound.smarthost]\nhost = "r.test"\ntls_policy = "strcit"\n',
             "outbound.smarthost.tls_policy", policy),
            ('[outbound.smarthost]\nhost = "r.test"\ntls_fallback = "sometime"\n',
             "outbound.smarthost.tls_fallback", decider),
            ('[outbound.routes."Ex.Test"]\nhost = "r.test"\ntls_policy = "strcit"\n',
             "outbound.routes.ex.test.tls_policy", policy),
            ('[outbound.tls]\nplugins = ["os.sep"]\n', "outbound.tls.plugins",
             "os.sep provides neither ITLSPolicy nor IFallbackDecider"),
            ('[outbound.tls]\npolicy = "no_such_mta_module.Policy"\n', "outbound.tls.policy",
             "cannot load no_such_mta_module.Policy: No module named 'no_such_mta_module'"),
        ]:
            self.assertEqual(self.refused(text), f"{key}: {reason}", text)

    def test_known_names(self):
        """Built-in policies and deciders, after: forms and dotted paths are found."""
        from twisted_mta import tap
        engine, entries = tap.prepare_tls(load_config(self.path(
            '[outbound.tls]\npolicy = "strict"\nfallback = "after:4h"\n'
            '[outbound.smarthost]\nhost = "r.test"\ntls_policy = "relaxed"\n'
            'tls_fallback = "after:3-failures"\n')))
        self.assertEqual([e.decider for e in entries], ["after:4h", "after:3-failures"])

    def test_twistd_one_line(self):
        """twistd mta stops at option parsing with the same single line."""
        import io
        from contextlib import redirect_stderr

        from twisted_mta import tap
        path = self.path('[outbound.tls.domains."x.test"]\npolicy = "strcit"\n')
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            tap.Options().parseOptions(["--config", path])
        self.assertEqual(cm.exception.code, 1)
        self.assertEqual(err.getvalue(), f"twistd: {path}: outbound.tls.domains.x.test.policy: "
                                         "unknown TLS policy 'strcit' (known: none, "
                                         "opportunistic, relaxed, strict)\n")

    def test_loading_imports_no_tls_or_outbound_code(self):
        """Reading a file that names policies, deciders and plugins imports nothing from twisted_mta.tls or twisted_mta.outbound."""
        import subprocess
        import sys
        path = self.path('[outbound.tls]\npolicy = "no.such.Policy"\nfallback = "now"\n'
                         'plugins = ["no.such.Plugin"]\n'
                         '[outbound.smarthost]\nhost = "r.test"\ntls_policy = "strict"\n')
        code = ("import sys\nfrom twisted_mta.config import load_config\n"
                f"load_config({path!r})\n"
                "print(sorted(m for m in sys.modules if m.startswith(('twisted_mta.tls', "
                "'twisted_mta.outbound'))))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(HERE), timeout=60)
        self.assertEqual((out.returncode, out.stdout, out.stderr), (0, "[]\n", ""))


class ShowRoundTripTests(SynchronousTestCase):
    def test_turned_off_keys_are_shown_as_false(self):
        """queue.delay_warning turned off is shown as false, not left out (which would read back as the 4h default)."""
        config = make_config(self.mktemp(), queue={"delay_warning": False})
        self.assertIsNone(config.queue.delay_warning)
        self.assertIs(config.to_dict()["queue"]["delay_warning"], False)
        self.assertEqual(make_config(self.mktemp()).to_dict()["queue"]["delay_warning"], 4 * 3600)


class LocalDeliveryConfigTests(SynchronousTestCase):
    """
    [local] delivery, [local.lmtp] and [local.routes."domain"]: Maildir by
    default, LMTP per domain or everywhere, one clear line when wrong.
    """

    HEAD = ('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
            '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
            '[dns]\nnameservers = ["127.0.0.1:9"]\n'
            '[local]\ndomains = ["example.test", "example.org"]\n'
            'users = ["alice", "postmaster"]\n')

    def load(self, text: str):
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(self.HEAD + text)
        return load_config(path)

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            self.load(text)
        return f"{cm.exception.key}: {cm.exception.message}"

    def test_maildir_is_the_default(self):
        local = self.load("").local
        self.assertEqual(local.delivery, "maildir")
        self.assertEqual(local.delivery_for("example.org").kind, "maildir")
        self.assertIsNone(local.lmtp.address)
        self.assertEqual((local.lmtp.recipient, local.lmtp.connect_timeout,
                          local.lmtp.command_timeout, local.lmtp.data_timeout),
                         ("{user}@{domain}", 30, 300, 600))

    def test_route_per_domain(self):
        """A route sends one domain to LMTP; a relative unix: path is resolved against the file's directory; the route may name its own server and recipient form."""
        config = self.load('[local.lmtp]\naddress = "unix:run/lmtp"\n'
                           '[local.routes."Example.Org"]\ndelivery = "lmtp"\n'
                           'recipient = "{user}"\n')
        base = os.path.dirname(os.path.abspath(config.path))
        org = config.local.delivery_for("example.org")
        self.assertEqual((org.kind, org.address, org.recipient),
                         ("lmtp", "unix:" + os.path.join(base, "run", "lmtp"), "{user}"))
        self.assertEqual(config.local.delivery_for("example.test").kind, "maildir")
        other = self.load('delivery = "lmtp"\n[local.lmtp]\naddress = "tcp:[::1]:24"\n'
                          '[local.routes."example.test"]\ndelivery = "maildir"\n'
                          '[local.routes."example.org"]\n'
                          'address = "tcp:LOCALHOST:2424"\ndelivery = "lmtp"\n')
        self.assertEqual(other.local.delivery_for("example.test").kind, "maildir")
        self.assertEqual(other.local.delivery_for("example.org").address, "tcp:localhost:2424")

    def test_round_trip(self):
        config = self.load('[local.lmtp]\naddress = "tcp:127.0.0.1:24"\n'
                           '[local.routes."example.org"]\ndelivery = "lmtp"\n')
        again = parse_config(config.to_dict(), config.path)
        self.assertEqual(again.local, config.local)
        self.assertEqual(config.to_dict()["local"]["routes"],
                         {"example.org": {"delivery": "lmtp"}})

    def test_errors(self):
        """Each mistake is one line naming the key."""
        cases = [
            ('[local.lmtp]\naddress = "lmtp.sock"\n', "local.lmtp.address: is not an LMTP "
             "server address (must be \"unix:/path/to/socket\" or \"tcp:host:port\"): "
             "'lmtp.sock'"),
            ('[local.lmtp]\naddress = "tcp:127.0.0.1:0"\n', "port 0 is out of range"),
            ('[local.lmtp]\naddress = "tcp:[1.2.3.4]:24"\n', "is not an IPv6 address"),
            ('[local.lmtp]\nrecipient = "{domain}"\n', "local.lmtp.recipient: must contain "
             "{user}"),
            ('[local.lmtp]\nrecipient = "{user}@{host}"\n', "has a bad placeholder"),
            ('[local.routes."example.org"]\ndelivery = "lmtp"\n', "local.lmtp.address: is "
             "required: local.routes.example.org has delivery = \"lmtp\""),
            ('[local.routes."example.net"]\ndelivery = "maildir"\n',
             "local.routes.example.net: is not one of local.domains"),
            ('[local.routes."example.org"]\ndelivery = "mbox"\n', "must be one of maildir, "
             "lmtp, not 'mbox'"),
            ('[local.routes."example.org"]\n', "local.routes.example.org.delivery: is required"),
            ('[local.lmtp]\nadress = "unix:/x"\n', "local.lmtp.adress: unknown key"),
        ]
        for text, expected in cases:
            self.assertIn(expected, self.error(text), text)
        whole = self.HEAD.replace("users", 'delivery = "lmtp"\nusers')
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(whole)
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.key, "local.lmtp.address")
        self.assertIn('is required when local.delivery is "lmtp"', cm.exception.message)
