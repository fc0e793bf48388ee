"""Vision-language models: loading, rendering with images, the log-prob path with pixel inputs."""
