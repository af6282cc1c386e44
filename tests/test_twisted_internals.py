"""
The private (or undocumented) parts of Twisted that our subclasses rely on.

OutboundClient (twisted_mta/outbound/client.py) steers ESMTPClient's reply
state machine through its private attributes; InboundESMTP
(twisted_mta/inbound/server.py) owns the input loop of ESMTP and skips the
stock one; tap.py makes listen failures raise at start-up.  Each test here
checks one such thing on a real Twisted object, made the way our code makes
it, so that a Twisted upgrade that removes or changes it fails here, by
name, instead of breaking delivery quietly.  The table in
docs/architecture.md ("Twisted internals we rely on") lists them.
"""

from __future__ import annotations

import inspect

import twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, error
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.protocols import basic, policies
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from twisted_mta.inbound.server import InboundESMTP
from twisted_mta.outbound.client import OutboundClient
from tests.support import ServerHarness

SEE = "see docs/architecture.md, 'Twisted internals we rely on'"
CLIENT = "twisted_mta/outbound/client.py"
SERVER = "twisted_mta/inbound/server.py"


def gone(what: str, user: str, how: str) -> str:
    return f"Twisted {twisted.__version__} no longer has {what}, which {user} {how}; {SEE}"


def changed(what: str, user: str, how: str) -> str:
    return (f"Twisted {twisted.__version__} changed {what}, which {user} {how}; "
            f"review that code before allowing this Twisted; {SEE}")


class _Client(smtp.ESMTPClient):
    """
    A stock ESMTPClient that records the hooks OutboundClient overrides
    instead of sending mail.
    """

    debug = False

    def __init__(self) -> None:
        smtp.ESMTPClient.__init__(self, None, None, b"client.example")
        self.calls: list[str] = []

    def smtpState_from(self, code, resp):
        self.calls.append("smtpState_from")

    def esmtpState_serverConfig(self, code, resp):
        self.calls.append("esmtpState_serverConfig")
        return smtp.ESMTPClient.esmtpState_serverConfig(self, code, resp)


def connected_client(tls: bool = False) -> tuple[_Client, StringTransport]:
    c = _Client()
    transport = StringTransport()
    if tls:
        directlyProvides(transport, ISSLTransport)
    c.makeConnection(transport)
    return c, transport


class ReplyDispatchTests(SynchronousTestCase):
    """
    SMTPClient.lineReceived hands each complete reply to C{_okresponse} when
    its code is in C{_expected}, else to C{_failresponse}.  OutboundClient
    sets all three to take over once the session is set up (smtpState_from),
    to send QUIT (quit), and to catch a refused greeting or HELO.
    """

    def setUp(self):
        self.client, self.transport = connected_client()
        self.ok: list = []
        self.failed: list = []

    def feed(self, expected, line: bytes) -> None:
        c = self.client
        c._expected = expected
        c._okresponse = lambda code, resp: self.ok.append((code, resp))
        c._failresponse = lambda code, resp: self.failed.append((code, resp))
        c.dataReceived(line)

    def test_expected(self):
        """_expected: set by connectionMade, and decides which handler a reply goes to."""
        self.assertIn("_expected", vars(self.client), gone(
            "SMTPClient._expected (connectionMade no longer sets it)", CLIENT,
            "sets to take every reply after the set-up"))
        self.assertEqual(list(self.client._expected), [220], changed(
            "what SMTPClient.connectionMade expects first (_expected)", CLIENT,
            "replaces after the set-up"))
        self.feed([250], b"550 5.0.0 no\r\n")
        self.assertEqual((self.ok, self.failed), ([], [(550, b"5.0.0 no")]), gone(
            "SMTPClient._expected as the set of codes for _okresponse", CLIENT,
            "sets to range(0, 1000) so that every reply reaches its own handler"))

    def test_okresponse(self):
        """_okresponse: called with (code, text) for a reply whose code is expected."""
        self.assertIn("_okresponse", vars(self.client), gone(
            "SMTPClient._okresponse (connectionMade no longer sets it)", CLIENT,
            "sets to its own reply handler"))
        self.feed(range(0, 1000), b"250-first\r\n250 second\r\n")
        self.assertEqual((self.ok, self.failed), ([(250, b"first\nsecond")], []), gone(
            "SMTPClient._okresponse as the handler of expected replies", CLIENT,
            "sets to its own reply handler (smtpState_from, quit)"))

    def test_failresponse(self):
        """_failresponse: called with (code, text) for a reply whose code is not expected."""
        self.assertIn("_failresponse", vars(self.client), gone(
            "SMTPClient._failresponse (connectionMade no longer sets it)", CLIENT,
            "sets in connectionMade and smtpState_helo"))
        self.feed([220], b"421 4.3.2 go away\r\n")
        self.assertEqual((self.ok, self.failed), ([], [(421, b"4.3.2 go away")]), gone(
            "SMTPClient._failresponse as the handler of unexpected replies", CLIENT,
            "sets to catch a refused greeting or HELO"))

    def test_connectionMade_sets_failresponse_first(self):
        """OutboundClient.connectionMade calls Twisted's, then replaces _failresponse."""
        self.assertEqual(self.client._failresponse, self.client.smtpConnectionFailed, changed(
            "SMTPClient.connectionMade's greeting failure handler (_failresponse)", CLIENT,
            "replaces after calling it"))

    def test_helo_sets_okresponse_only(self):
        """smtpState_helo sends HELO and expects success; OutboundClient sets _failresponse after it."""
        c = self.client
        c.smtpState_helo(500, b"what?")
        self.assertEqual(self.transport.value(), b"HELO client.example\r\n")
        self.assertEqual(c._okresponse, c.smtpState_from, changed(
            "SMTPClient.smtpState_helo (_okresponse after HELO)", CLIENT,
            "calls for the HELO fallback"))


