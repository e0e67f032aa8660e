"""The shared service kit: settings, logging, tracing, metrics, errors, health, gRPC server and channels.

Every service uses these the same way; a service package holds only what is its own.
"""
