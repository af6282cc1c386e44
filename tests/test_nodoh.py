"""
dnspython runs without DNS over HTTPS in the MTA (twisted_mta.nodoh):
its switch exists, is off once our DNS modules are loaded, and loading
them does not load an HTTP client.
"""

import ast
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

HTTP_STACK = ("httpx", "httpx2", "httpcore", "httpcore2", "h2", "trio", "anyio")


class NoDoHTests(SynchronousTestCase):
    def test_switch_is_there_and_off(self) -> None:
        """dns._features.force (private) still exists, and DoH reads as off after our import."""
        import dns._features

        import twisted_mta.nodoh  # noqa: F401
        self.assertTrue(callable(getattr(dns._features, "force", None)),
                        "dnspython changed dns._features: see twisted_mta/nodoh.py")
        self.assertFalse(dns._features.have("doh"))

    def test_dns_modules_load_no_http_client(self) -> None:
        """A fresh interpreter that loads our DNS users and dns.query has no HTTP client (if one is installed, it stays unloaded)."""
        code = (
            "import sys\n"
            "import twisted_mta.tap, twisted_mta.cli, twisted_mta.outbound.mx, twisted_mta.tls.sts\n"
            "twisted_mta.tap.system_nameservers\n"
            "import dns.query, dns.resolver\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HTTP_STACK!r}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "[]", out.stdout)

    def test_every_dns_import_comes_after_nodoh(self) -> None:
        """In the package, each dnspython import has twisted_mta.nodoh imported before it, in its module or its function."""
        import twisted_mta

        def imports_dns(node: ast.AST) -> bool:
            if isinstance(node, ast.Import):
                return any(a.name == "dns" or a.name.startswith("dns.") for a in node.names)
            return isinstance(node, ast.ImportFrom) and node.level == 0 and (
                node.module == "dns" or (node.module or "").startswith("dns."))

        def imports_nodoh(node: ast.AST) -> bool:
            if isinstance(node, ast.Import):
                return any(a.name == "twisted_mta.nodoh" for a in node.names)
            return isinstance(node, ast.ImportFrom) and (
                node.module == "twisted_mta.nodoh"
                or (node.module == "twisted_mta" and any(a.name == "nodoh" for a in node.names)))

        def check(body: list, covered: bool, where: str, wrong: list[str]) -> None:
            # In order: an import of nodoh covers what follows it in its block
            # and the blocks nested in it (functions, if, try, with).
            for node in body:
                if imports_nodoh(node):
                    covered = True
                elif imports_dns(node) and not covered:
                    wrong.append(f"{where}:{node.lineno}")
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        check(inner, covered, where, wrong)

        root = os.path.dirname(twisted_mta.__file__)
        wrong: list[str] = []
        seen = 0
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py") and name != "nodoh.py":
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                    seen += any(imports_dns(n) for n in ast.walk(tree))
                    check(tree.body, False, os.path.relpath(path, root), wrong)
        self.assertGreater(seen, 3)  # the walk found the package's DNS users
        self.assertEqual(wrong, [])
