"""The container recipe for a topology: the project installed, the shard files as a layer, a non-root user.

The shard files go into the image (``MODEL_DIR``), not into a ConfigMap (at
most 1 MiB) nor a volume: a layer is pulled once per node and cached, is
versioned and rolled out with the code that reads it, needs no storage class
and no download at start, and is where custom-layer modules must be anyway
(``--pip``: a shard file that names a custom layer loads only where its
module imports). The secret keys never enter the image: only the files the
topology lists are copied, and ``.containerignore`` / ``.dockerignore`` keep
every ``keys/`` folder and ``*.key_secret`` file out of the build context.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from pipeline import topology as topo
from pipeline.deploy.kubernetes import MODEL_DIR, RUN_AS
from pipeline.errors import UsageError
from pipeline.topology import Topology

BASE_IMAGE = "python:3.11-slim"
USER_NAME = "pipeline"


def render(topology: Topology, context: Path, *, base_image: str = BASE_IMAGE, pip: Sequence[str] = ()) -> str:
    """The Containerfile text; ``context`` is the build context (the project's root), which must hold the topology."""
    context = context.resolve()
    directory = topology.directory.resolve()
    try:
        rel = directory.relative_to(context)
    except ValueError:
        raise UsageError(
            f"the topology {str(directory)!r} is outside the build context {str(context)!r}; "
            "pass --context with a folder that holds both the project and the topology"
        ) from None
    for required in ("pyproject.toml", "pipeline"):
        if not (context / required).exists():
            raise UsageError(f"the build context {str(context)!r} holds no {required!r}; expected the project's root (--context)")
    files = [s.file for s in topology.shards]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UsageError(f"the shard files {missing} are not in {str(directory)!r}; the image needs them")
    copies = "\n".join(f"COPY {shlex.quote(str(rel / f))} {MODEL_DIR}/{f}" for f in files)
    extra = f"RUN pip install {' '.join(shlex.quote(p) for p in pip)}\n" if pip else ""
    return f"""# Written by `pipeline deploy containerfile {rel}`; build from the project's root:
#   podman build -f Containerfile -t IMAGE .      (or docker build)
# The shard files of {topology.name!r} are a layer of the image; Kubernetes mounts the rewritten
# topology.yaml over the copy below (docs/DEPLOY.md).
FROM {base_image}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
RUN pip install . && rm -rf /src
{extra}RUN groupadd --system --gid {RUN_AS} {USER_NAME} \\
 && useradd --system --uid {RUN_AS} --gid {RUN_AS} --home-dir /nonexistent --shell /usr/sbin/nologin {USER_NAME}
{copies}
COPY {shlex.quote(str(rel / topo.TOPOLOGY_FILE))} {MODEL_DIR}/{topo.TOPOLOGY_FILE}
WORKDIR /tmp
USER {RUN_AS}:{RUN_AS}
ENTRYPOINT ["pipeline"]
CMD ["--help"]
"""


#: what the build context leaves out (secret keys above all); written as .containerignore and .dockerignore.
IGNORE = """# never send secret keys, virtualenvs or caches to a container build
**/keys
**/*.key_secret
**/*.pem
.git
.venv
.venv-*
**/__pycache__
**/.pytest_cache
"""
