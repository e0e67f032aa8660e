"""File service: validated uploads, a content-addressed blob store, metadata in PostgreSQL.

Run it with ``python -m mesh.services.file`` (gRPC 50051, HTTP 9101 for /metrics and /healthz).

* ``validation`` and ``containers``: what the bytes are and whether they are whole (domain core);
* ``thumbnails``: the 256 px thumbnail made at upload;
* ``blobs``: the content-addressed files (atomic writes, fan-out directories);
* ``store``: the use cases, on an ``ImageRepository`` port; ``postgres``: that port on psycopg;
* ``servicer``: the gRPC face (listing pages: ``mesh.kit.pagination``); ``server``: the wiring;
* ``client``: the typed client every other service uses.
"""
