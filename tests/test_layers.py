"""
The package's import structure: no cycles, and no import from a lower
stage to a higher one.  Modules follow the flow (docs/architecture.md):
the data model at the ground, then the basics (configuration, addresses,
replies, the interfaces), the TLS engine and the DSN writer beside each
other, the queue, the outbound leg, the delivery targets and the inbound
server, and the application (twistd service, command line, tls explain)
on top.  Every import of a twisted_mta module counts, including the ones
inside functions.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import twisted_mta

PACKAGE = os.path.dirname(os.path.abspath(twisted_mta.__file__))

# (rank, module or package prefix); the longest matching prefix applies.
STAGES = [
    (0, "twisted_mta.model"),
    (1, "twisted_mta.address"), (1, "twisted_mta.reply"), (1, "twisted_mta.interfaces"),
    (1, "twisted_mta.users"), (1, "twisted_mta.config"), (1, "twisted_mta.local"),
    (1, "twisted_mta.metrics"), (1, "twisted_mta.logsetup"), (1, "twisted_mta.tlsserver"),
    (1, "twisted_mta.dsn.params"),
    # The 7-bit conversion (RFC 6152): pure functions over a message's bytes.
    (1, "twisted_mta.downgrade"),
    # the maildrop file: written by the sendmail command, read by the pickup
    (1, "twisted_mta.maildrop"),
    # The milter codec: pure functions over bytes (its client is inbound.milter).
    (1, "twisted_mta.milter_protocol"),
    # dnspython's settings, loaded before any dns module (no DNS over HTTPS).
    (1, "twisted_mta.nodoh"),
    # Writing to a TCP connection at once (both SMTP legs use it).
    (1, "twisted_mta.transport"),
    # Deferred helpers (the queue and the delivery targets gather results).
    (1, "twisted_mta.deferreds"),
    # A child process dies with its parent (the workers, the commit helper).
    (1, "twisted_mta.lifetime"),
    (2, "twisted_mta.tls"), (2, "twisted_mta.dsn"), (2, "twisted_mta.failures"),
    # DKIM signing: TLS reports now, all outbound mail later (the queue's
    # notices and the outbound leg both sign).
    (2, "twisted_mta.dkim"),
    (3, "twisted_mta.queue"),
    (4, "twisted_mta.outbound"),
    # TLS reporting counts the outbound leg's TLS outcomes and queues its
    # reports like any message: beside the outbound leg.
    (4, "twisted_mta.tlsrpt"),
    (5, "twisted_mta.delivery"), (5, "twisted_mta.inbound"),
    # tls explain runs the outbound attempt in a dry run: an operator tool.
    (6, "twisted_mta.tls.probe"), (6, "twisted_mta.tap"), (6, "twisted_mta.cli"),
    (6, "twisted_mta.workers"), (6, "twisted_mta.worker"), (6, "twisted_mta.sendmail"),
    (6, "twisted_mta"),
]
NAMES = {0: "the data model", 1: "the basics", 2: "the TLS engine and DSNs", 3: "the queue",
         4: "the outbound leg", 5: "delivery targets and inbound", 6: "the application"}


def modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(path: str, known: dict[str, str]) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("twisted_mta"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("twisted_mta"))
    return found


def rank(module: str) -> int:
    best = max((prefix for _, prefix in STAGES
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return dict((p, r) for r, p in STAGES)[best]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(path, known) - {m} for m, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """
    The strongly connected components with more than one module (Tarjan).
    """
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


class LayerTests(SynchronousTestCase):
    def test_no_import_cycles(self):
        """No two modules import each other, directly or around a loop."""
        self.assertEqual(cycles(graph()), [])

    def test_no_import_from_a_lower_stage_to_a_higher_one(self):
        """The queue imports no outbound or delivery code, configuration no TLS engine, the model nothing: every import goes to the same stage or a lower one."""
        wrong = []
        for module, targets in sorted(graph().items()):
            for target in sorted(targets):
                if rank(target) > rank(module):
                    wrong.append(f"{module} ({NAMES[rank(module)]}) imports {target} "
                                 f"({NAMES[rank(target)]})")
        self.assertEqual(wrong, [])

    def test_the_rules_can_fail(self):
        """The checks see a cycle and an upward import when there is one."""
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}),
                         [["a", "b", "c"]])
        self.assertGreater(rank("twisted_mta.outbound.pool"), rank("twisted_mta.queue.manager"))
        self.assertEqual(rank("twisted_mta.model"), 0)
        self.assertEqual(rank("twisted_mta.tls.probe"), 6)
        self.assertEqual(rank("twisted_mta.tls.engine"), 2)
