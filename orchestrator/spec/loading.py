"""Reading a spec: YAML (safe loader, duplicate keys refused), profiles overlaid, relative paths anchored,
the models validated, the cross-field checks run, method options normalised to their typed grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import UserError
from orchestrator.spec.checks import check_spec, option_grid
from orchestrator.spec.models import StudySpec
from orchestrator.spec.paths import anchor_spec_paths
from orchestrator.spec.problems import Problem, problems_from

MAX_SPEC_BYTES = 1 << 20


MAX_DEPTH = 64  # nesting of a spec's YAML (a study spec is a handful of levels deep)


MAX_NODES = 1_000_000  # YAML nodes of a spec once its aliases are expanded (an alias bomb is refused)


MAX_INT_DIGITS = 100  # an integer literal longer than this is refused (Python would refuse past 4,300)


def parse_spec(data: Any) -> StudySpec:

    if not isinstance(data, dict):
        raise UserError("spec: expected a mapping at the top level")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(*unique_lines(problems_from(exc, StudySpec))) from None
    problems = check_spec(spec)
    if problems:
        raise UserError(*unique_lines(problems))
    return _normalise_options(spec)


def _normalise_options(spec: StudySpec) -> StudySpec:
    """Method options as their validated grids (typed values, unset options left out)."""

    d = spec.distillation
    options = {m: option_grid(m, raw) for m, raw in d.options.items()}
    return spec.model_copy(update={"distillation": d.model_copy(update={"options": options})})


def unique_lines(problems: list[Problem]) -> list[str]:
    return list(dict.fromkeys(p.line() for p in problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML says last wins, silently), nesting
    deeper than MAX_DEPTH (checked while composing, before Python's recursion limit), a document that
    expands through its aliases to more than MAX_NODES nodes or deeper than MAX_DEPTH, a recursive alias,
    a key that is not a scalar and an integer of more than MAX_INT_DIGITS digits: each a YAML error at its
    line."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """The composed document's size and depth with every alias expanded, computed once per distinct node
    (iteratively: neither the count nor the depth can exhaust memory or the stack)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        if done:
            kids = _children(node)
            size[id(node)] = min(MAX_NODES + 1, 1 + sum(size[id(k)] for k in kids))
            height[id(node)] = 1 + max((height[id(k)] for k in kids), default=0)
            open_.discard(id(node))
            if size[id(node)] > MAX_NODES:
                raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_NODES:,} nodes "
                                                              "through its aliases", node.start_mark)
            if height[id(node)] > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels "
                                                              "through its aliases", node.start_mark)
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it",
                                              node.start_mark)
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value, not a "
                                                                "list or mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _bounded_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode):
    if len(node.value) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value):,} digits (at most "
                                                            f"{MAX_INT_DIGITS})", node.start_mark)
    return loader.construct_yaml_int(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def load_yaml(text: str, where: str) -> Any:
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise UserError(f"{where}: spec too large ({len(text.encode())} bytes; at most {MAX_SPEC_BYTES})")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{where}{at}: YAML error: {problem}") from None


def load_spec(path: str | Path, profile: str | None = None) -> StudySpec:
    return read_spec(path, profile)[0]


def read_spec(path: str | Path, profile: str | None = None, anchored: bool = True) -> tuple[StudySpec, str]:
    """The spec in a file, with a profile's overlay applied, and the YAML text of what runs.

    A spec may carry `profiles: {NAME: overlay}`: each overlay is merged into the
    spec (mappings key by key, anything else replaced) when `--profile NAME` is
    given, e.g. a `smoke` profile shrinking a paper study to minutes on a CPU.
    Relative paths written in the spec resolve against the file's directory
    (`orchestrator.spec.paths`); `anchored=False` keeps them as written (a cluster
    submission refuses them, since the laptop's directories mean nothing there).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"spec file not found: {p}")
    text = p.read_text()
    data = load_yaml(text, str(p))
    if not isinstance(data, dict):
        raise UserError("spec: expected a mapping at the top level")
    profiles = data.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise UserError("profiles: expected a mapping of profile names to spec overlays")
    def parsed(d: dict) -> StudySpec:
        return parse_spec(anchor_spec_paths(d, p.absolute().parent) if anchored else d)

    if profile is None:
        return parsed(data), text
    if profile not in profiles:
        known = f" (known: {', '.join(sorted(profiles))})" if profiles else " (it has no profiles)"
        raise UserError(f"--profile: '{profile}' is not a profile of {p}{known}")
    merged = overlay(data, profiles[profile])
    return parsed(merged), f"# {p.name} with profile {profile}\n" + yaml.safe_dump(merged, sort_keys=False)


def profiles_of(path: str | Path) -> list[str]:
    """The names of a spec file's profiles (none for a file that is missing: loading it says so)."""
    if not Path(path).is_file():
        return []
    data = load_yaml(Path(path).read_text(), str(path))
    return sorted((data or {}).get("profiles") or {}) if isinstance(data, dict) else []


def overlay(base: Any, patch: Any) -> Any:
    """`patch` merged into `base`: mappings key by key, any other value replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: overlay(base.get(k), v) for k, v in patch.items()}}
    return patch