class TLSModeTests(SynchronousTestCase):
    """
    ESMTPClient._tlsMode: whether the connection is already encrypted.
    OutboundClient reads it in connectionMade (implicit TLS) and sets it
    after its own STARTTLS, so that Twisted's next EHLO and tryTLS treat the
    session as encrypted.
    """

    def test_set_from_transport(self):
        """connectionMade sets _tlsMode from ISSLTransport (implicit TLS)."""
        plain, _ = connected_client(tls=False)
        tls, _ = connected_client(tls=True)
        self.assertIn("_tlsMode", vars(plain), gone(
            "ESMTPClient._tlsMode (connectionMade no longer sets it)", CLIENT,
            "reads in connectionMade to detect implicit TLS"))
        self.assertEqual((plain._tlsMode, tls._tlsMode), (False, True), changed(
            "ESMTPClient._tlsMode (no longer set from ISSLTransport)", CLIENT,
            "reads in connectionMade to detect implicit TLS"))

    def test_tryTLS_reads_it(self):
        """With _tlsMode set, tryTLS authenticates instead of sending STARTTLS again."""
        for mode, sent in ((False, b"STARTTLS\r\n"), (True, b"")):
            c, transport = connected_client()
            c.context = object()
            c._tlsMode = mode
            transport.clear()
            c.tryTLS(250, b"", {b"STARTTLS": None})
            self.assertEqual(transport.value(), sent, gone(
                "ESMTPClient._tlsMode as read by tryTLS", CLIENT,
                "sets after its own STARTTLS so that the second EHLO does not start TLS again"))
            self.assertEqual(c.calls, [] if not mode else ["smtpState_from"])

    def test_ehlo_reads_it(self):
        """esmtpState_ehlo lets a TLS-required session fall back to HELO only under TLS."""
        for mode, fallback in ((False, "esmtpEHLORequired"), (True, "smtpState_helo")):
            c, _ = connected_client()
            c.requireTransportSecurity = True
            c._tlsMode = mode
            c.esmtpState_ehlo(220, b"")
            self.assertEqual(c._failresponse.__name__, fallback, gone(
                "ESMTPClient._tlsMode as read by esmtpState_ehlo", CLIENT,
                "sets after its own STARTTLS"))

    def test_starttls_sets_it(self):
        """Twisted's own esmtpState_starttls sets _tlsMode, as OutboundClient's replacement does."""
        source = inspect.getsource(smtp.ESMTPClient.esmtpState_starttls)
        self.assertIn("self._tlsMode = True", source, changed(
            "ESMTPClient.esmtpState_starttls (no longer sets _tlsMode)", CLIENT,
            "replaces with its own, which sets _tlsMode"))


