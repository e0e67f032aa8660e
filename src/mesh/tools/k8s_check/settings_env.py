"""What the mesh's processes read from their environment, for the checks of the manifests' ``MESH_*``
variables: the settings class each workload runs, the variables that class reads, and its defaults.

Everything comes from :mod:`mesh.kit.settings` and the services' own settings classes, so a setting added,
renamed or removed there is known here without a list to update.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

from mesh.kit.settings import (
    ENV_PREFIX,
    FOREIGN_PREFIXES,
    OTHER_VARIABLES,
    CommonSettings,
    mesh_settings_classes,
    settings_warnings,
    variable_names,
)
from mesh.tools.k8s_check.render import Manifest

SERVICES_PACKAGE = "mesh.services"


@functools.cache
def _classes_by_module() -> dict[str, type[CommonSettings]]:
    """``mesh.services.file`` -> ``FileSettings``: the class defined in each service's ``settings`` module."""
    return {cls.__module__.removesuffix(".settings"): cls for cls in mesh_settings_classes()}


def service_module(workload_name: str, containers: Iterable[Manifest]) -> str:
    """The module a workload runs: the ``-m MODULE`` of a container's command or args when the manifest
    overrides the image's, else the service named like the workload (``image-processing`` runs
    ``mesh.services.image_processing``), as each image's CMD does (``mesh.tools.k8s_check.dockerfile``)."""
    for container in containers:
        words = [str(word) for word in [*container.get("command", []), *container.get("args", [])]]
        for flag, module in itertools.pairwise(words):
            if flag == "-m":
                return module
    return f"{SERVICES_PACKAGE}.{workload_name.replace('-', '_')}"


def settings_of(module: str) -> type[CommonSettings] | None:
    """The settings class the service in ``module`` runs with, or None for a module that is no mesh service."""
    return _classes_by_module().get(module)


@functools.cache
def read_variables(cls: type[CommonSettings]) -> frozenset[str]:
    """Every variable a process with settings ``cls`` reads: its fields' names and deprecated names, and the
    kit's other ``MESH_*`` variables."""
    names = {name for field in cls.model_fields for name in variable_names(cls, field)}
    return frozenset(names | OTHER_VARIABLES)


def is_setting_name(variable: str) -> bool:
    """Whether ``variable`` is in the settings' namespace (``MESH_*`` but not the tests' or benchmarks')."""
    upper = variable.upper()
    return upper.startswith(ENV_PREFIX) and not upper.startswith(FOREIGN_PREFIXES)


def setting_variable(cls: type[CommonSettings], field: str) -> str | None:
    """The variable of ``field`` (``MESH_GRPC_PORT`` for ``grpc_port``), or None when ``cls`` has no such
    field (the gateway serves no gRPC)."""
    return variable_names(cls, field)[0] if field in cls.model_fields else None


def default_int(cls: type[CommonSettings], field: str) -> int | None:
    """The integer default of ``field`` in ``cls`` (each service's own port, as CONTRACT.md lists them)."""
    default = cls.model_fields[field].default
    return default if isinstance(default, int) else None


def why_unread(variable: str) -> str:
    """Why ``variable`` reaches no process: mesh.kit.settings' own warning (not a setting of the mesh, with the
    closest name that is), or the services whose settings it is."""
    for line in settings_warnings({variable: ""}):
        return line.removeprefix("warning: ")
    readers = sorted(cls.__name__ for cls in _classes_by_module().values() if variable in read_variables(cls))
    return f"{variable} is a setting of {', '.join(readers)} only"
