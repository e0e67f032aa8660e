"""Entry point of ``python -m mesh.tools.load``."""

from mesh.tools.load import main

raise SystemExit(main())
