"""RabbitMQ: the broker (publishing, consumers), the contract's topology, and the consumer that
decides what happens to each delivery."""
