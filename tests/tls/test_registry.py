"""
Tests for loading TLS policies and deciders by dotted path
(twisted_mta.tls.engine: Registry, _load_dotted, load_registry): every
failure is one line that names the path and, for the plugin's own code,
the exception and where it was raised.
"""

from __future__ import annotations

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tls.engine import TLSConfigError, _load_dotted, load_registry

POLICY = """\
from zope.interface import implementer
from twisted_mta.interfaces import ITLSPolicy
from twisted_mta.tls.policy import BUILTIN


@implementer(ITLSPolicy)
class Banks:
    name = "banks-{n}"

    def requirements(self, destination):
        return BUILTIN["strict"].requirements(destination)


instance = Banks()
"""


class DottedPathTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        sys.path.insert(0, self.dir)
        self.addCleanup(sys.path.remove, self.dir)
        self.count = 0

    def module(self, source: str) -> tuple[str, str]:
        """
        A fresh importable module with C{source}: its name and file.
        """
        self.count += 1
        name = f"mta_dotted_{self._testMethodName}_{self.count}"
        path = os.path.join(self.dir, name + ".py")
        with open(path, "w") as f:
            f.write(source)
        self.addCleanup(sys.modules.pop, name, None)
        return name, path

    def refused(self, path: str) -> str:
        with self.assertRaises(TLSConfigError) as cm:
            _load_dotted(path)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        return message

    def test_object_and_class(self):
        """An object is returned as it is; a class is instantiated."""
        name, _ = self.module(POLICY.format(n=1))
        self.assertEqual(_load_dotted(f"{name}.instance").name, "banks-1")
        self.assertEqual(type(_load_dotted(f"{name}.Banks")).__name__, "Banks")

    def test_no_such_module(self):
        self.assertEqual(self.refused("no_such_mta_module.Policy"),
                         "cannot load no_such_mta_module.Policy: No module named "
                         "'no_such_mta_module'")

    def test_no_such_attribute(self):
        name, _ = self.module("x = 1\n")
        self.assertEqual(self.refused(f"{name}.Policy"),
                         f"cannot load {name}.Policy: module {name!r} has no attribute 'Policy'")

    def test_not_a_dotted_name(self):
        self.assertIn("'.'-separated list of Python identifiers", self.refused("os..sep"))

    def test_module_raises_on_import(self):
        """The plugin's exception, its type and the line of the plugin's file."""
        name, path = self.module("import os\nraise ValueError('no\\nconfig')\n")
        self.assertEqual(self.refused(f"{name}.Policy"),
                         f"cannot load {name}.Policy: ValueError: no config (in {path} line 2)")

    def test_module_lacks_a_dependency(self):
        """A plugin that imports a package that is not installed: not to be mistaken for a missing plugin."""
        name, path = self.module("import no_such_mta_dependency\n")
        self.assertEqual(self.refused(f"{name}.Policy"),
                         f"cannot load {name}.Policy: ModuleNotFoundError: No module named "
                         f"'no_such_mta_dependency' (in {path} line 1)")

    def test_attribute_error_inside_the_plugin(self):
        """An AttributeError raised by the plugin's code is the plugin's, with its line."""
        name, path = self.module("import os\nos.no_such_function()\n")
        self.assertEqual(self.refused(f"{name}.Policy"),
                         f"cannot load {name}.Policy: AttributeError: module 'os' has no "
                         f"attribute 'no_such_function' (in {path} line 2)")

    def test_syntax_error(self):
        """A plugin Python cannot parse: its file and line, not importlib's."""
        name, path = self.module("def (:\n")
        message = self.refused(f"{name}.Policy")
        self.assertTrue(message.startswith(f"cannot load {name}.Policy: SyntaxError: "), message)
        self.assertTrue(message.endswith(f" (in {path} line 1)"), message)

    def test_constructor_raises(self):
        name, path = self.module("class Policy:\n    def __init__(self):\n"
                                 "        raise RuntimeError('boom')\n")
        self.assertEqual(self.refused(f"{name}.Policy"),
                         f"cannot load {name}.Policy: RuntimeError: boom (in {path} line 3)")

    def test_registry_by_dotted_name(self):
        """A policy named by dotted path is loaded once, checked for ITLSPolicy."""
        name, _ = self.module(POLICY.format(n=2))
        registry = load_registry()
        policy = registry.policy(f"{name}.instance")
        self.assertIs(registry.policy(f"{name}.instance"), policy)
        with self.assertRaises(TLSConfigError) as cm:
            registry.policy("os.sep")
        self.assertEqual(str(cm.exception), "os.sep does not provide ITLSPolicy")
        with self.assertRaises(TLSConfigError) as cm:
            registry.decider(f"{name}.instance")
        self.assertEqual(str(cm.exception), f"{name}.instance does not provide IFallbackDecider")

    def test_plugins_setting(self):
        """[outbound.tls] plugins: registered under their names; an object providing neither interface is refused."""
        name, _ = self.module(POLICY.format(n=3))
        registry = load_registry((f"{name}.instance",))
        self.assertEqual(registry.policy("banks-3").name, "banks-3")
        with self.assertRaises(TLSConfigError) as cm:
            load_registry(("os.sep",))
        self.assertEqual(str(cm.exception),
                         "os.sep provides neither ITLSPolicy nor IFallbackDecider")
