"""
Tests for configuration parsing: defaults, validation, error messages.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import ConfigError, load_config, parse_config
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
