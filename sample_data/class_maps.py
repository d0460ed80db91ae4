# Copyright MedAttnSlicer contributors. Apache-2.0.
"""TotalSegmentator class maps (label value -> structure name), read without importing TotalSegmentator.

``totalsegmentator/map_to_binary.py`` defines ``class_map = {"total": {1: "spleen", ...}, "total_mr": {...}, ...}``.
It is parsed with :mod:`ast`; if the whole dict is not a literal, only the requested entries are evaluated.
"""

from __future__ import annotations

import ast
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import SampleDataError, UnknownOrganError
from .paths import default_data_dir

__all__ = [
    "CLASS_MAP_NAMES",
    "CLASS_MAPS_FILENAME",
    "parse_class_maps",
    "load_class_maps",
    "normalise_organ_name",
    "organ_suggestions",
    "resolve_organs",
]

CLASS_MAP_NAMES: tuple[str, ...] = ("total", "total_mr")
CLASS_MAPS_FILENAME = "class_maps.json"


def _checked_map(name: str, value: object) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise SampleDataError(f"class_map[{name!r}] is not a non-empty dict")
    checked: dict[int, str] = {}
    for key, organ in value.items():
        if not isinstance(key, int) or isinstance(key, bool) or key < 1 or not isinstance(organ, str):
            raise SampleDataError(f"class_map[{name!r}] has a non (positive int -> str) entry {key!r}: {organ!r}")
        checked[key] = organ
    if len(set(checked.values())) != len(checked):
        raise SampleDataError(f"class_map[{name!r}] names a structure twice")
    return checked


def _class_map_dict_node(tree: ast.Module) -> ast.Dict:
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "class_map" for t in targets):
            if isinstance(node.value, ast.Dict):
                return node.value
            raise SampleDataError("the first top-level `class_map = ...` is not a dict display")
    raise SampleDataError("no top-level `class_map = {...}` assignment found")


def parse_class_maps(source_code: str, names: Iterable[str] = CLASS_MAP_NAMES) -> dict[str, dict[int, str]]:
    """Extract ``class_map[name]`` for each of ``names`` from the text of ``map_to_binary.py``.

    Args:
        source_code: the module's text.
        names: entries of the top-level ``class_map`` dict to return.

    Returns:
        ``{name: {label value: structure name}}``.
    """
    names = tuple(names)
    dict_node = _class_map_dict_node(ast.parse(source_code))
    try:
        whole = ast.literal_eval(dict_node)
    except ValueError:
        whole = None
    result: dict[str, dict[int, str]] = {}
    for name in names:
        if whole is not None:
            if name not in whole:
                raise SampleDataError(f"class_map has no entry {name!r}")
            result[name] = _checked_map(name, whole[name])
            continue
        # Some other entry is computed; evaluate just the requested one (the last display of a key wins, as in Python).
        value_node = None
        for key_node, candidate in zip(dict_node.keys, dict_node.values):
            if isinstance(key_node, ast.Constant) and key_node.value == name:
                value_node = candidate
        if value_node is None:
            raise SampleDataError(f"class_map has no literal key {name!r}")
        try:
            value = ast.literal_eval(value_node)
        except ValueError as error:
            raise SampleDataError(f"class_map[{name!r}] is not a literal dict") from error
        result[name] = _checked_map(name, value)
    return result


def load_class_maps(data_dir: Path | str | None = None) -> dict[str, dict[int, str]]:
    """Read ``<data_dir>/class_maps.json`` (written by :func:`sample_data.fetch`).

    Returns:
        ``{"total": {1: "spleen", ...}, "total_mr": {1: "spleen", ...}}``.
    """
    path = Path(data_dir if data_dir is not None else default_data_dir()) / CLASS_MAPS_FILENAME
    if not path.is_file():
        raise SampleDataError(f"{path} not found; run `python -m sample_data` (or sample_data.fetch()) first")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        maps = payload["class_maps"]
        return {name: _checked_map(name, {int(k): v for k, v in maps[name].items()}) for name in CLASS_MAP_NAMES}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SampleDataError(f"{path} is not a valid class-map file ({error!r}); delete it and fetch again") from error


def normalise_organ_name(name: str) -> str:
    """``"Left Kidney"``-style spellings are not guessed; only case, spaces and hyphens are normalised."""
    return "_".join(str(name).strip().lower().replace("-", " ").split())


def organ_suggestions(name: str, known: Iterable[str], limit: int = 6) -> list[str]:
    """Known names containing ``name`` (``kidney`` -> ``kidney_left``...), then close spellings."""
    known = sorted(set(known))
    normalised = normalise_organ_name(name)
    containing = [k for k in known if normalised and normalised in k]
    close = difflib.get_close_matches(normalised, known, n=limit, cutoff=0.6)
    ordered = list(dict.fromkeys(close + containing))
    return ordered[:limit]


def resolve_organs(
    organs: Sequence[str], class_maps: Mapping[str, Mapping[int, str]]
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Validate organ names against every class map.

    Returns:
        The normalised names, and for each class map ``{organ: label value in that map}`` for the organs it has.

    Raises:
        UnknownOrganError: a name is in none of the maps (the message lists close matches).
        SampleDataError: the list is empty, repeats a name, or has more than 255 organs (labels are uint8).
    """
    if isinstance(organs, str):
        organs = [organs]
    names = [normalise_organ_name(o) for o in organs]
    if not names:
        raise SampleDataError("no organs given")
    if len(names) > 255:
        raise SampleDataError(f"{len(names)} organs do not fit uint8 label values 1..255")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SampleDataError(f"organs listed more than once: {duplicates}")
    by_map = {map_name: {organ: value for value, organ in cmap.items()} for map_name, cmap in class_maps.items()}
    known = set().union(*by_map.values())
    for original, name in zip(organs, names):
        if name not in known:
            hints = organ_suggestions(name, known)
            hint = f"; close matches: {', '.join(hints)}" if hints else ""
            raise UnknownOrganError(
                f"unknown organ {original!r}: not in the TotalSegmentator class maps {sorted(class_maps)}{hint}"
            )
    lookup = {map_name: {n: table[n] for n in names if n in table} for map_name, table in by_map.items()}
    return names, lookup
