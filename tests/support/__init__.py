"""Real peers for the tests: a Mosquitto broker per test and an MLflow registry."""
