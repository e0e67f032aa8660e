"""Write the README's settings tables from the settings classes and their field docstrings, or check them.

    python scripts/settings_table.py          # rewrite the tables in README.md
    python scripts/settings_table.py --check  # exit 1 when README.md's tables are not what this would write

The tables sit between two markers in README.md's "Configuration" section: the settings every process reads,
those of each kit mixin that some processes read (the calls, RabbitMQ, the blob store, the device), those of
every gRPC service, those of the job workers, then each service's own. A setting a service declares
again (its ports, or one with a default of its own) is listed under that service with that default, and under
a shared table only while some service still takes it from there. ``tests/deploy`` runs ``--check``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pydantic_settings import BaseSettings  # noqa: E402

from mesh.kit.settings import (  # noqa: E402
    BlobSettings,
    BrokerSettings,
    CallerSettings,
    CommonSettings,
    DeviceSettings,
    FileServiceAddress,
    ImageServiceAddress,
    InferenceServiceAddress,
    QueueServiceAddress,
    ServerSettings,
    WorkerSettings,
    mesh_settings_classes,
    variable_names,
)

README = ROOT / "README.md"
BEGIN = "<!-- settings tables: written by scripts/settings_table.py from the settings classes; edit those -->"
END = "<!-- end of the settings tables -->"

SHARED = [
    (CommonSettings, "Every process"),
    (CallerSettings, "Every process that calls another service (all but the file service)"),
    (FileServiceAddress, "Callers of the file service (gateway, image processing, inference, queue)"),
    (ImageServiceAddress, "Callers of the image processing service (gateway)"),
    (InferenceServiceAddress, "Callers of the inference service (gateway, image processing, queue)"),
    (QueueServiceAddress, "Callers of the queue service (gateway)"),
    (BrokerSettings, "RabbitMQ (queue, image processing, inference)"),
    (BlobSettings, "The blob store (file)"),
    (DeviceSettings, "The compute device (image processing, inference)"),
    (ServerSettings, "Every gRPC service (all but the gateway)"),
    (WorkerSettings, "The job workers (image processing, inference)"),
]


def own_fields(cls: type[BaseSettings]) -> list[str]:
    """The fields ``cls`` declares itself (new ones and ones it redefines), in declaration order."""
    return [name for name in vars(cls).get("__annotations__", {}) if name in cls.model_fields]


def declared_by(cls: type[BaseSettings], field: str) -> type:
    """The class in ``cls``'s ancestry whose declaration of ``field`` it uses."""
    return next(c for c in cls.__mro__ if field in vars(c).get("__annotations__", {}))


def default_text(cls: type[BaseSettings], field: str) -> str:
    value = cls.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool | list):
        text = json.dumps(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    text = f"`{text}`"
    if field.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value % size == 0:
                return f"{text} ({value // size} {unit})"
    return text


def meaning_text(cls: type[BaseSettings], field: str) -> str:
    description = cls.model_fields[field].description
    if not description:
        raise SystemExit(f"{declared_by(cls, field).__name__}.{field} has no docstring to document it with")
    return re.sub(r"\s+", " ", description).replace("``", "`").replace("|", "\\|").strip()


def row(cls: type[BaseSettings], field: str) -> str:
    name, *old_names = variable_names(cls, field)
    variable = f"`{name}`" + "".join(f" (or the deprecated `{old}`)" for old in old_names)
    return f"| {variable} | {default_text(cls, field)} | {meaning_text(cls, field)} |"


def table(title: str, cls: type[BaseSettings], fields: list[str]) -> list[str]:
    return [f"### {title}", "", "| variable | default | meaning |", "| --- | --- | --- |"] + [
        row(cls, field) for field in fields
    ]


def tables() -> str:
    """The Markdown between the markers."""
    services = mesh_settings_classes()
    lines: list[str] = []
    for base, title in SHARED:
        # A shared setting every service redeclares (the ports) is documented under each service instead.
        fields = [
            f
            for f in own_fields(base)
            if any(issubclass(s, base) and declared_by(s, f) is base for s in services)
        ]
        lines += [*table(title, base, fields), ""]
    for service in services:
        package = service.__module__.split(".")[2]
        title = f"{package.replace('_', ' ')} (`python -m mesh.services.{package}`)"
        lines += [*table(title, service, own_fields(service)), ""]
    return "\n".join(lines).strip()


def with_tables(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`tables`."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return f"{readme[:start]}\n\n{tables()}\n\n{readme[end:]}"


def main() -> int:
    current = README.read_text()
    wanted = with_tables(current)
    if "--check" in sys.argv[1:]:
        if current != wanted:
            print(
                "README.md's settings tables differ from the settings classes: run python scripts/settings_table.py",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
