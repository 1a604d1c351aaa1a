"""The one loader: Deployment YAML -> `controller.spec.Deployment`, or FILE:LINE errors.

Every error in every file is reported in one pass, each with the line of the key or
value to change, because users fix a batch of mistakes far faster than a drip of them.
The JSON Schema (schemas/deployment.schema.json) is the public contract; the semantic
checks here cover what a schema cannot say (cross-field rules, unique names).
"""
from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from jsonschema import Draft202012Validator, ValidationError
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from controller.spec import (AlertRule, Autoscaling, Deployment, GpuSpec, HealthCheck, LoadBalancer,
                             Resources, Rollout, Scaling)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "deployment.schema.json"
API_VERSION = "autodeploy/v1"
KIND = "Deployment"
YAML_SUFFIXES = (".yaml", ".yml")
# Hostile or broken input must fail fast and small: PyYAML would expand an alias bomb
# (730 bytes -> gigabytes) and recurse once per nesting level until RecursionError.
MAX_FILE_BYTES = 1024 * 1024  # per file
MAX_DEPTH = 64  # nesting of mappings and lists; a Deployment needs about 6
MAX_NODES = 20_000  # values in one document once aliases are expanded; a Deployment needs ~100

# A JSON-pointer-like path into a document: mapping keys and list indexes.
Pointer = tuple[Any, ...]
_MISSING = object()
_SPEC: Pointer = ("spec",)
_PORT_REF = re.compile(r"\$\{?PORT\b")  # as the local driver substitutes it


@dataclass(frozen=True)
class SpecError:
    file: str
    line: int  # 1-based; 0 means the file as a whole (unreadable, missing)
    message: str

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"


@dataclass
class LoadResult:
    deployments: list[Deployment]
    errors: list[SpecError]
    files: list[str]
    warnings: list[SpecError] = field(default_factory=list)  # printed, never fatal

    @property
    def ok(self) -> bool:
        return not self.errors


# --- durations -------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|h|m|s))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = "write e.g. 500ms, 30s, 10m, 1h or 1h30m (a plain number means seconds)"


def parse_duration(text: str | int | float) -> float:
    """Seconds in `500ms`, `30s`, `10m`, `1h`, `1h30m`, or a plain number of seconds.

    Accepts exactly what the schema's `$defs/duration` pattern accepts, so a document
    that passed the schema always converts.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; {DURATION_HINT}")
    if isinstance(text, (int, float)):
        if text < 0 or not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration: it must be 0 or more seconds")
        return float(text)
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"'{text}' is not a duration; {DURATION_HINT}")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


# --- schema ----------------------------------------------------------------------------

@functools.cache
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema())


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        return {**load_schema()["$defs"][ref.split("/")[-1]], **node}
    return node


@functools.cache
def _key_homes() -> dict[str, tuple[str, ...]]:
    """Every key the schema allows, with the dotted places where it is allowed.

    Used to say "maxReplicas belongs under spec.scaling" when a key is in the wrong place.
    """
    homes: dict[str, list[str]] = {}

    def walk(node: dict[str, Any], where: str) -> None:
        for key, sub in _resolve(node).get("properties", {}).items():
            homes.setdefault(key, []).append(where or "the top level")
            walk(sub, f"{where}.{key}" if where else key)

    walk(load_schema(), "")
    return {k: tuple(v) for k, v in homes.items()}


@functools.cache
def schema_defaults() -> dict[Pointer, Any]:
    """The schema's `default` values by pointer ("[]" stands for any list item): the one
    place defaults are written. The loader fills them in (`with_defaults`); spec.py's
    dataclass defaults are checked against them (tests/test_loader.py)."""
    out: dict[Pointer, Any] = {}

    def walk(node: dict[str, Any], at: Pointer) -> None:
        node = _resolve(node)
        for key, sub in node.get("properties", {}).items():
            sub_r = _resolve(sub)
            if "default" in sub_r:
                out[at + (key,)] = sub_r["default"]
            walk(sub_r, at + (key,))
        if isinstance(node.get("items"), dict):
            walk(node["items"], at + ("[]",))

    walk(load_schema(), ())
    return out


def schema_default(pointer: Pointer) -> Any:
    """The schema's default at `pointer` (list indexes match any item); KeyError without one."""
    return copy.deepcopy(schema_defaults()[tuple("[]" if isinstance(p, int) else p for p in pointer)])


def with_defaults(data: Any, at: Pointer = ()) -> Any:
    """A copy of a valid document with every unwritten key that has a schema default filled in.
    Optional objects without a default (healthCheck) stay absent."""
    defaults = schema_defaults()
    if isinstance(data, list):
        return [with_defaults(item, at + ("[]",)) for item in data]
    if not isinstance(data, dict):
        return data
    out = {k: with_defaults(v, at + (k,)) for k, v in data.items()}
    for pointer, value in defaults.items():
        if len(pointer) == len(at) + 1 and pointer[:-1] == at and pointer[-1] not in out:
            out[pointer[-1]] = with_defaults(copy.deepcopy(value), pointer)
    return out