class ClientHookTests(SynchronousTestCase):
    """
    The undocumented methods of ESMTPClient's state machine that
    OutboundClient overrides or calls: renamed in Twisted, our override
    would silently never run.
    """

    HOOKS = ("connectionMade", "connectionLost", "sendError", "esmtpState_ehlo",
             "esmtpState_serverConfig", "esmtpState_starttls", "tryTLS", "authenticate",
             "smtpState_helo", "smtpState_from", "smtpState_disconnect",
             "esmtpEHLORequired", "esmtpTLSFailed", "esmtpAUTHRequired",
             "esmtpAUTHDeclined", "esmtpAUTHServerError", "clearLineBuffer",
             "registerAuthenticator", "heloFallback", "requireAuthentication",
             "requireTransportSecurity", "context", "debug")

    def test_hooks_exist(self):
        """Every ESMTPClient name OutboundClient overrides or calls still exists."""
        for name in self.HOOKS:
            self.assertTrue(hasattr(smtp.ESMTPClient, name), gone(
                f"ESMTPClient.{name}", CLIENT, "overrides or calls"))
            self.assertTrue(hasattr(OutboundClient, name))

    def test_ready_after_ehlo(self):
        """After the greeting and EHLO (no STARTTLS, no AUTH) Twisted parses the capabilities in esmtpState_serverConfig and calls smtpState_from: OutboundClient's 'session ready'."""
        c, transport = connected_client()
        c.dataReceived(b"220 mx.example ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO client.example\r\n")
        c.dataReceived(b"250-mx.example\r\n250 PIPELINING\r\n")
        self.assertEqual(c.calls, ["esmtpState_serverConfig", "smtpState_from"], changed(
            "the ESMTPClient set-up sequence (EHLO reply -> esmtpState_serverConfig -> "
            "smtpState_from)", CLIENT, "overrides to keep the capabilities and to know the "
            "session is ready"))

    def test_ready_after_helo_fallback(self):
        """EHLO refused: Twisted falls back to HELO (smtpState_helo), then calls smtpState_from."""
        c, transport = connected_client()
        c.dataReceived(b"220 mx.example\r\n")
        transport.clear()
        c.dataReceived(b"502 5.5.1 EHLO not implemented\r\n")
        self.assertEqual(transport.value(), b"HELO client.example\r\n")
        c.dataReceived(b"250 mx.example\r\n")
        self.assertEqual(c.calls, ["smtpState_from"], changed(
            "the ESMTPClient HELO fallback (smtpState_helo -> smtpState_from)", CLIENT,
            "overrides smtpState_helo in"))


