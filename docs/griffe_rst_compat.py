"""Griffe extension used by the API reference: reads the few reStructuredText habits of the package's docstrings.

The package's docstrings are Google style, which griffe parses, with three exceptions it does not understand:

* ``Example:`` / ``Example::`` section titles (griffe's Google parser knows only ``Examples:``). Left alone, the
  section becomes an admonition whose ``>>>`` lines render as nested block quotes, and strict builds fail when a
  doctest line looks like a Markdown link (``stats["2"]["num_samples"]``).
* ``.. note::`` directives (Google style writes ``Note:``).
* Sphinx roles such as ``:class:`~lightning_demp.optim.ParamRemap``` and ``:math:`\\lambda_t```.

This extension rewrites those into their Google/Markdown equivalents before griffe parses each docstring. It
changes only what the documentation shows, never the package. It becomes a no-op (and can be deleted, with its
``extensions:`` line in ``mkdocs.yml``) once the docstrings use ``Examples:``, ``Note:`` and Markdown code spans.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc|ref):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (note|warning|tip|important|seealso)::\s*$")
_TEX = {r"\lambda": "λ", r"\sigma": "σ", r"\cdot": "·", r"\times": "×"}


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _math(match: re.Match[str]) -> str:
    text = match.group(1)
    for tex, char in _TEX.items():
        text = text.replace(tex, char)
    return f"`{' '.join(text.split())}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_google(text: str) -> str:
    """Return ``text`` with the RST constructs described in the module docstring rewritten."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped in ("Example:", "Example::"):
            base = _indent(line)
            out.append(" " * base + "Examples:")
            index += 1
            if stripped.endswith("::"):  # an RST literal block: keep doctests, fence anything else as code
                block = []
                while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > base):
                    block.append(lines[index])
                    index += 1
                while block and not block[-1].strip():
                    block.pop()
                content = [entry for entry in block if entry.strip()]
                if content and not content[0].lstrip().startswith(">>>"):
                    inner = min(_indent(entry) for entry in content)
                    fence = " " * inner + "```"
                    block = [fence + "python", *content, fence]
                out.extend(block)
                out.append("")
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            out.append(f"{directive.group(1)}{directive.group(2).capitalize()}:")
        else:
            out.append(_ROLE.sub(_role, _MATH.sub(_math, line)))
        index += 1
    return "\n".join(out).rstrip("\n")


class RstCompat(Extension):
    """Rewrite each docstring before it is parsed."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite the object's own docstring (aliases share it)."""
        if obj.docstring is not None:
            obj.docstring.value = rst_to_google(obj.docstring.value)
