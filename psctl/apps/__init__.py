"""Library entry points that return data and raise typed errors: train, predict,
recommend, the Python API. The CLI renders what they return."""
