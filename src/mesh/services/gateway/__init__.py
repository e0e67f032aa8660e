"""The REST gateway: HTTP/JSON in front of the mesh's gRPC services, the web page and the health dashboard."""
