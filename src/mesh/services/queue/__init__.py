"""The queue service: durable jobs over RabbitMQ with PostgreSQL as the record.

Modules: ``states`` (the job state machine, backoff and retry policy: pure domain), ``repository`` (jobs,
history and outbox on PostgreSQL), ``broker`` (RabbitMQ topology, publishing with confirms, consuming),
``relay`` (outbox -> RabbitMQ), ``reconciler`` (backoff expiry, stalled leases, lost dispatches),
``dead_letters`` (the dead-letter consumer), ``worker`` (the worker runtime other services embed),
``batching`` (group commit of concurrent submits, claims and outcomes), ``acks`` (grouped acks),
``servicer`` (the gRPC API) and ``__main__`` (wiring).
"""
