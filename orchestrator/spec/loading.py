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
    """The safe loader, refusing a key given twice in one mapping (YAML says last wins, silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


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
