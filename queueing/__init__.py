"""Moving requests to the worker and results back: worker, queues, gateway."""
