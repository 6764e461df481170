"""Sphinx configuration for the ecaseg documentation."""

from __future__ import annotations

import ecaseg

project = "ecaseg"
author = "ecaseg developers"
release = ecaseg.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = ["ref.python"]

# Nitpicky for ecaseg's own references: every ``ecaseg.*`` target must resolve; targets of other projects
# (torch, numpy, the standard library) are not cross-linked (no intersphinx offline) and are ignored.
nitpicky = True
_FOREIGN = (
    "torch", "numpy", "np", "os", "collections", "pathlib", "contextlib", "concurrent", "argparse", "timm",
    "typing", "Path", "PathLike", "Dataset", "Module", "VisionTransformer", "Signature", "float32",
)  # fmt: skip
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_FOREIGN)})(\..*)?"),  # other projects' objects
    (r"py:.*", r".* .*"),  # napoleon reads free text in "Returns:" / "Raises:" as a type
]


def _alias_directive():  # type: ignore[no-untyped-def]
    """``.. ecaseg-aliases:: PACKAGE``: one anchor per name of ``PACKAGE.__all__`` (its re-exports).

    ``from ecaseg import CARMGenerator`` is the advertised path, so ``ecaseg.CARMGenerator`` needs an anchor
    of its own; each entry links to where the object is documented. Generated from ``__all__``, so it
    cannot drift.
    """
    import importlib
    import inspect

    from docutils import nodes
    from docutils.parsers.rst import Directive, directives
    from docutils.statemachine import StringList

    class EcasegAliases(Directive):
        required_arguments = 1
        option_spec = {"module-anchor": directives.flag}

        def run(self):  # type: ignore[no-untyped-def]
            package = self.arguments[0]
            pkg = importlib.import_module(package)
            lines = []
            if "module-anchor" in self.options:
                lines += [f".. py:module:: {package}", ""]
            lines += [f".. py:currentmodule:: {package}", ""]
            for name in pkg.__all__:
                if name.startswith("_"):
                    continue
                obj = getattr(pkg, name)
                home = getattr(obj, "__module__", None)
                if inspect.isclass(obj):
                    kind, role = "class", "class"
                elif inspect.isfunction(obj):
                    kind, role = "function", "func"
                else:
                    kind, role, home = "data", "data", None
                lines += [f".. py:{kind}:: {name}", ""]
                if home and home != package:
                    lines += [f"   Re-export of :{role}:`{home}.{name}`.", ""]
                else:
                    lines += [f"   Defined in ``{package}``; see its guide page.", ""]
            node = nodes.container()
            self.state.nested_parse(StringList(lines, source=f"ecaseg-aliases {package}"), 0, node)
            return node.children

    return EcasegAliases


def setup(app):  # type: ignore[no-untyped-def]
    app.add_directive("ecaseg-aliases", _alias_directive())
