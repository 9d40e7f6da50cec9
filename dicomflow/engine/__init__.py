"""The routing engine: events from the outbox, routes, deliveries with retries and dead letters."""
