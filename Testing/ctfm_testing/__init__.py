"""Helpers shared by the CT-FM tests: test data locations and synthetic inputs."""
