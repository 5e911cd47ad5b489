"""The adapters: RabbitMQ (``amqp/``), Redis (``redis/``, with its Lua scripts in ``lua/``),
the identity provider and vaults (``identity/``). They implement the use cases' ports and speak
the error tree; only they import the I/O libraries."""
