"""Entry point of ``python -m mesh.tools.k8s_check``."""

from mesh.tools.k8s_check import main

raise SystemExit(main())