# --- YAML documents with their line numbers ----------------------------------------------

@dataclass
class _Doc:
    data: Any
    line: int  # where the document's content starts
    lines: dict[Pointer, int]  # pointer -> line of its key (or list item)
    texts: dict[Pointer, str]  # pointer -> scalar as written, to quote it back in messages
    errors: list[SpecError]  # found while reading, e.g. duplicate keys

    def line_of(self, pointer: Pointer) -> int:
        """Line of the pointer, or of its nearest written ancestor (defaults are unwritten)."""
        while pointer not in self.lines and pointer:
            pointer = pointer[:-1]
        return self.lines.get(pointer, self.line)

    def get(self, pointer: Pointer, default: Any = _MISSING) -> Any:
        node = self.data
        for part in pointer:
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def value(self, pointer: Pointer) -> Any:
        """What is written at `pointer`, else the schema's default there."""
        found = self.get(pointer)
        return schema_default(pointer) if found is _MISSING else found


def _key_value(node: Node) -> Any:
    if isinstance(node, ScalarNode):
        return SafeConstructor().construct_object(node, deep=True)
    return None


def _index(node: Node, pointer: Pointer, line: int, doc: _Doc, depth: int = 0) -> None:
    if pointer in doc.lines or depth > 64:  # aliases can share or nest nodes
        return
    doc.lines[pointer] = line
    if isinstance(node, ScalarNode):
        doc.texts[pointer] = node.value
    elif isinstance(node, MappingNode):
        # Reversed so that, as in the constructed dict, a later key (an override of a
        # `<<:` merge) is the one whose line we report.
        for key_node, value_node in reversed(node.value):
            key = _key_value(key_node)
            try:
                child = pointer + (key,)
                hash(child)
            except TypeError:
                continue
            _index(value_node, child, key_node.start_mark.line + 1, doc, depth + 1)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, pointer + (i,), item.start_mark.line + 1, doc, depth + 1)


def _duplicate_keys(root: Node, filename: str) -> list[SpecError]:
    """PyYAML keeps the last of two equal keys without a word; users mean one of them."""
    errors: list[SpecError] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                stack.append(value_node)
                if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    errors.append(SpecError(filename, line, (
                        f"key '{key_node.value}' appears twice in the same mapping (first on line "
                        f"{first[key_node.value]}); keep one of them")))
                else:
                    first[key_node.value] = line
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return errors


def _yaml_error(filename: str, exc: yaml.YAMLError) -> SpecError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else 0
    problem = getattr(exc, "problem", None) or str(exc)
    if "'\\t'" in problem:
        problem = "a tab is used for indentation; YAML needs spaces"
    elif problem == "mapping values are not allowed here":
        problem = ("unexpected ':' here; put quotes around a value that contains ': ', "
                   "or fix the indentation")
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return SpecError(filename, line, f"YAML syntax error: {detail}")


