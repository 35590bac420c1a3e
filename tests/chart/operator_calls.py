"""Every Kubernetes API call the operator can make, derived from its code: what the chart's RBAC
must grant, and all it may grant.

Two sources, both read from the code rather than listed by hand:

* Tolaria's own calls. Every call goes through the `protocols.Kube` seam (`kube.KubeApi`), held
  as `ctx.kube` or `self._kube`. The operator's modules are parsed, and each call of a `Kube`
  method on such a receiver is resolved to the `resources.Resource` it is given: a module
  constant (`PODS`), or, when the argument is computed (a loop variable, a lookup table), every
  Resource the enclosing function refers to, directly or through a module-level table of them
  (an over-approximation, never an omission). `patch(..., subresource="status")` is the
  `<plural>/status` subresource. A `Resource` marked `home` (the operator's token-key Secret)
  is needed in the operator's own namespace only. A call that cannot be resolved is
  reported, never skipped.
* kopf's calls on the operator's behalf, from kopf's registry after `tolaria_operator.handlers`
  registered the handlers, and from kopf's settings as `lifecycle.configure_kopf` leaves them:
  every watched resource is listed and watched; a resource with state-keeping handlers
  (create/update/delete/resume, timers, daemons) is patched, for kopf's finalizer and its
  progress and diff-base annotations (`configure_kopf` keeps both in annotations, so kopf never
  writes status); Events are created when posting is on (and `kopf.event` is called); CRDs are
  listed and watched while scanning is on (kopf follows CRDs to serve a run kind whose CRD
  arrives after it started); namespaces are listed and watched only when kopf is given
  namespaces, never with --all-namespaces; nothing for peering, which --standalone turns off.
  These rules are kopf's behaviour (kopf/_core/reactor/observation.py and friends in kopf 1.45).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

import tolaria_operator
import tolaria_operator.handlers  # registers the handlers in kopf's default registry
from tolaria_operator import protocols
from tolaria_operator.kube import KubeApi
from tolaria_operator.lifecycle import configure_kopf
from tolaria_operator.resources import Resource

PACKAGE_DIR = Path(tolaria_operator.__file__).parent
RECEIVERS = {"kube", "_kube"}
"""The names a `Kube` is held under in the operator (`ctx.kube`, `self._kube`)."""
VERBS = {
    "get": "get",
    "list": "list",
    "create": "create",
    "patch": "patch",
    "delete": "delete",
    "list_with_version": "list",
    "watch": "watch",
}
"""`protocols.Kube` method (and `kube.KubeApi`'s list-then-watch pair) -> the RBAC verb of the
request it sends."""
INFORMER_RESOURCE = "_resource"
"""What `informer.Informer` calls the resource it lists and watches: resolved to the Resource
constants every `Informer(api, RESOURCE, ...)` in the package is built with."""


@dataclass(frozen=True, order=True)
class Need:
    """One permission: an API group, a resource (or `<plural>/<subresource>`), a verb, and
    whether the resource is namespaced (granted per namespace) or cluster-scoped, and whether
    it is needed in the operator's own namespace only (`home`)."""

    group: str
    resource: str
    verb: str
    namespaced: bool
    home: bool = False


@dataclass(frozen=True)
class Call:
    """Where a need comes from (for failure messages)."""

    need: Need
    where: str


def kube_methods() -> set[str]:
    """The methods of the `Kube` seam and of `KubeApi` that send requests (what the scan maps
    to verbs)."""
    return {
        name
        for cls in (protocols.Kube, KubeApi)
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member) and name != "close"
    }


def _resources_in(value: Any) -> list[Resource]:
    if isinstance(value, Resource):
        return [value]
    if (
        isinstance(value, Mapping)
        and value
        and all(isinstance(v, Resource) for v in value.values())
    ):
        return list(value.values())
    is_collection = isinstance(value, tuple | list | frozenset | set) and bool(value)
    if is_collection and all(isinstance(v, Resource) for v in value):
        return list(value)
    return []


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _receiver(func: ast.expr) -> str | None:
    """The `Kube` method a call invokes, when its receiver is a `Kube` (else None)."""
    if not isinstance(func, ast.Attribute) or func.attr not in VERBS:
        return None
    target = func.value
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
    return func.attr if name in RECEIVERS else None


def _need(resource: Resource, verb: str, subresource: str) -> Need:
    plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
    return Need(resource.group, plural, verb, resource.namespaced, resource.home)


def informer_resources() -> list[Resource]:
    """The Resources given to `Informer(...)` as its second argument, anywhere in the package."""
    found: list[Resource] = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        module = importlib.import_module(f"tolaria_operator.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "Informer"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Name)
            ):
                found += _resources_in(getattr(module, node.args[1].id, None))
    return found


