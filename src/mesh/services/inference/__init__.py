"""The inference service: a model repository, dynamic batching and ``mesh.inference.v1.InferenceService``.

Layout: ``settings`` (environment), ``repository`` (model configs on disk, versions, readiness),
``parameters`` (typed request parameters), ``models`` (the model port and its implementations, the strip
reader among them), ``batching`` (dynamic batching off the event loop), ``images`` (decoding inputs),
``predictor`` (one prediction, shared by the servicer and the job handler), ``stats`` (statistics and
Prometheus metrics), ``checks`` (health), ``servicer`` (gRPC), ``client`` (a typed client for other services),
``jobs`` (the queue's job handler) and ``__main__`` (wiring).
"""