class _InputTooLarge(yaml.YAMLError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH (it recurses per level)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self.aliases: list[tuple[int, Node]] = []  # (line of the alias, the node it names)

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            self.aliases.append((event.start_mark.line + 1, node))
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _InputTooLarge(line, (
                    f"nested more than {MAX_DEPTH} levels deep; a Deployment needs only a few levels "
                    "(is a bracket or indentation runaway?)"))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _expansion_error(root: Node, aliases: list[tuple[int, Node]]) -> SpecError | None:
    """Aliases share nodes, so a small file can stand for a huge or very deep document.

    Counts the values and depth the document has once every alias is expanded, in one
    pass over its distinct nodes (memoised, iterative: no recursion to exhaust)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) when expanded
    stack: list[tuple[Node, bool]] = [(root, False)]
    visiting: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done and id(node) in visiting:  # `&a [*a]`: a value that contains itself
            line = next((ln for ln, target in aliases if target is node), node.start_mark.line + 1)
            return SpecError("", line, "this alias refers to a value that contains it (a recursive "
                             "structure); write the values out instead")
        kids = _children(node)
        if children_done:
            sizes[id(node)] = (1 + sum(sizes[id(k)][0] for k in kids),
                               1 + max((sizes[id(k)][1] for k in kids), default=0))
            continue
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    total, depth = sizes[id(root)]
    if total <= MAX_NODES and depth <= MAX_DEPTH:
        return None
    line, worst = max(aliases, key=lambda a: sizes.get(id(a[1]), (0, 0)),
                      default=(root.start_mark.line + 1, root))
    values, deep = sizes[id(worst)]
    if total > MAX_NODES:
        msg = (f"aliases expand this document to {total:,} values (at most {MAX_NODES:,} are read); "
               f"the alias here alone stands for {values:,}: write the values out instead of nesting aliases")
    else:
        msg = (f"aliases nest this document {depth} levels deep (at most {MAX_DEPTH}); the alias here "
               f"adds {deep}: write the values out instead of nesting aliases")
    return SpecError("", line, msg)


def _read_documents(text: str, filename: str) -> tuple[list[_Doc], list[SpecError]]:
    docs: list[_Doc] = []
    errors: list[SpecError] = []
    loader = _BoundedLoader(text)
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                loader.aliases = []
                node = loader.get_node()
            except _InputTooLarge as exc:
                errors.append(SpecError(filename, exc.line, exc.message))
                break
            except yaml.YAMLError as exc:
                # The parser cannot resynchronise after a syntax error: stop this file.
                errors.append(_yaml_error(filename, exc))
                break
            bomb = _expansion_error(node, loader.aliases)
            if bomb is not None:
                errors.append(SpecError(filename, bomb.line, bomb.message))
                continue
            duplicates = _duplicate_keys(node, filename)
            try:
                data = SafeConstructor().construct_document(node)
            except yaml.YAMLError as exc:
                errors += duplicates + [_yaml_error(filename, exc)]
                continue
            if data is None:  # empty document, e.g. a trailing '---'
                continue
            doc = _Doc(data, node.start_mark.line + 1, {}, {}, duplicates)
            _index(node, (), doc.line, doc)
            docs.append(doc)
    finally:
        loader.dispose()
    return docs, errors


# --- schema errors in plain words ----------------------------------------------------------

def _where(pointer: Pointer) -> str:
    out = ""
    for part in pointer:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the document"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"'{value}'"


_TYPE_WORDS = {
    "string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
    "object": "a mapping (indented key: value lines)", "array": "a list", "null": "empty",
}

# What a user most likely meant by an unquoted on/off/yes/no where text is expected.
_BOOLEAN_MEANS = {(("state",), False): "stopped", (("state",), True): "running"}

_REQUIRED_HINTS = {
    ("apiVersion",): f"add `apiVersion: {API_VERSION}` at the top of the document",
    ("kind",): f"add `kind: {KIND}`",
    ("metadata",): "add `metadata:` with at least `name:`",
    ("spec",): "add `spec:` with at least model, command and port",
    ("metadata", "name"): "add `name:` (lowercase letters, digits and '-', e.g. my-model)",
    ("spec", "model"): "add `model: {id: ..., version: ...}`",
    ("spec", "model", "id"): "add `id:` with the ID of the model to deploy",
    ("spec", "model", "version"): "add `version:` with the version of the model to deploy",
    ("spec", "command"): "add `command:` with the start command, e.g. `python api.py`",
    ("spec", "port"): "add `port:` with the port the service listens on, e.g. 8080",
    ("spec", "loadBalancer", "healthCheck", "path"): "add `path:`, e.g. /health",
}


def _closest(word: str, choices: Iterable[str]) -> str | None:
    choices = [c for c in choices if isinstance(c, str)]
    if not isinstance(word, str):
        return None
    # snake_case, kebab-case and case slips are the commonest misspellings of our keys.
    folded = re.sub(r"[-_ ]", "", word).lower()
    for choice in choices:
        if re.sub(r"[-_ ]", "", choice).lower() == folded:
            return choice
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None


def _name_suggestion(name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return slug or "my-model"


class _Translator:
    """Turns jsonschema errors into messages that say what to change."""

    def __init__(self, doc: _Doc, filename: str) -> None:
        self.doc = doc
        self.filename = filename
        self.done_required: set[Pointer] = set()

    def error(self, pointer: Pointer, message: str) -> SpecError:
        return SpecError(self.filename, self.doc.line_of(pointer), message)

    def translate(self, err: ValidationError) -> list[SpecError]:
        pointer = tuple(err.absolute_path)
        kw = err.validator
        if "propertyNames" in err.absolute_schema_path:
            return [self._property_name(pointer, err.instance)]
        handlers = {
            "required": self._required, "additionalProperties": self._additionalProperties,
            "const": self._const, "enum": self._enum, "type": self._type, "minimum": self._minimum,
            "maximum": self._maximum, "exclusiveMinimum": self._exclusiveMinimum,
            "minLength": self._minLength, "maxLength": self._maxLength, "minItems": self._minItems,
            "pattern": self._pattern, "anyOf": self._anyOf,
        }
        handler = handlers.get(kw)
        if handler is not None:
            return handler(pointer, err)
        # A keyword we have no words for yet: jsonschema's own message beats none.
        return [self.error(pointer, f"{_where(pointer)}: {err.message}")]

    def _required(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        if pointer in self.done_required:  # jsonschema yields one error per missing key
            return []
        self.done_required.add(pointer)
        out = []
        for key in err.validator_value:
            if key in err.instance:
                continue
            hint = _REQUIRED_HINTS.get(pointer + (key,), f"add `{key}:`")
            out.append(self.error(pointer, f"{_where(pointer)} is missing the required key '{key}'; {hint}"))
        return out

    def _additionalProperties(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        allowed = list(err.schema.get("properties", {}))
        out = []
        for key in err.instance:
            if key in allowed:
                continue
            msg = f"unknown key '{key}' in {_where(pointer)}"
            guess = _closest(key, allowed)
            homes = _key_homes().get(key, ())
            if guess:
                msg += f"; did you mean '{guess}'?"
            elif homes:
                msg += f"; '{key}' belongs under {' or '.join(homes)}"
            else:
                msg += f"; allowed keys here: {', '.join(allowed)}"
            out.append(self.error(pointer + (key,), msg))
        return out

    def _const(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        want, got = err.validator_value, err.instance
        msg = f"{_where(pointer)} must be {want}, not {_describe(got)}"
        if pointer == ("apiVersion",):
            msg += f"; this controller reads {API_VERSION} documents only"
        return [self.error(pointer, msg)]

    def _enum(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        choices = err.validator_value
        msg = f"{_where(pointer)} must be one of {', '.join(map(str, choices))}; found {_describe(err.instance)}"
        guess = _closest(err.instance, choices) if isinstance(err.instance, str) else None
        if guess:
            msg += f"; did you mean '{guess}'?"
        elif isinstance(err.instance, bool):
            written = self.doc.texts.get(pointer, str(err.instance).lower())
            meant = _BOOLEAN_MEANS.get((pointer[-1:], err.instance))
            msg += (f": YAML 1.1 reads {written} as a boolean, not text; "
                    + (f"write '{meant}'" if meant else f"put it in quotes: \"{written}\""))
        return [self.error(pointer, msg)]

    def _type(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        want = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        want = [w for w in want if w != "null"] or want
        words = " or ".join(_TYPE_WORDS.get(w, w) for w in want)
        got = err.instance
        where = _where(pointer)
        if not pointer:
            return [self.error(pointer, (
                "a Deployment document must be a mapping with apiVersion, kind, metadata and spec; "
                f"found {_describe(got)}"))]
        if got is None:
            msg = f"{where} has no value; write {words} after the ':', or remove the line"
        elif "string" in want and not isinstance(got, (dict, list)):
            written = self.doc.texts.get(pointer, str(got))
            msg = f"{where} must be text; put it in quotes: \"{written}\""
        else:
            msg = f"{where} must be {words}, not {_describe(got)}"
        return [self.error(pointer, msg)]

    def _bound(self, pointer: Pointer, err: ValidationError, relation: str) -> list[SpecError]:
        msg = f"{_where(pointer)} must be {relation} {err.validator_value}; found {err.instance}"
        if pointer[-1:] == ("maxReplicas",):
            msg += "; to run nothing, set spec.state: stopped"
        return [self.error(pointer, msg)]

    def _minimum(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return self._bound(pointer, err, "at least")

    def _maximum(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return self._bound(pointer, err, "at most")

    def _exclusiveMinimum(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return self._bound(pointer, err, "more than")

    def _minLength(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return [self.error(pointer, f"{_where(pointer)} is empty; give it a value or remove the line")]

    def _maxLength(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return [self.error(pointer, (
            f"{_where(pointer)} is {len(err.instance)} characters long; at most "
            f"{err.validator_value} are allowed"))]

    def _minItems(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        return [self.error(pointer, f"{_where(pointer)} is an empty list; give at least one value or remove it")]

    def _pattern(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        value, where = err.instance, _where(pointer)
        defs = load_schema()["$defs"]
        if err.validator_value == defs["duration"]["pattern"]:
            msg = f"{where}: '{value}' is not a duration; {DURATION_HINT}"
        elif err.validator_value == defs["countOrPercent"]["pattern"]:
            msg = f"{where} must be a whole number of instances (1) or a percentage from 0% to 100% (\"25%\"); found '{value}'"
        elif pointer == ("metadata", "name"):
            msg = (f"metadata.name '{value}' is not a DNS label: use lowercase letters, digits and '-', "
                   f"starting and ending with a letter or digit, e.g. '{_name_suggestion(value)}'")
        elif pointer == ("spec", "command"):
            msg = "spec.command is blank; write the start command, e.g. `python api.py`"
        elif pointer[-1:] == ("webhook",):
            msg = f"{where} must be an http:// or https:// URL, e.g. http://alerts.example:9000/hook; found '{value}'"
        elif pointer[-1:] == ("path",):
            msg = f"{where} must start with '/', e.g. /health; found '{value}'"
        else:
            msg = f"{where}: '{value}' does not match the pattern {err.validator_value}"
        return [self.error(pointer, msg)]

    def _property_name(self, pointer: Pointer, key: Any) -> SpecError:
        if pointer[-1:] == ("env",):
            msg = (f"env name '{key}' is not a valid environment variable name; use letters, digits "
                   "and '_', not starting with a digit (e.g. API_KEY)")
        else:
            msg = (f"{_where(pointer)} key '{key}' is not valid; use letters, digits, '-', '_', '.' "
                   "and '/', starting and ending with a letter or digit")
        return self.error(pointer + (key,), msg)

    def _anyOf(self, pointer: Pointer, err: ValidationError) -> list[SpecError]:
        if len(pointer) == 3 and pointer[:2] == ("spec", "env"):
            name = pointer[-1]
            value = err.instance
            if isinstance(value, dict):
                extra = ", ".join(str(k) for k in value if k != "secret")
                msg = (f"env {name}: a secret is written {{secret: CONFIG_KEY}} with a non-empty key"
                       + (f"; remove {extra}" if extra else ""))
            else:
                written = self.doc.texts.get(pointer, str(value))
                msg = (f"env {name} must be text or {{secret: CONFIG_KEY}}; put the value in quotes: "
                       f"\"{written}\"")
            return [self.error(pointer, msg)]
        return [self.error(pointer, f"{_where(pointer)}: {err.message}")]


# --- semantic checks ---------------------------------------------------------------------

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _duration(value: Any) -> float | None:
    try:
        return parse_duration(value)
    except (TypeError, ValueError):
        return None


def _semantic_errors(doc: _Doc, filename: str, require_image: bool) -> list[SpecError]:
    out: list[SpecError] = []
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("spec"), dict):
        return out

    def add(pointer: Pointer, message: str) -> None:
        out.append(SpecError(filename, doc.line_of(pointer), message))

    def written(*pointers: Pointer) -> Pointer:
        """The first pointer the user actually wrote, so the line points at their text."""
        for p in pointers:
            if p in doc.lines:
                return p
        return pointers[0]

    scaling = _SPEC + ("scaling",)
    lo, hi = doc.value(scaling + ("minReplicas",)), doc.value(scaling + ("maxReplicas",))
    if _num(lo) is not None and _num(hi) is not None and lo > hi:
        default = "" if scaling + ("maxReplicas",) in doc.lines else ", the default"
        add(written(scaling + ("minReplicas",)),
            f"spec.scaling.minReplicas ({lo}) is more than maxReplicas ({hi}{default}); "
            "raise maxReplicas or lower minReplicas")

    gpu = _SPEC + ("resources", "gpu")
    gpu_type, gpu_count = doc.value(gpu + ("type",)), doc.value(gpu + ("count",))
    if isinstance(gpu_type, str) and gpu_type and gpu_count == 0:
        add(gpu + ("type",), f"spec.resources.gpu.type is {gpu_type} but gpu.count is 0; set gpu.count "
            "to 1 or more, or remove gpu.type")

    hc = _SPEC + ("loadBalancer", "healthCheck")
    if isinstance(doc.get(hc, None), dict):
        interval = _num(doc.value(hc + ("intervalSeconds",)))
        timeout = _num(doc.value(hc + ("timeoutSeconds",)))
        if interval is not None and timeout is not None and timeout >= interval:
            add(written(hc + ("timeoutSeconds",), hc + ("intervalSeconds",)),
                f"spec.loadBalancer.healthCheck.timeoutSeconds ({timeout:g}) must be less than intervalSeconds "
                f"({interval:g}); lower the timeout or check less often")

    steps = doc.get(_SPEC + ("rollout", "steps"), None)
    # Only judge the order of well-formed steps; the schema already reports the others.
    if isinstance(steps, list) and steps and all(_num(s) is not None and 1 <= s <= 100 for s in steps):
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                add(_SPEC + ("rollout", "steps", i),
                    f"spec.rollout.steps must increase strictly: {steps[i]} comes after {steps[i - 1]}")
        if steps[-1] != 100:
            add(_SPEC + ("rollout", "steps", len(steps) - 1),
                f"spec.rollout.steps must end at 100 (all traffic on the new revision); it ends at {steps[-1]}")

    auto = scaling + ("autoscaling",)
    targets = ("targetConcurrency", "targetCpuUtilization", "targetMemoryUtilization", "targetGpuUtilization")
    if doc.get(auto + ("enabled",), False) is True and all(
            doc.get(auto + (t,), None) is None for t in targets):
        add(auto + ("enabled",), "spec.scaling.autoscaling is enabled but has no target; set at least one of "
            + ", ".join(targets))
    panic = _duration(doc.value(auto + ("panicWindow",)))
    stable = _duration(doc.value(auto + ("stableWindow",)))
    if panic is not None and stable is not None and panic >= stable:
        add(written(auto + ("panicWindow",), auto + ("stableWindow",)),
            f"spec.scaling.autoscaling.panicWindow ({panic:g}s) must be shorter than stableWindow ({stable:g}s)")

    if _duration(doc.value(_SPEC + ("requestTimeout",))) == 0:
        add(_SPEC + ("requestTimeout",), "spec.requestTimeout is 0, so every request would time out; give "
            "instances time to answer, e.g. 300s")

    if _duration(doc.value(scaling + ("startTimeout",))) == 0:
        add(scaling + ("startTimeout",), "spec.scaling.startTimeout is 0; give instances time to start, e.g. 300s")

    tunnel = _duration(doc.value(_SPEC + ("tunnelTimeout",)))
    tunnel_idle = _duration(doc.value(_SPEC + ("tunnelIdleTimeout",)))
    if tunnel == 0 or tunnel_idle == 0:
        add(_SPEC + (("tunnelTimeout",) if tunnel == 0 else ("tunnelIdleTimeout",)),
            "spec.tunnelTimeout and spec.tunnelIdleTimeout must be more than 0, e.g. 1h and 5m")
    elif tunnel is not None and tunnel_idle is not None and tunnel_idle > tunnel:
        add(written(_SPEC + ("tunnelIdleTimeout",), _SPEC + ("tunnelTimeout",)),
            f"spec.tunnelIdleTimeout ({tunnel_idle:g}s) is longer than spec.tunnelTimeout ({tunnel:g}s), "
            "so it could never apply; shorten it")

    rollout = _SPEC + ("rollout",)
    surge, unavailable = doc.value(rollout + ("maxSurge",)), doc.value(rollout + ("maxUnavailable",))
    if surge in (0, "0%") and unavailable in (0, "0%") and not isinstance(surge, bool):
        add(written(rollout + ("maxUnavailable",), rollout + ("maxSurge",)),
            "spec.rollout.maxSurge and maxUnavailable are both 0, so a rolling update could never replace "
            "an instance; allow at least one, e.g. maxSurge: 1")

    alerts = doc.get(_SPEC + ("alerts",), None)
    if isinstance(alerts, list):
        for i, rule in enumerate(alerts):
            if isinstance(rule, dict) and rule.get("metric") == "errorRate" and _num(rule.get("above")) is not None \
                    and rule["above"] > 100:
                add(_SPEC + ("alerts", i, "above"), f"spec.alerts[{i}].above is {rule['above']:g} but errorRate is a "
                    "percentage (0-100); e.g. above: 5 fires above 5 % failed requests")

    if require_image and doc.get(_SPEC + ("image",), None) is None:
        add(written(_SPEC + ("image",), _SPEC),
            "spec.image is required by the docker and pulumi drivers; add `image: NAME:TAG` "
            "(an image already on the Docker engine: nothing is pulled)")
    return out


# --- conversion ----------------------------------------------------------------------------

def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _to_deployment(doc: _Doc, filename: str) -> Deployment:
    """Only called on documents without errors, so the schema's shape holds here."""
    data: dict[str, Any] = doc.data
    full = with_defaults(data)  # every default from the schema, the document itself untouched
    meta, spec = full["metadata"], full["spec"]
    res, sc, lb, ro = spec["resources"], spec["scaling"], spec["loadBalancer"], spec["rollout"]
    gpu, au, hc, analysis = res["gpu"], sc["autoscaling"], lb.get("healthCheck"), ro["analysis"]
    env = spec["env"]
    return Deployment(
        name=meta["name"],
        model_id=spec["model"]["id"],
        model_version=spec["model"]["version"],
        command=spec["command"],
        port=int(spec["port"]),
        description=meta["description"],
        environment=meta["environment"],
        labels=dict(meta["labels"]),
        image=spec["image"],
        env={k: v for k, v in env.items() if isinstance(v, str)},
        secret_env={k: v["secret"] for k, v in env.items() if isinstance(v, dict)},
        secret_lines={k: doc.line_of(("spec", "env", k)) for k, v in env.items() if isinstance(v, dict)},
        access=spec.get("access", "public"),
        resources=Resources(
            cpu=_opt_float(res["cpu"]),
            memory_gb=_opt_float(res["memoryGb"]),
            gpu=GpuSpec(count=int(gpu["count"]), type=gpu["type"]),
            storage_gb=_opt_float(res["storageGb"]),
            bandwidth_mbps=_opt_float(res["bandwidthMbps"]),
        ),
        scaling=Scaling(
            min_replicas=int(sc["minReplicas"]),
            max_replicas=int(sc["maxReplicas"]),
            idle_timeout_s=parse_duration(sc["idleTimeout"]),
            autoscaling=Autoscaling(
                enabled=bool(au["enabled"]),
                target_concurrency=_opt_float(au["targetConcurrency"]),
                target_cpu_utilization=_opt_float(au["targetCpuUtilization"]),
                target_memory_utilization=_opt_float(au["targetMemoryUtilization"]),
                target_gpu_utilization=_opt_float(au["targetGpuUtilization"]),
                stable_window_s=parse_duration(au["stableWindow"]),
                panic_window_s=parse_duration(au["panicWindow"]),
                panic_threshold=float(au["panicThreshold"]),
                scale_down_delay_s=parse_duration(au["scaleDownDelay"]),
            ),
        ),
        load_balancer=LoadBalancer(
            algorithm=lb["algorithm"],
            sticky_sessions=bool(lb["stickySessions"]),
            health_check=None if hc is None else HealthCheck(
                path=hc["path"],
                interval_s=float(hc["intervalSeconds"]),
                timeout_s=float(hc["timeoutSeconds"]),
                failure_threshold=int(hc["failureThreshold"]),
            ),
        ),
        rollout=Rollout(
            strategy=ro["strategy"],
            # Counts are kept as text ("1") beside percentages ("25%"): one type for policy code.
            max_surge=str(ro["maxSurge"]),
            max_unavailable=str(ro["maxUnavailable"]),
            canary_steps=tuple(int(s) for s in ro["steps"]),
            step_pause_s=parse_duration(ro["stepPause"]),
            keep_old_s=parse_duration(ro["keepOldFor"]),
            min_requests=int(analysis["minRequests"]),
            max_error_rate_increase=float(analysis["maxErrorRateIncrease"]) / 100.0,
            max_p99_ratio=float(analysis["maxP99Ratio"]),
            p99_tolerance_ms=float(analysis["p99ToleranceMs"]),
        ),
        state=spec["state"],
        node_selector=dict(spec["placement"]["nodeSelector"]),
        alerts=tuple(AlertRule(metric=a["metric"], above=float(a["above"]), for_s=parse_duration(a["for"]),
                               webhook=(a.get("notify") or {}).get("webhook"), line=doc.line_of(("spec", "alerts", i)))
                     for i, a in enumerate(spec["alerts"])),
        start_timeout_s=parse_duration(sc["startTimeout"]),
        request_timeout_s=parse_duration(spec["requestTimeout"]),
        protocol=spec["protocol"],
        tunnel_timeout_s=parse_duration(spec["tunnelTimeout"]),
        tunnel_idle_timeout_s=parse_duration(spec["tunnelIdleTimeout"]),
        source_file=filename,
        source_line=doc.line,
        raw=data,
    )


# --- the loader ----------------------------------------------------------------------------

class _Session:
    """One load: names must be unique across every file it reads.

    Documents are checked file by file; names are settled at the end, so that the file
    that already serves a name (`owners`) keeps it whichever file sorts first."""

    def __init__(self, require_image: bool, owners: Mapping[str, str] | None = None,
                 local_gateway_port: int | None = None) -> None:
        self.require_image = require_image
        self.owners = dict(owners or {})
        self.local_gateway_port = local_gateway_port
        self.result = LoadResult([], [], [])
        self._errors: dict[str, list[SpecError]] = {}  # file -> its errors, in file order
        self._valid: list[tuple[_Doc, str]] = []  # documents without errors of their own

    def add_text(self, text: str, filename: str) -> None:
        self.result.files.append(filename)
        docs, errors = _read_documents(text, filename)
        if not docs and not errors:
            self.result.warnings.append(SpecError(filename, 0, (
                "is empty (no YAML document in it); nothing is deployed from it: write a Deployment "
                "or delete the file")))
        for doc in docs:
            translator = _Translator(doc, filename)
            doc_errors = list(doc.errors)
            doc_errors += [e for err in _validator().iter_errors(doc.data) for e in translator.translate(err)]
            doc_errors += _semantic_errors(doc, filename, self.require_image)
            errors += doc_errors
            if not doc_errors:
                self._valid.append((doc, filename))
                if self.local_gateway_port is not None:
                    self.result.warnings += _port_trap(doc, filename, self.local_gateway_port)
        self._errors.setdefault(filename, []).extend(errors)

    def add_error(self, error: SpecError) -> None:
        self.result.files.append(error.file)
        self._errors.setdefault(error.file, []).append(error)

    def finish(self) -> LoadResult:
        """Settle names (the serving file first, else the first file) and convert the winners."""
        first: dict[str, tuple[str, int]] = {}
        named = [(doc, f, doc.get(("metadata", "name"), None)) for doc, f in self._valid]
        for doc, f, name in sorted(named, key=lambda x: self.owners.get(x[2]) != x[1]):
            first.setdefault(name, (f, doc.line_of(("metadata", "name"))))
        for name, file in self.owners.items():
            # The serving file has errors now: it keeps its name until it is fixed or drops it.
            if name in first and first[name][0] != file and self._errors.get(file):
                first[name] = (file, 0)
        for doc, f, name in named:
            line = doc.line_of(("metadata", "name"))
            owner_file, owner_line = first[name]
            if owner_line == 0:
                self._errors.setdefault(f, []).append(SpecError(f, line, (
                    f"metadata.name '{name}' is served from {owner_file}, which has errors now; fix that "
                    "file (its last good revision keeps serving), or rename this one")))
                continue
            if (owner_file, owner_line) == (f, line):
                self.result.deployments.append(_to_deployment(doc, f))
                continue
            serving = " (the file that serves it now)" if self.owners.get(name) == owner_file else ""
            self._errors.setdefault(f, []).append(SpecError(f, line, (
                f"metadata.name '{name}' is already used by {owner_file}:{owner_line}{serving}; names must "
                "be unique across all files")))
        for errors in self._errors.values():
            self.result.errors += sorted(errors, key=lambda e: e.line)
        return self.result

    def add_path(self, path: Path, shown: str) -> None:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                self.add_error(SpecError(shown, 0, (
                    f"is larger than {MAX_FILE_BYTES // 1024} KiB, the most a Deployment file may hold; "
                    "split it into several files")))
                return
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.add_error(SpecError(shown, 0, "is not UTF-8 text; save it as UTF-8"))
            return
        except OSError as exc:
            self.add_error(SpecError(shown, 0, f"cannot be read: {exc.strerror or exc}"))
            return
        self.add_text(text, shown)


def _port_trap(doc: _Doc, filename: str, gateway_port: int) -> list[SpecError]:
    """The local driver gives each instance a free port in PORT; a command that ignores it
    listens on spec.port, where only one process can, and which may be the gateway's own."""
    command, port = doc.get(_SPEC + ("command",), ""), doc.get(_SPEC + ("port",), None)
    if not isinstance(command, str) or _PORT_REF.search(command) or not isinstance(port, int):
        return []
    fix = ("use ${PORT} in spec.command (e.g. `python api.py --port ${PORT}`) so that each local "
           "instance gets its own free port")
    out = []
    if port == gateway_port:
        out.append(SpecError(filename, doc.line_of(_SPEC + ("port",)), (
            f"spec.command does not use ${{PORT}}, so with the local driver the service listens on "
            f"spec.port {port}, the gateway's own port: it cannot start there; {fix}")))
    most = doc.get(_SPEC + ("scaling", "maxReplicas"), 1)
    if isinstance(most, int) and most > 1:
        out.append(SpecError(filename, doc.line_of(_SPEC + ("scaling", "maxReplicas")), (
            f"spec.command does not use ${{PORT}}, so with the local driver every instance listens on "
            f"spec.port {port} and only one of maxReplicas {most} can run; {fix}")))
    return out


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        found = (sorted(p for p in path.iterdir() if p.is_file() and p.suffix in YAML_SUFFIXES)
                 if path.is_dir() else [path])
        for f in found:
            key = f.resolve()
            if key not in seen:  # `deployments/ deployments/x.yaml` must not clash with itself
                seen.add(key)
                files.append(f)
    return files


def load_paths(paths: Sequence[str | Path], require_image: bool = False,
               owners: Mapping[str, str] | None = None, local_gateway_port: int | None = None) -> LoadResult:
    """Load files and directories (their *.yaml / *.yml, sorted, not recursive).

    `require_image` is for the docker and pulumi drivers, which cannot run a spec without one.
    `owners` (name -> file) are the files that serve each name now: a newcomer reusing a name
    is the duplicate, whichever sorts first. `local_gateway_port`: warn about commands that
    ignore ${PORT} (the local driver's trap) against this gateway port.
    """
    session = _Session(require_image, owners, local_gateway_port)
    for path in _expand(paths):
        session.add_path(path, str(path))
    return session.finish()


def load_text(text: str, filename: str, require_image: bool = False) -> LoadResult:
    session = _Session(require_image)
    session.add_text(text, filename)
    return session.finish()


def load_texts(items: Sequence[tuple[str, str]], require_image: bool = False,
               unreadable: Sequence[SpecError] = (), owners: Mapping[str, str] | None = None,
               local_gateway_port: int | None = None) -> LoadResult:
    """Load (filename, text) pairs as one set, as `load_paths` loads a folder: names must be
    unique across them. A git source reads its files from a commit this way; `unreadable`
    are the files it could not read (not UTF-8, too large), reported with the rest."""
    session = _Session(require_image, owners, local_gateway_port)
    for filename, text in items:
        session.add_text(text, filename)
    for err in unreadable:
        session.add_error(err)
    return session.finish()
