"""Static checks of deploy/docker/Dockerfile (Docker does not run everywhere the tests do).

Pinned bases (a version tag or a digest, never ``latest``), a non-root ``USER`` in every service target,
dependencies from the same ``requirements.lock`` as ``make up``, code generated at build time, and CUDA targets
on an ``nvidia/cuda`` base with CuPy and every other CUDA-only requirement pinned exactly.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mesh.tools.k8s_check.policy import Violation
from mesh.tools.k8s_check.render import split_image

# Target -> the module its CMD must run.
SERVICE_TARGETS = {
    "file": "mesh.services.file",
    "queue": "mesh.services.queue",
    "gateway": "mesh.services.gateway",
    "image-processing": "mesh.services.image_processing",
    "inference": "mesh.services.inference",
    "image-processing-cuda": "mesh.services.image_processing",
    "inference-cuda": "mesh.services.inference",
}
CUDA_BASE = "nvidia/cuda"
PINNED_TAG = re.compile(r"\d+\.\d+")
EXACT_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][^=,;\s]*")
ROOT_USERS = {"", "root", "0", "0:0", "root:root"}


@dataclass
class Stage:
    """One ``FROM ... AS name`` stage and the instructions in it."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile, with ``${ARG}`` defaults declared before the first FROM substituted."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage-{len(stages)}"
            stages.append(Stage(name=name, base=words[0]))
            continue
        if stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = []
    current: Stage | None = stages[name]
    while current is not None:
        chain.append(current)
        current = stages.get(current.base)
    return chain


def check(path: Path, cuda_requirements: Path | None = None) -> list[Violation]:
    """Every policy violation in the Dockerfile at ``path``."""
    where = str(path)
    stages_list = parse(path.read_text(encoding="utf-8"))
    stages = {s.name: s for s in stages_list}
    violations: list[Violation] = []
    for stage in stages_list:
        if stage.base in stages:
            continue
        _, tag, digest = split_image(stage.base)
        if tag == "latest" or (not digest and not (tag and PINNED_TAG.search(tag))):
            violations.append(Violation(f"{where} stage {stage.name}", f"base {stage.base} is not pinned"))
    all_instructions = [i for s in stages_list for i in s.instructions]
    if not any(k == "COPY" and "requirements.lock" in v for k, v in all_instructions):
        violations.append(Violation(where, "does not COPY requirements.lock"))
    if not any(k == "RUN" and "-r requirements.lock" in v for k, v in all_instructions):
        violations.append(Violation(where, "does not install from requirements.lock"))
    if not any(k == "RUN" and "gen_protos.py" in v for k, v in all_instructions):
        violations.append(Violation(where, "does not run scripts/gen_protos.py"))
    for target, module in SERVICE_TARGETS.items():
        if target not in stages:
            violations.append(Violation(where, f"no target {target}"))
            continue
        chain = _chain(stages, target)
        users = [v for s in chain for k, v in reversed(s.instructions) if k == "USER"]
        if not users or users[0].strip() in ROOT_USERS:
            violations.append(Violation(f"{where} target {target}", "must end as a non-root USER"))
        cmds = [v for s in chain for k, v in reversed(s.instructions) if k in ("CMD", "ENTRYPOINT")]
        if not cmds or module not in cmds[0]:
            violations.append(Violation(f"{where} target {target}", f"must run python -m {module}"))
        is_cuda = chain[-1].base.startswith(CUDA_BASE)
        if target.endswith("-cuda") != is_cuda:
            violations.append(
                Violation(f"{where} target {target}", "CUDA targets, and only they, use nvidia/cuda")
            )
    if cuda_requirements is not None:
        pins = [
            shlex.split(line, comments=True)
            for line in cuda_requirements.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not any(p and re.fullmatch(r"cupy-cuda12x==\d+\.\d+\.\d+", p[0]) for p in pins):
            violations.append(Violation(str(cuda_requirements), "cupy-cuda12x must be pinned (==X.Y.Z)"))
        # pip takes the newest match of a loose requirement on every build (of an unlisted dependency too: CuPy's
        # own are listed in the file, each pinned).
        violations += [
            Violation(str(cuda_requirements), f"{p[0]} is not an exact pin (name==version)")
            for p in pins
            if p and not EXACT_PIN.fullmatch(p[0])
        ]
    return violations
