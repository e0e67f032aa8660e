"""Health of the inference service: serving only while at least one model version is ready."""

from __future__ import annotations

from mesh.kit.health import FunctionCheck
from mesh.services.inference.repository import ModelRepository


def models_check(repository: ModelRepository) -> FunctionCheck:
    """A dependency check that fails, naming each version and why, while no model version is ready."""

    async def probe() -> str:
        ready = [f"{v.name}/{v.version}" for v in repository.versions() if v.ready]
        # The device is chosen once per process; health says which, as every response does.
        if not ready:
            states = {f"{v.name}/{v.version}": v.status()[1] for v in repository.versions()}
            raise RuntimeError(f"no model is ready: {states}")
        return f"ready on {repository.device}: {', '.join(ready)}"

    return FunctionCheck("models", probe)