class InboundTests(SynchronousTestCase):
    """
    InboundESMTP subclasses ESMTP but owns the input loop: its dataReceived
    replaces LineOnlyReceiver's, commands go to its smtp_* methods, and it
    calls neither SMTP.connectionMade nor SMTP.connectionLost.
    """

    def test_ctx(self):
        """ESMTP.__init__ keeps the TLS context as self.ctx, which InboundESMTP reads for STARTTLS."""
        context = object()
        p = smtp.ESMTP(chal={}, contextFactory=context)
        self.assertIs(getattr(p, "ctx", None), context, gone(
            "ESMTP.ctx (the contextFactory given to ESMTP.__init__)", SERVER,
            "reads to offer and start STARTTLS"))

    def test_host_setter_encodes(self):
        """SMTP.host turns the configured str into bytes; InboundESMTP sets a str and decodes it."""
        p = smtp.ESMTP()
        p.host = "mx.example.test"
        self.assertEqual(p.host, b"mx.example.test", changed(
            "SMTP.host (a str is no longer stored as bytes)", SERVER,
            "sets from [server] hostname and decodes"))
        harness = ServerHarness(self)
        self.assertEqual(harness.greeting[0].split()[:2], ["220", "mx.example.test"])

    def test_our_input_loop(self):
        """Bytes reach InboundESMTP.dataReceived, never the stock line loop (lineReceived, state_COMMAND, do_*)."""
        self.assertIsNot(InboundESMTP.dataReceived, basic.LineOnlyReceiver.dataReceived)
        stock = []
        for name in ("lineReceived", "state_COMMAND", "do_RSET", "lookupMethod"):
            self.patch(smtp.SMTP, name, lambda self, *a, _n=name: stock.append(_n))
        harness = ServerHarness(self)
        self.assertEqual(harness.send(b"RSET\r\n"), ["250 2.0.0 Reset state"])
        self.assertEqual(stock, [])

    # What the stock methods InboundESMTP does not call use, by name.  If a
    # Twisted release makes them do more, the test below fails: check that
    # skipping them is still harmless, then update the set.
    SKIPPED = {
        "SMTP.connectionMade": (smtp.SMTP.connectionMade, {
            "transport", "getPeer", "host", "AttributeError", "str", "_helo", "sendCode",
            "greeting", "setTimeout", "timeout"}),
        "ESMTP.connectionMade": (smtp.ESMTP.connectionMade, {
            "SMTP", "connectionMade", "canStartTLS", "ITLSTransport", "providedBy",
            "transport", "ctx"}),
        "SMTP.connectionLost": (smtp.SMTP.connectionLost, {
            "mode", "DATA", "_SMTP__messages", "connectionLost", "BaseException", "log",
            "err", "AttributeError", "_onLogout", "setTimeout"}),
    }

    def test_skipped_methods_unchanged(self):
        """SMTP/ESMTP connectionMade and connectionLost, which InboundESMTP does not call, still only set up the stock session state (_helo, mode, _onLogout, the greeting, the timeout)."""
        for label, (method, known) in self.SKIPPED.items():
            names = set(method.__code__.co_names)
            for code in method.__code__.co_consts:
                if inspect.iscode(code):
                    names |= set(code.co_names)
            self.assertEqual(names - known, set(), changed(
                f"{label} (it now also uses {sorted(names - known)})", SERVER,
                "does not call (it owns the session state and the input loop)"))
        for name in ("connectionMade", "connectionLost"):
            self.assertNotIn(f"smtp.ESMTP.{name}(", inspect.getsource(
                getattr(InboundESMTP, name)))
            self.assertNotIn(f"super().{name}(", inspect.getsource(
                getattr(InboundESMTP, name)))


class ServiceTests(SynchronousTestCase):
    """
    tap.py sets StreamServerEndpointService._raiseSynchronously so that a
    listener that cannot listen (port taken, no permission) stops twistd at
    start-up with the reason, instead of being logged while the MTA runs
    without it.
    """

    def test_raise_synchronously(self):
        """_raiseSynchronously makes privilegedStartService raise the listen failure."""
        class Endpoint:
            def listen(self, factory):
                return defer.fail(error.CannotListenError("127.0.0.1", 25, "taken"))

        svc = StreamServerEndpointService(Endpoint(), object())
        self.assertTrue(hasattr(svc, "_raiseSynchronously"), gone(
            "StreamServerEndpointService._raiseSynchronously", "twisted_mta/tap.py",
            "sets so that a listener that cannot listen stops start-up"))
        svc._raiseSynchronously = True
        self.assertRaises(error.CannotListenError, svc.privilegedStartService)


class TimeoutTests(SynchronousTestCase):
    """
    TimeoutMixin.callLater (documented 'for test purpose'): the inbound
    factory and the outbound pool set it to the injected clock, so session
    timeouts run on that clock.
    """

    def test_setTimeout_uses_callLater(self):
        """setTimeout schedules through self.callLater."""
        clock = Clock()
        p = policies.TimeoutMixin()
        p.timeoutConnection = lambda: None
        p.callLater = clock.callLater
        p.setTimeout(5)
        self.assertEqual(len(clock.getDelayedCalls()), 1, gone(
            "TimeoutMixin.callLater as the scheduler of setTimeout",
            f"{SERVER} and twisted_mta/outbound/pool.py", "set to the injected clock"))
        p.setTimeout(None)


