"""HTML made of elements that escape by default: the fleet report's one way to write markup.

`el` escapes every text child and every attribute value as it builds the element; only `Markup` goes in as it
is, and Markup is what `el` and `concat` return, or a constant the code marks as trusted on purpose
(`Markup(CSS)`). A value read from the registry therefore cannot reach the page unescaped by accident:
leaving out an escape is not possible, only trusting a text explicitly.
"""
from __future__ import annotations

import html
from typing import Iterable, Union


class Markup(str):
    """Text that is HTML already: inserted as it is."""

    __slots__ = ()


# A child: text (escaped), Markup (as it is), a number, None (nothing) or any iterable of children.
Node = Union[str, int, float, None, Iterable["Node"]]
Value = Union[str, int, float, None]  # an attribute's value; None leaves the attribute out

VOID = frozenset({"meta"})  # HTML elements without an end tag
SHAPES = frozenset({"path", "circle", "rect", "line"})  # SVG shapes: self-closed when they have no children


def escape(text: str) -> str:
    """&, <, > and the double quote, which delimits every attribute value here (an apostrophe stays as it is)."""
    return html.escape(text, quote=False).replace('"', "&quot;")


def concat(*children: Node) -> Markup:
    """The children one after the other, text escaped."""
    parts: list[str] = []
    _append(parts, children)
    return Markup("".join(parts))


def _append(parts: list[str], node: Node) -> None:
    if node is None:
        return
    if isinstance(node, Markup):
        parts.append(node)
    elif isinstance(node, (str, int, float)):
        parts.append(escape(str(node)))
    else:
        for child in node:
            _append(parts, child)


def _attribute(name: str, value: str | int | float) -> str:
    if isinstance(value, Markup):  # HTML is no attribute value: escaping it again would show its entities
        raise TypeError(f"attribute {name}: Markup given, text expected")
    return f' {name}="{escape(str(value))}"'


def el(tag: str, *children: Node, **attributes: Value) -> Markup:
    """<tag name="value"...>children</tag>. A keyword's trailing underscore is dropped and its other
    underscores become hyphens: class_="a", data_tip="b", stroke_width=2."""
    head = tag + "".join(_attribute(name.rstrip("_").replace("_", "-"), value)
                         for name, value in attributes.items() if value is not None)
    if tag in VOID:
        if children:
            raise ValueError(f"<{tag}> has no content")
        return Markup(f"<{head}>")
    if tag in SHAPES and not children:
        return Markup(f"<{head}/>")
    return Markup(f"<{head}>{concat(*children)}</{tag}>")


def join(separator: str, items: Iterable[Node]) -> Markup:
    """The items with a separator between them (both escaped unless Markup)."""
    parts: list[Node] = []
    for item in items:
        if parts:
            parts.append(separator)
        parts.append(item)
    return concat(parts)
