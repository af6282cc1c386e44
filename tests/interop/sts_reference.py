"""
The reference side of tests/interop/test_sts_reference.py: a child process
that asks postfix-mta-sts-resolver's C{STSResolver} about one domain per
line of standard input and answers each with one line of JSON.

Why a child process: the reference runs on asyncio (the tests run on
Twisted's reactor), aiohttp reads its trust store when it is first
imported (C{SSL_CERT_FILE} in the child's own environment names the test
CA, and no proxy variable is passed), and the guards below patch the
socket module, which the test process must not have patched.  One child
serves all the cases, so the imports are paid once.

Nothing may leave the machine.  The child:

  - points the reference's own aiodns channel (the C{_mta-sts} TXT lookup)
    at the private DNS server given on the command line (C{127.0.0.1:PORT});
  - replaces aiohttp's default resolver, with which the reference looks up
    C{mta-sts.<domain>}, by one that asks the same private server for A
    records and accepts only loopback addresses;
  - refuses, and records, any other name lookup through C{socket} and any
    connection to an address outside 127.0.0.0/8.

Each answer reports what went through each seam (TXT questions, host
lookups, connections, refusals, the channel's servers) so that the test can
check it.  Imports only the standard library, aiohttp, aiodns and the
reference: the child does not need this project.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import sys
from importlib import metadata
from typing import Any

# What went through the seams during the current request.
seen: dict[str, list] = {}


def reset() -> None:
    seen.clear()
    seen.update(txt_queries=[], host_lookups=[], connects=[], refused=[], log=[])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def install_guards() -> None:
    """
    Make C{socket} refuse a lookup of any name (numeric addresses pass) and
    a connection anywhere but loopback; before aiohttp is imported.
    """
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        try:
            ipaddress.ip_address(name.split("%", 1)[0] if name else "")
        except ValueError:
            if name is not None:
                seen["refused"].append(f"lookup {name}")
                raise socket.gaierror(socket.EAI_NONAME, f"{name}: refused by the test guard")
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not _is_loopback(host):
                seen["refused"].append(f"connect {host}:{address[1]}")
                raise ConnectionRefusedError(f"{host} is not loopback: refused by the test guard")
            seen["connects"].append(f"{host}:{address[1]}")
        return real_connect(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect


def private_resolver_class(dns_server: str):
    """
    An aiohttp resolver asking only C{dns_server} for A records.
    """
    import aiodns
    import pycares
    from aiohttp.abc import AbstractResolver

    class PrivateResolver(AbstractResolver):
        def __init__(self, *args: Any, loop=None, **kwargs: Any) -> None:
            self._dns = aiodns.DNSResolver(nameservers=[dns_server], loop=loop)

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
            seen["host_lookups"].append(host)
            try:
                result = await self._dns.query_dns(host, "A")
            except aiodns.error.DNSError as e:
                raise OSError(f"{host}: {e}") from None
            found = []
            for record in result.answer:
                if record.type != pycares.QUERY_TYPE_A:
                    continue
                if not _is_loopback(record.data.addr):
                    seen["refused"].append(f"address {record.data.addr} for {host}")
                    continue
                found.append({"hostname": host, "host": record.data.addr, "port": port,
                              "family": socket.AF_INET, "proto": 0,
                              "flags": socket.AI_NUMERICHOST})
            if not found:
                raise OSError(f"{host}: no loopback address")
            return found

        async def close(self) -> None:
            pass

    return PrivateResolver


class _Collect(logging.Handler):
    """
    Keep the reference's log lines.  It logs a failed fetch from inside its
    C{except} block with only C{str(exc)}, which is empty for a timeout or
    its own refusal (status, media type, size): the exception's class is
    added, so that the test can tell those apart.
    """

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        current = sys.exc_info()[1]
        if current is not None:
            message += f" [{type(current).__name__}]"
        seen["log"].append(message)


async def ask(domain: str, dns_server: str, timeout: float) -> dict:
    """
    The reference's verdict on C{domain}, and what went through the seams.
    """
    from postfix_mta_sts_resolver.resolver import STSResolver

    reset()
    resolver = STSResolver(timeout=timeout, loop=asyncio.get_running_loop())
    dns = resolver._resolver  # its aiodns.DNSResolver: the TXT lookup
    dns.nameservers = [dns_server]
    query = dns.query

    def recorded_query(host, qtype, *args):
        seen["txt_queries"].append(f"{qtype} {host}")
        return query(host, qtype, *args)
    dns.query = recorded_query
    status, found = await asyncio.wait_for(resolver.resolve(domain), timeout * 4)
    answer = {"status": status.name, "id": None, "policy": None,
              "dns_servers": list(dns._channel.servers),
              "proxy": None if resolver._proxy is None else str(resolver._proxy)}
    if found is not None:
        policy_id, policy = found
        answer["id"] = policy_id
        answer["policy"] = {"mode": policy.get("mode"), "max_age": policy.get("max_age"),
                            "mx": list(policy.get("mx", []))}
    answer.update(seen)
    return answer


def versions() -> dict:
    return {name: metadata.version(name)
            for name in ("postfix-mta-sts-resolver", "aiohttp", "aiodns", "pycares")}


def main(argv: list[str]) -> int:
    dns_server, timeout = argv[1], float(argv[2])
    reset()
    install_guards()
    import warnings

    import aiohttp.connector

    # The reference still calls aiodns's query(), deprecated in aiodns 4.
    warnings.simplefilter("ignore", DeprecationWarning)
    aiohttp.connector.DefaultResolver = private_resolver_class(dns_server)
    log = logging.getLogger("RES")
    log.setLevel(logging.DEBUG)
    log.addHandler(_Collect())
    print(json.dumps({"ready": versions()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("probe"):
            answer = probe()
        else:
            try:
                answer = asyncio.run(ask(request["domain"], dns_server, timeout))
            except Exception as e:  # reported, for the test to show
                answer = {"status": "crashed", "error": repr(e), **seen}
        print(json.dumps(answer), flush=True)
    return 0


def probe() -> dict:
    """
    Try the guards with requests that could not leave the machine even if
    a guard failed: the name C{localhost} (the hosts file) and 0.0.0.0
    (this host).
    """
    reset()
    outcomes = {}
    try:
        socket.getaddrinfo("localhost", 443)
        outcomes["lookup"] = "allowed"
    except socket.gaierror:
        outcomes["lookup"] = "refused"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.connect(("0.0.0.0", 9))
            outcomes["connect"] = "allowed"
        except ConnectionRefusedError as e:
            outcomes["connect"] = "refused" if "test guard" in str(e) else "allowed"
        except OSError:
            outcomes["connect"] = "allowed"
    return {**outcomes, **seen}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
