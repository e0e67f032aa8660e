"""The gateway's routers, one module per resource."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class ResourceName(Convertor[str]):
    """A path segment without ``:``, so that ``/v1/jobs/{id}`` does not also match the custom methods
    ``/v1/jobs/{id}:cancel`` (GET there was a 400 about the id, and 405s listed GET as allowed)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("name", ResourceName())