class EagerWriteTests(SynchronousTestCase):
    """
    tcp.Connection's write buffer (C{dataBuffer} up to C{offset}, then
    C{_tempDataBuffer}), C{_writeDisconnected}, C{TLS} and
    C{writeSomeData}: twisted_mta/transport.py's C{write_now} sends a reply
    straight away only when they say nothing is waiting.
    """

    USER = "twisted_mta/transport.py (write_now)"

    def test_buffer_attributes(self):
        """A new connection has an empty buffer as write_now reads it; write() buffers in _tempDataBuffer."""
        import socket
        from twisted.internet import protocol, tcp
        from twisted.internet.testing import MemoryReactor
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        ours.setblocking(False)
        t = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 1, MemoryReactor())
        for name in ("dataBuffer", "offset", "_tempDataBuffer", "_writeDisconnected", "TLS",
                     "producer", "disconnecting"):
            self.assertTrue(hasattr(t, name), gone(f"tcp.Server.{name}", self.USER,
                                                   "reads to see whether anything waits"))
        self.assertEqual((len(t.dataBuffer), t.offset, t._tempDataBuffer, t.TLS), (0, 0, [], False),
                         changed("an idle tcp.Server's write buffer", self.USER,
                                 "reads as empty"))
        t.write(b"x")
        self.assertEqual(t._tempDataBuffer, [b"x"], changed(
            "where tcp.Server.write buffers", self.USER, "expects in _tempDataBuffer"))
        self.assertEqual(t.writeSomeData(b"abc"), 3, changed(
            "tcp.Connection.writeSomeData's result", self.USER, "reads as octets sent"))


class ProcessPipeTests(SynchronousTestCase):
    """
    C{start_committer} makes the pipe to the commit helper 1 MiB through
    the process transport's C{pipes}, undocumented: a large message goes in
    one write.  Best effort (a missing attribute only costs speed), but a
    change should be seen.
    """

    USER = "twisted_mta/queue/committer.py (start_committer)"

    def test_pipes_by_child_fd(self):
        from twisted.internet import process
        source = inspect.getsource(process.Process)
        self.assertIn("self.pipes[childFD] = writer", source, gone(
            "Process.pipes keyed by the child's descriptor", self.USER,
            "reads for the helper's standard input"))
        self.assertTrue(callable(getattr(process.ProcessWriter, "fileno", None)), gone(
            "ProcessWriter.fileno", self.USER, "calls to size the pipe"))


class LogObserverTests(SynchronousTestCase):
    """
    L{twisted_mta.logsetup.speed_up_text_log} finds twistd's text log
    observer in the global publisher's private observer list and swaps its
    formatter.
    """

    def test_publisher_keeps_observers_in_a_list(self):
        from twisted.logger import LogPublisher, globalLogPublisher

        publisher = LogPublisher()
        observer = lambda event: None  # noqa: E731
        publisher.addObserver(observer)
        self.assertIsInstance(globalLogPublisher, LogPublisher,
                              changed("globalLogPublisher", "twisted_mta/logsetup.py",
                                      "searches for twistd's observer"))
        self.assertIn(observer, getattr(publisher, "_observers", ()),
                      gone("LogPublisher._observers", "twisted_mta/logsetup.py",
                           "searches for twistd's text observer"))

    def test_twistd_text_observer(self):
        import io

        from twisted.application import app
        from twisted.logger import FileLogObserver, textFileLogObserver
        from twisted.scripts import _twistd_unix

        from twisted_mta.logsetup import TWISTED_TEXT_FORMATTER

        observer = textFileLogObserver(io.StringIO())
        how = "recognises twistd's text observer by its formatter"
        self.assertIsInstance(observer, FileLogObserver,
                              changed("textFileLogObserver", "twisted_mta/logsetup.py", how))
        self.assertEqual(getattr(observer.formatEvent, "__qualname__", None),
                         TWISTED_TEXT_FORMATTER,
                         changed("textFileLogObserver's formatter", "twisted_mta/logsetup.py", how))
        out = io.StringIO()
        self.assertIs(getattr(textFileLogObserver(out), "_outFile", None), out,
                      gone("FileLogObserver._outFile", "twisted_mta/logsetup.py",
                           "wraps twistd's log file in a TurnBufferedStream"))
        for runner in (app.AppLogger, _twistd_unix.UnixAppLogger):
            self.assertIn("textFileLogObserver(", inspect.getsource(runner._getLogObserver),
                          changed(f"{runner.__name__}._getLogObserver", "twisted_mta/logsetup.py",
                                  how))
