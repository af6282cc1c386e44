"""
A scriptable milter for tests: the milter side of the protocol, written
apart from twisted_mta.milter_protocol (its own packing and constants, from
the protocol description) so a shared mistake does not pass unnoticed.

A L{ScriptedMilter} records every command it gets (with the macros sent
before it) and answers as its C{script} says:

  - C{script["optneg"]}: (actions, protocol) to ask for, default all
    actions and no protocol flags;
  - C{script[stage]} for stage in connect, helo, mail, rcpt, data, header,
    eoh, body: a reply (see L{reply_packet}) or a callable(args) giving one;
  - C{script["eom"]}: a list of packets (L{mod}, L{reply_packet}) sent at
    end of message, default continue;
  - C{script["crash"]} = stage: close the connection on that stage;
  - C{script["hang"]} = stage: never answer it.
"""

from __future__ import annotations

import struct

from twisted.internet.protocol import Factory, Protocol

STAGES = {b"C": "connect", b"H": "helo", b"M": "mail", b"R": "rcpt", b"T": "data",
          b"L": "header", b"N": "eoh", b"B": "body", b"E": "eom", b"A": "abort",
          b"Q": "quit", b"O": "optneg", b"D": "macro"}
ALL_ACTIONS = 0x1FF


def packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">L", 1 + len(data)) + code + data


def reply_packet(what: str | bytes) -> bytes:
    """
    C{continue}, C{accept}, C{reject}, C{tempfail}, C{discard}, C{skip},
    or an SMTP reply text (C{"550 5.7.0 go away"}: REPLYCODE); bytes are
    sent as they are.
    """
    if isinstance(what, bytes):
        return what
    codes = {"continue": b"c", "accept": b"a", "reject": b"r", "tempfail": b"t",
             "discard": b"d", "skip": b"s", "progress": b"p"}
    if what in codes:
        return packet(codes[what])
    return packet(b"y", what.encode() + b"\0")


def mod(kind: str, *args) -> bytes:
    """An end-of-message modification packet."""
    if kind == "addheader":
        name, value = args
        return packet(b"h", name + b"\0" + value + b"\0")
    if kind in ("insheader", "chgheader"):
        index, name, value = args
        return packet(b"i" if kind == "insheader" else b"m",
                      struct.pack(">L", index) + name + b"\0" + value + b"\0")
    if kind == "replbody":
        return packet(b"b", args[0])
    if kind == "quarantine":
        return packet(b"q", args[0] + b"\0")
    if kind == "chgfrom":
        return packet(b"e", args[0] + b"\0")
    if kind == "addrcpt":
        return packet(b"+", args[0] + b"\0")
    if kind == "delrcpt":
        return packet(b"-", args[0] + b"\0")
    raise ValueError(kind)


class ScriptedMilter(Protocol):
    def __init__(self, script: dict, log: list) -> None:
        self.script = script
        self.log = log  # (stage, args, macros) for every command
        self.buf = b""
        self.macros: dict[bytes, dict[str, str]] = {}
        self.protocol = 0
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (n,) = struct.unpack(">L", self.buf[:4])
            if len(self.buf) < 4 + n:
                return
            body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
            self.command(body[:1], body[1:])
            if self.closed:
                return

    def command(self, code: bytes, data: bytes) -> None:
        stage = STAGES.get(code, repr(code))
        if stage == "macro":
            fields = data[1:].split(b"\0")[:-1]
            self.macros[data[:1]] = {fields[i].decode(): fields[i + 1].decode()
                                     for i in range(0, len(fields) - 1, 2)}
            return
        if stage == "optneg":
            version, actions, offered = struct.unpack(">LLL", data[:12])
            self.log.append(("optneg", (version, actions, offered), {}))
            if self.script.get("hang") == "optneg":
                return
            want_actions, want_protocol = self.script.get("optneg", (ALL_ACTIONS, 0))
            self.protocol = want_protocol
            extra = self.script.get("symlist", b"")
            self.transport.write(packet(b"O", struct.pack(">LLL", 6, want_actions,
                                                          want_protocol) + extra))
            return
        args: object = [a for a in data.split(b"\0")][:-1] if stage != "body" else data
        if stage == "header":
            args = tuple(data.split(b"\0")[:2])
        if stage == "connect":
            host, _, rest = data.partition(b"\0")
            family = rest[:1]
            port = struct.unpack(">H", rest[1:3])[0] if family != b"U" else 0
            args = (host, family, port, rest[3:].rstrip(b"\0"))
        self.log.append((stage, args, self.macros.pop(code, {})))
        if stage in ("abort", "quit"):
            if stage == "quit":
                self.closed = True
                self.transport.loseConnection()
            return
        if self.script.get("crash") == stage:
            self.closed = True
            self.transport.loseConnection()
            return
        if self.script.get("hang") == stage:
            return
        no_reply = {"connect": 0x1000, "helo": 0x2000, "mail": 0x4000, "rcpt": 0x8000,
                    "data": 0x10000, "header": 0x80, "eoh": 0x40000, "body": 0x80000}
        if self.protocol & no_reply.get(stage, 0):
            return
        if stage == "eom":
            for p in self.script.get("eom", ["continue"]):
                self.transport.write(reply_packet(p))
            return
        answer = self.script.get(stage, "continue")
        if callable(answer):
            answer = answer(args)
        self.transport.write(reply_packet(answer))


class ScriptedMilterFactory(Factory):
    def __init__(self, script: dict) -> None:
        self.script = script
        self.log: list = []
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        p = ScriptedMilter(self.script, self.log)
        p.factory = self
        return p

    def stages(self) -> list[str]:
        return [entry[0] for entry in self.log]
