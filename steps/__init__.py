"""One click command per MLflow entry point: parse -> config -> one pipeline call."""