def tolaria_calls() -> tuple[list[Call], list[str]]:
    """Tolaria's own calls, and the call sites that could not be resolved."""
    calls: list[Call] = []
    unresolved: list[str] = []
    informed = informer_resources()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        module = importlib.import_module(f"tolaria_operator.{path.stem}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in _functions(tree):
            referenced = [
                r
                for node in ast.walk(function)
                if isinstance(node, ast.Name)
                for r in _resources_in(getattr(module, node.id, None))
            ]
            for node in ast.walk(function):
                if not isinstance(node, ast.Call) or (method := _receiver(node.func)) is None:
                    continue
                where = f"{path.name}:{node.lineno}"
                first = node.args[0] if node.args else None
                direct = (
                    _resources_in(getattr(module, first.id, None))
                    if isinstance(first, ast.Name)
                    else []
                )
                candidates = direct if len(direct) == 1 else sorted(set(referenced), key=str)
                if isinstance(first, ast.Attribute) and first.attr == INFORMER_RESOURCE:
                    candidates = informed
                if not candidates:
                    unresolved.append(f"{where}: {ast.unparse(node)}")
                    continue
                subresource = next(
                    (
                        k.value.value
                        for k in node.keywords
                        if k.arg == "subresource" and isinstance(k.value, ast.Constant)
                    ),
                    "",
                )
                calls += [
                    Call(_need(r, VERBS[method], str(subresource)), where) for r in candidates
                ]
    return calls, unresolved


def calls_the_scan_misses() -> list[str]:
    """`Kube` method calls on a receiver the scan does not read: a `Kube`/`KubeApi` held under
    another name (a parameter, attribute or variable annotated with it) and called there, or
    any get/list/create/patch/delete given a `Resource` constant on another receiver."""
    missed: list[str] = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        module = importlib.import_module(f"tolaria_operator.{path.stem}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        holders = set()
        for node in ast.walk(tree):
            annotation, target = None, ""
            if isinstance(node, ast.arg):
                annotation, target = node.annotation, node.arg
            elif isinstance(node, ast.AnnAssign):
                annotation, target = node.annotation, ast.unparse(node.target).split(".")[-1]
            text = ast.unparse(annotation) if annotation is not None else ""
            if {"Kube", "KubeApi"} & set(text.replace("|", " ").split()):
                holders.add(target)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr not in VERBS or _receiver(node.func) is not None:
                continue
            value = node.func.value
            name = value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", "")
            first = node.args[0] if node.args else None
            given_resource = isinstance(first, ast.Name) and bool(
                _resources_in(getattr(module, first.id, None))
            )
            if name in holders or given_resource:
                missed.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return missed


# kopf's own resources (kopf._cogs.structs.references: CRDS, NAMESPACES, EVENTS).
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions", False)
NAMESPACES = ("", "namespaces", False)
EVENTS = ("", "events", True)


def _selector_need(selector: Any, verb: str) -> Need:
    """A handler's resource; the handlers name resources by plural (checked by a test)."""
    scoped = {(r.group, r.plural): r.namespaced for r in _module_resources()}
    key = (selector.group or "", selector.any_name)
    return Need(key[0], key[1], verb, scoped[key])


def _module_resources() -> list[Resource]:
    from tolaria_operator import resources

    return [v for v in vars(resources).values() if isinstance(v, Resource)]


def kopf_selectors() -> list[Any]:
    """The selectors of every resource handler kopf has registered for the operator."""
    registry = kopf.get_default_registry()
    handlers = [
        *registry._watching.get_all_handlers(),
        *registry._changing.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
        *registry._indexing.get_all_handlers(),
        *registry._webhooks.get_all_handlers(),
    ]
    return [h.selector for h in handlers if h.selector is not None]


def kopf_calls(*, all_namespaces: bool) -> list[Call]:
    """kopf's calls for the operator (see the module docstring)."""
    registry = kopf.get_default_registry()
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    calls: list[Call] = []
    for selector in kopf_selectors():
        calls += [
            Call(_selector_need(selector, verb), "kopf watches handled resources")
            for verb in ("list", "watch")
        ]
    state_keeping = [
        *registry._changing.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
    ]
    for handler in state_keeping:
        assert handler.selector is not None
        calls.append(
            Call(
                _selector_need(handler.selector, "patch"),
                f"kopf finalizer/annotations: {handler.id}",
            )
        )
    if settings.persistence.progress_storage.__class__.__name__ != "AnnotationsProgressStorage":
        raise AssertionError("kopf keeps progress outside annotations: it would patch status too")
    if settings.posting.enabled:
        calls.append(Call(Need(EVENTS[0], EVENTS[1], "create", EVENTS[2]), "kopf posts Events"))
    if not settings.scanning.disabled:
        calls += [
            Call(Need(*CRDS[:2], verb, CRDS[2]), "kopf follows CRDs") for verb in ("list", "watch")
        ]
        if not all_namespaces:
            calls += [
                Call(Need(*NAMESPACES[:2], verb, NAMESPACES[2]), "kopf follows namespaces")
                for verb in ("list", "watch")
            ]
    return calls


def kopf_event_calls() -> list[Call]:
    """`kopf.event` and its siblings post Events through the API (core/v1 events, create)."""
    calls = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "kopf"
                and node.func.attr in ("event", "info", "warn", "exception")
            ):
                where = f"{path.name}:{node.lineno}"
                calls.append(Call(Need(EVENTS[0], EVENTS[1], "create", EVENTS[2]), where))
    return calls


def operator_needs(*, all_namespaces: bool) -> dict[Need, list[str]]:
    """Every permission the operator needs, with where each need comes from."""
    own, unresolved = tolaria_calls()
    if unresolved:
        raise AssertionError(f"calls the scan cannot resolve: {unresolved}")
    needs: dict[Need, list[str]] = {}
    for call in [*own, *kopf_calls(all_namespaces=all_namespaces), *kopf_event_calls()]:
        needs.setdefault(call.need, []).append(call.where)
    return needs
